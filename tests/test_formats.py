"""Canonical valid and invalid rows per exported format (in the manner of TRL's data_utils tests)."""

from __future__ import annotations

from typing import Any

import pytest
from datasets import Dataset

from stepforge.schemas.formats import (
    CONFLICTING_KEYS,
    FORMAT_KEYS,
    is_conversational_preference,
    is_conversational_prompt_completion,
    is_conversational_sft,
    is_step_decisions,
    VALIDATORS,
    FormatError,
    is_math_shepherd,
    is_preference,
    is_stepwise_supervision,
    is_unpaired_preference,
    stepwise_to_math_shepherd,
    unpair_preference,
    validate_math_shepherd,
    validate_preference,
    validate_stepwise_supervision,
    validate_unpaired_preference,
)

STEPWISE = {
    "prompt": "Janet has 3 apples and buys 2. How many?",
    "completions": ["She buys 2 more.", "3 + 2 = 6."],
    "labels": [True, False],
}
MATH_SHEPHERD = {
    "input": "Janet has 3 apples and buys 2. How many? She buys 2 more. ки\n3 + 2 = 6. ки",
    "label": "Janet has 3 apples and buys 2. How many? She buys 2 more. +\n3 + 2 = 6. -",
    "value": ["+", "-"],
}
PREFERENCE = {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"}
UNPAIRED = {"prompt": "What is 2 + 2?", "completion": " 4", "label": True}

_TASK = {"role": "user", "content": "Capital of Japan?"}
_CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": "{}"}}]}
_RESULT = {"role": "tool", "content": "Tokyo"}
_ANSWER = {"role": "assistant", "content": "<answer>Tokyo</answer>"}
CONVERSATIONAL_SFT = {"messages": [_TASK, _CALL, _RESULT, _ANSWER], "train_mask": [False, False, False, True]}
CONVERSATIONAL_PROMPT_COMPLETION = {"prompt": [_TASK, _CALL, _RESULT], "completion": [_ANSWER]}
CONVERSATIONAL_PREFERENCE = {"prompt": [_TASK], "chosen": [_CALL], "rejected": [_ANSWER]}
STEP_DECISIONS = {"action": '{"role": "assistant"}', "filter_reason": "label_negative"}

CANONICAL: dict[str, dict[str, Any]] = {
    "stepwise_supervision": STEPWISE,
    "math_shepherd": MATH_SHEPHERD,
    "preference": PREFERENCE,
    "unpaired_preference": UNPAIRED,
    "conversational_sft": CONVERSATIONAL_SFT,
    "conversational_prompt_completion": CONVERSATIONAL_PROMPT_COMPLETION,
    "conversational_preference": CONVERSATIONAL_PREFERENCE,
    "step_decisions": STEP_DECISIONS,
}
PREDICATES = {
    "stepwise_supervision": is_stepwise_supervision,
    "math_shepherd": is_math_shepherd,
    "preference": is_preference,
    "unpaired_preference": is_unpaired_preference,
    "conversational_sft": is_conversational_sft,
    "conversational_prompt_completion": is_conversational_prompt_completion,
    "conversational_preference": is_conversational_preference,
    "step_decisions": is_step_decisions,
}


def _with(row: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**row, **changes}


def _without(row: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != key}


# (format, row, words the error message must contain)
INVALID = [
    ("conversational_sft", _with(CONVERSATIONAL_SFT, train_mask=[True, False, False, True]), ["non-assistant messages [0]"]),
    ("conversational_sft", _with(CONVERSATIONAL_SFT, train_mask=[False] * 4), ["trains on no turn"]),
    ("conversational_sft", _with(CONVERSATIONAL_SFT, train_mask=[True]), ["'train_mask' has 1 flags but 'messages' has 4"]),
    ("conversational_prompt_completion", _with(CONVERSATIONAL_PROMPT_COMPLETION, completion=[_RESULT]),
     ["completion[0] is not a message with role in ('assistant',)"]),
    ("conversational_prompt_completion", _with(CONVERSATIONAL_PROMPT_COMPLETION, prompt=[]), ["'prompt' must be a non-empty"]),
    ("conversational_prompt_completion", _with(CONVERSATIONAL_PROMPT_COMPLETION, completion=" 4"),
     ["'completion' must be a non-empty list of messages"]),
    ("conversational_prompt_completion", _with(CONVERSATIONAL_PROMPT_COMPLETION, label=True), ["unexpected keys ['label']"]),
    ("conversational_preference", _with(CONVERSATIONAL_PREFERENCE, chosen=[_TASK]), ["chosen[0] is not a message"]),
    ("conversational_preference", _with(CONVERSATIONAL_PREFERENCE, chosen=[_ANSWER]), ["identical"]),
    ("stepwise_supervision", _without(STEPWISE, "labels"), ["missing keys", "'labels'"]),
    ("stepwise_supervision", _with(STEPWISE, labels=[True]), ["'labels' has 1 items but 'completions' has 2"]),
    ("stepwise_supervision", _with(STEPWISE, labels=[1, 0]), ["'labels' items [0, 1] are not bool"]),
    ("stepwise_supervision", _with(STEPWISE, completions=[], labels=[]), ["'completions' is empty"]),
    ("stepwise_supervision", _with(STEPWISE, completions="one step"), ["'completions' must be a list"]),
    ("stepwise_supervision", _with(STEPWISE, prompt=""), ["'prompt' is empty"]),
    ("stepwise_supervision", _with(STEPWISE, chosen="x"), ["unexpected keys", "'chosen'"]),
    ("math_shepherd", _without(MATH_SHEPHERD, "value"), ["missing keys", "'value'"]),
    ("math_shepherd", _with(MATH_SHEPHERD, value=["+"]), ["'input' has 2 step tags", "'value' has 1 items"]),
    ("math_shepherd", _with(MATH_SHEPHERD, value=["+", "?"]), ["'value' items [1] are not '+' or '-'"]),
    ("math_shepherd", _with(MATH_SHEPHERD, value=["-", "-"]), ["'label' is not 'input'"]),
    ("math_shepherd", _with(MATH_SHEPHERD, input=MATH_SHEPHERD["input"] + " more"), ["must end with the step tag"]),
    ("math_shepherd", _with(MATH_SHEPHERD, completions=["x"]), ["unexpected keys", "'completions'"]),
    ("preference", _without(PREFERENCE, "rejected"), ["missing keys ['rejected']"]),
    ("preference", _without(PREFERENCE, "prompt"), ["missing keys ['prompt']"]),
    ("preference", _with(PREFERENCE, chosen=""), ["'chosen' is empty"]),
    ("preference", _with(PREFERENCE, rejected=[{"role": "assistant", "content": "5"}]), ["'rejected' must be a str"]),
    ("preference", _with(PREFERENCE, rejected=PREFERENCE["chosen"]), ["'chosen' and 'rejected' are identical"]),
    ("preference", _with(PREFERENCE, completion="x"), ["unexpected keys ['completion']"]),
    ("unpaired_preference", _without(UNPAIRED, "label"), ["missing keys ['label']"]),
    ("unpaired_preference", _with(UNPAIRED, label=1), ["'label' must be a bool, got int"]),
    ("unpaired_preference", _with(UNPAIRED, completion=""), ["'completion' is empty"]),
    ("unpaired_preference", _with(UNPAIRED, chosen="a", rejected="b"), ["unexpected keys ['chosen', 'rejected']"]),
]


@pytest.mark.parametrize("format_name", FORMAT_KEYS)
def test_canonical_example_is_valid(format_name: str) -> None:
    example = CANONICAL[format_name]
    assert PREDICATES[format_name](example)
    VALIDATORS[format_name](example)
    VALIDATORS[format_name]([example, example])
    VALIDATORS[format_name](Dataset.from_list([example]))


@pytest.mark.parametrize("format_name", FORMAT_KEYS)
def test_provenance_keys_are_allowed(format_name: str) -> None:
    example = _with(CANONICAL[format_name], problem_id="p1", margin=0.5, sources="mc")
    assert PREDICATES[format_name](example)


@pytest.mark.parametrize("format_name", FORMAT_KEYS)
def test_canonical_examples_of_other_formats_are_rejected(format_name: str) -> None:
    for other_name, other in CANONICAL.items():
        if other_name != format_name:
            assert not PREDICATES[format_name](other), f"{other_name} row passes as {format_name}"


@pytest.mark.parametrize(("format_name", "row", "expected"), INVALID)
def test_invalid_row_is_named_in_the_error(format_name: str, row: dict[str, Any], expected: list[str]) -> None:
    assert not PREDICATES[format_name](row)
    with pytest.raises(FormatError) as error:
        VALIDATORS[format_name](row)
    for words in expected:
        assert words in str(error.value)


def test_error_names_the_offending_row() -> None:
    rows = [STEPWISE, STEPWISE, STEPWISE, _with(STEPWISE, completions=["a", "b", "c", "d", "e"], labels=[True] * 4)]
    with pytest.raises(FormatError, match=r"row 3: 'labels' has 4 items but 'completions' has 5"):
        validate_stepwise_supervision(rows)


def test_dataset_columns_are_checked_once_before_rows() -> None:
    dataset = Dataset.from_list([_without(PREFERENCE, "rejected")] * 3)
    with pytest.raises(FormatError) as error:
        validate_preference(dataset)
    assert str(error.value) == "not preference: missing keys ['rejected']"


def test_format_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_unpaired_preference({"prompt": "p"})


def test_conflicting_keys_never_include_a_formats_own_keys() -> None:
    for format_name, keys in FORMAT_KEYS.items():
        assert not CONFLICTING_KEYS[format_name] & set(keys)


def test_math_shepherd_custom_step_tag() -> None:
    row = {"input": "Q? a <s>\nb <s>", "label": "Q? a +\nb +", "value": ["+", "+"]}
    assert is_math_shepherd(row, step_tag="<s>")
    assert not is_math_shepherd(row)
    validate_math_shepherd(row, step_tag="<s>")


def test_stepwise_to_math_shepherd_gives_the_canonical_row() -> None:
    converted = stepwise_to_math_shepherd(_with(STEPWISE, problem_id="p1"))
    assert converted == {**MATH_SHEPHERD, "problem_id": "p1"}
    validate_math_shepherd(converted)


def test_unpair_preference_keeps_provenance() -> None:
    desirable, undesirable = unpair_preference(_with(PREFERENCE, pair_id="x"))
    assert desirable == {"prompt": PREFERENCE["prompt"], "completion": " 4", "label": True, "pair_id": "x"}
    assert undesirable == {"prompt": PREFERENCE["prompt"], "completion": " 5", "label": False, "pair_id": "x"}
    validate_unpaired_preference([desirable, undesirable])


def test_step_level_rows_are_plain_rows_of_their_formats() -> None:
    """Step-KTO and Full-Step-DPO rows: the base format plus step provenance; ``value`` would clash."""
    step_kto = {"prompt": "Q?\n\nstep 1\n\n", "completion": "step 2", "label": False, "node_id": "n2",
                "depth": 2, "step_label": -1, "step_value": 0.0}
    full_step_dpo = {**PREFERENCE, "chosen_step_rewards": [1.0], "rejected_step_rewards": [0.0],
                     "chosen_steps": [" 4"], "rejected_steps": [" 5"]}
    validate_unpaired_preference(step_kto)
    validate_preference(full_step_dpo)
    with pytest.raises(FormatError, match=r"unexpected keys \['value'\]"):
        validate_unpaired_preference({**step_kto, "value": 0.0})
