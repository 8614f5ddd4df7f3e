"""The dataset formats stepforge exports: documented key sets, ``is_*`` predicates, validators.

Modelled on TRL's ``data_utils``: a format is the set of keys a consumer reads, and a row is
in a format when those keys are present with the right types.

- ``stepwise_supervision`` (PRM data, the layout of trl-lib/math_shepherd)::

    {"prompt": str, "completions": list[str], "labels": list[bool]}

  ``completions`` and ``labels`` are non-empty and the same length: one label per step.
- ``math_shepherd`` (what OpenRLHF-style PRM trainers read)::

    {"input": "question step1 ки\\nstep2 ки", "label": "question step1 +\\nstep2 -",
     "value": ["+", "-"]}

  Every step ends with the step tag; ``label`` is ``input`` with the i-th tag replaced by
  ``value[i]``.
- ``preference`` (TRL DPOTrainer, standard text with an explicit prompt)::

    {"prompt": str, "chosen": str, "rejected": str}

  Full-Step-DPO rows are preference rows whose extra keys carry a reward per step
  (``chosen_step_rewards``, ``rejected_step_rewards``).
- ``unpaired_preference`` (TRL KTOTrainer)::

    {"prompt": str, "completion": str, "label": bool}

  Step-KTO rows are unpaired rows whose completion is one step and whose prompt ends with
  the steps before it.

- ``conversational_sft`` (agent SFT with per-turn masking, as in STeP: TRL's conversational
  ``messages`` plus which turns are trained on)::

    {"messages": [{"role": ..., "content": ..., ...}], "train_mask": list[bool]}

  ``train_mask`` has one flag per message; only assistant turns may be True, at least one is.
- ``conversational_prompt_completion`` (TRL SFTTrainer's conversational prompt-completion
  type; agent SFT with one row per trained turn)::

    {"prompt": [messages], "completion": [assistant message(s)]}

  SFTTrainer trains only on the completion (``completion_only_loss``, on by default for
  prompt-completion rows), so everything in ``prompt`` is context without loss. No ``label``:
  with one, a row is ``unpaired_preference``.
- ``conversational_preference`` (TRL DPOTrainer, conversational with an explicit prompt)::

    {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}

- ``step_decisions``: one row per filtered-out step, ``{action, filter_reason}`` plus provenance.

Extra (provenance) keys are allowed, except keys that define another format: TRL picks a
code path from the keys it sees (e.g. KTOTrainer unpairs any dataset with ``chosen`` and
``rejected``), so a row must never look like two formats at once.

Validators accept one row (a mapping), an iterable of rows, or a ``datasets.Dataset``, check
every row, and raise one ``FormatError`` naming each offending key and row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

DEFAULT_STEP_TAG = "ки"
MAX_REPORTED_PROBLEMS = 20

Row = Mapping[str, Any]
Rows = Row | Iterable[Row]

FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "stepwise_supervision": ("prompt", "completions", "labels"),
    "math_shepherd": ("input", "label", "value"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "conversational_sft": ("messages", "train_mask"),
    "conversational_prompt_completion": ("prompt", "completion"),
    "conversational_preference": ("prompt", "chosen", "rejected"),
    "step_decisions": ("action", "filter_reason"),
}
"""Required keys per format. Any other key is allowed unless it is in ``CONFLICTING_KEYS``."""

_SHARED_KEYS = frozenset({"prompt"})
_ALL_FORMAT_KEYS = frozenset(key for keys in FORMAT_KEYS.values() for key in keys)

CONFLICTING_KEYS: dict[str, frozenset[str]] = {
    name: _ALL_FORMAT_KEYS - _SHARED_KEYS - frozenset(keys) for name, keys in FORMAT_KEYS.items()
}
"""Keys a row of each format must not have: the defining keys of the other formats."""


class FormatError(ValueError):
    """Rows that are not in the format they claim; the message names each offending key and row."""


# ---------------------------------------------------------------------------------------------
# Per-row value checks: each returns human-readable problems, empty when the row is valid.
# Keys have already been checked, so the required keys are present.


def _non_empty_string_problems(row: Row, keys: Iterable[str]) -> list[str]:
    problems = []
    for key in keys:
        value = row[key]
        if not isinstance(value, str):
            problems.append(f"{key!r} must be a str, got {type(value).__name__}")
        elif not value:
            problems.append(f"{key!r} is empty")
    return problems


def _list_problems(row: Row, key: str, item_type: type, item_name: str) -> list[str]:
    value = row[key]
    if not isinstance(value, list):
        return [f"{key!r} must be a list, got {type(value).__name__}"]
    if not value:
        return [f"{key!r} is empty"]
    wrong = [i for i, item in enumerate(value) if not isinstance(item, item_type)]
    if wrong:
        return [f"{key!r} items {wrong} are not {item_name}"]
    return []


def _stepwise_supervision_problems(row: Row) -> list[str]:
    problems = _non_empty_string_problems(row, ["prompt"])
    problems += _list_problems(row, "completions", str, "str")
    # bool, not int: TRL 1.13 truncated float labels, and an int 0/1 hides the same mistake.
    problems += _list_problems(row, "labels", bool, "bool")
    completions, labels = row["completions"], row["labels"]
    if isinstance(completions, list) and isinstance(labels, list) and len(completions) != len(labels):
        problems.append(f"'labels' has {len(labels)} items but 'completions' has {len(completions)}")
    return problems


def _math_shepherd_problems(row: Row, step_tag: str) -> list[str]:
    problems = _non_empty_string_problems(row, ["input", "label"])
    value = row["value"]
    value_problems = _list_problems(row, "value", str, "str")
    if not value_problems:
        bad_marks = [i for i, mark in enumerate(value) if mark not in ("+", "-")]
        if bad_marks:
            value_problems.append(f"'value' items {bad_marks} are not '+' or '-'")
    problems += value_problems
    if problems:
        return problems
    pieces = row["input"].split(step_tag)
    num_tags = len(pieces) - 1
    if num_tags != len(value):
        return [f"'input' has {num_tags} step tags {step_tag!r} but 'value' has {len(value)} items"]
    if pieces[-1]:
        problems.append(f"'input' must end with the step tag {step_tag!r}")
    expected_label = "".join(piece + mark for piece, mark in zip(pieces, value)) + pieces[-1]
    if row["label"] != expected_label:
        problems.append("'label' is not 'input' with each step tag replaced by the matching 'value' mark")
    return problems


def _preference_problems(row: Row) -> list[str]:
    problems = _non_empty_string_problems(row, ["prompt", "chosen", "rejected"])
    if not problems and row["chosen"] == row["rejected"]:
        problems.append("'chosen' and 'rejected' are identical")
    return problems


def _unpaired_preference_problems(row: Row) -> list[str]:
    problems = _non_empty_string_problems(row, ["prompt", "completion"])
    if not isinstance(row["label"], bool):
        problems.append(f"'label' must be a bool, got {type(row['label']).__name__}")
    return problems


_ROLES = ("system", "user", "assistant", "tool")


def _message_problems(messages: Any, key: str, roles: tuple[str, ...] = _ROLES) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{key!r} must be a non-empty list of messages"]
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in roles:
            problems.append(f"{key}[{i}] is not a message with role in {roles}")
        elif not isinstance(message.get("content"), str):
            problems.append(f"{key}[{i}].content must be a str")
    return problems


def _conversational_sft_problems(row: Row) -> list[str]:
    messages, mask = row["messages"], row["train_mask"]
    problems = _message_problems(messages, "messages")
    if not isinstance(mask, list) or any(not isinstance(flag, bool) for flag in mask):
        return problems + ["'train_mask' must be a list of bool"]
    if problems:
        return problems
    if len(mask) != len(messages):
        return [f"'train_mask' has {len(mask)} flags but 'messages' has {len(messages)}"]
    if not any(mask):
        problems.append("'train_mask' trains on no turn")
    wrong = [i for i, flag in enumerate(mask) if flag and messages[i]["role"] != "assistant"]
    if wrong:
        problems.append(f"'train_mask' trains on non-assistant messages {wrong}")
    return problems


def _conversational_prompt_completion_problems(row: Row) -> list[str]:
    return _message_problems(row["prompt"], "prompt") + _message_problems(row["completion"], "completion", ("assistant",))


def _conversational_preference_problems(row: Row) -> list[str]:
    problems = _message_problems(row["prompt"], "prompt")
    for key in ("chosen", "rejected"):
        problems += _message_problems(row[key], key, ("assistant",))
    if not problems and row["chosen"] == row["rejected"]:
        problems.append("'chosen' and 'rejected' are identical")
    return problems


def _step_decisions_problems(row: Row) -> list[str]:
    return _non_empty_string_problems(row, ["action", "filter_reason"])


# ---------------------------------------------------------------------------------------------


def _key_problems(format_name: str, keys: Iterable[str]) -> list[str]:
    present = set(keys)
    problems = []
    missing = [key for key in FORMAT_KEYS[format_name] if key not in present]
    if missing:
        problems.append(f"missing keys {missing}")
    unexpected = sorted(present & CONFLICTING_KEYS[format_name])
    if unexpected:
        problems.append(f"unexpected keys {unexpected} (they define another format)")
    return problems


def _validate(format_name: str, data: Rows, row_problems: Callable[[Row], list[str]]) -> None:
    problems: list[str] = []
    if isinstance(data, Mapping):
        problems = _key_problems(format_name, data) or row_problems(data)
    else:
        # A Dataset's columns are checked once; plain rows may each have their own keys.
        columns = getattr(data, "column_names", None)
        if columns is not None:
            problems = _key_problems(format_name, columns)
        if not problems:
            for index, row in enumerate(data):
                row_level = (_key_problems(format_name, row) if columns is None else []) or row_problems(row)
                problems += [f"row {index}: {problem}" for problem in row_level]
                if len(problems) > MAX_REPORTED_PROBLEMS:
                    break
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = "; ... and more" if len(problems) > MAX_REPORTED_PROBLEMS else ""
        raise FormatError(f"not {format_name}: " + "; ".join(shown) + more)


def _is(format_name: str, example: Row, row_problems: Callable[[Row], list[str]]) -> bool:
    return not (_key_problems(format_name, example) or row_problems(example))


def validate_stepwise_supervision(data: Rows) -> None:
    """Raise ``FormatError`` unless every row is ``{prompt, completions: list[str], labels: list[bool]}``."""
    _validate("stepwise_supervision", data, _stepwise_supervision_problems)


def validate_math_shepherd(data: Rows, step_tag: str = DEFAULT_STEP_TAG) -> None:
    """Raise ``FormatError`` unless every row is a consistent ``{input, label, value}`` triple."""
    _validate("math_shepherd", data, lambda row: _math_shepherd_problems(row, step_tag))


def validate_preference(data: Rows) -> None:
    """Raise ``FormatError`` unless every row is ``{prompt, chosen, rejected}`` of distinct non-empty strs."""
    _validate("preference", data, _preference_problems)


def validate_unpaired_preference(data: Rows) -> None:
    """Raise ``FormatError`` unless every row is ``{prompt, completion, label: bool}``."""
    _validate("unpaired_preference", data, _unpaired_preference_problems)


def is_stepwise_supervision(example: Row) -> bool:
    return _is("stepwise_supervision", example, _stepwise_supervision_problems)


def is_math_shepherd(example: Row, step_tag: str = DEFAULT_STEP_TAG) -> bool:
    return _is("math_shepherd", example, lambda row: _math_shepherd_problems(row, step_tag))


def is_preference(example: Row) -> bool:
    return _is("preference", example, _preference_problems)


def is_unpaired_preference(example: Row) -> bool:
    return _is("unpaired_preference", example, _unpaired_preference_problems)


def validate_conversational_sft(data: Rows) -> None:
    """Raise ``FormatError`` unless every row is ``{messages, train_mask}`` training on assistant turns only."""
    _validate("conversational_sft", data, _conversational_sft_problems)


def validate_conversational_prompt_completion(data: Rows) -> None:
    """Raise ``FormatError`` unless every row is ``{prompt: messages, completion: assistant messages}``."""
    _validate("conversational_prompt_completion", data, _conversational_prompt_completion_problems)


def validate_conversational_preference(data: Rows) -> None:
    """Raise ``FormatError`` unless every row is ``{prompt: messages, chosen/rejected: assistant messages}``."""
    _validate("conversational_preference", data, _conversational_preference_problems)


def validate_step_decisions(data: Rows) -> None:
    _validate("step_decisions", data, _step_decisions_problems)


def is_conversational_sft(example: Row) -> bool:
    return _is("conversational_sft", example, _conversational_sft_problems)


def is_conversational_prompt_completion(example: Row) -> bool:
    return _is("conversational_prompt_completion", example, _conversational_prompt_completion_problems)


def is_conversational_preference(example: Row) -> bool:
    return _is("conversational_preference", example, _conversational_preference_problems)


def is_step_decisions(example: Row) -> bool:
    return _is("step_decisions", example, _step_decisions_problems)


VALIDATORS: dict[str, Callable[[Rows], None]] = {
    "stepwise_supervision": validate_stepwise_supervision,
    "math_shepherd": validate_math_shepherd,
    "preference": validate_preference,
    "unpaired_preference": validate_unpaired_preference,
    "conversational_sft": validate_conversational_sft,
    "conversational_prompt_completion": validate_conversational_prompt_completion,
    "conversational_preference": validate_conversational_preference,
    "step_decisions": validate_step_decisions,
}


# ---------------------------------------------------------------------------------------------
# Conversions between formats. Keys outside the source format's key set are carried over.


def stepwise_to_math_shepherd(example: Row, step_tag: str = DEFAULT_STEP_TAG) -> dict[str, Any]:
    """One stepwise-supervision row as a Math-Shepherd row.

    ``input`` is the prompt, a space, then the steps each followed by `` <step_tag>``, joined
    with newlines: the layout of the original peiyi9979/Math-Shepherd data.
    """
    marks = ["+" if label else "-" for label in example["labels"]]
    prompt, steps = example["prompt"], example["completions"]
    extra = {k: v for k, v in example.items() if k not in FORMAT_KEYS["stepwise_supervision"]}
    return {
        "input": prompt + " " + "\n".join(f"{step} {step_tag}" for step in steps),
        "label": prompt + " " + "\n".join(f"{step} {mark}" for step, mark in zip(steps, marks)),
        "value": marks,
        **extra,
    }


def unpair_preference(example: Row) -> list[dict[str, Any]]:
    """One preference row as two unpaired rows: the chosen side desirable, the rejected not."""
    extra = {k: v for k, v in example.items() if k not in FORMAT_KEYS["preference"]}
    prompt = example["prompt"]
    return [
        {"prompt": prompt, "completion": example["chosen"], "label": True, **extra},
        {"prompt": prompt, "completion": example["rejected"], "label": False, **extra},
    ]
