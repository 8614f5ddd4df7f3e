"""Step splitting: a solution's text becomes a list of steps.

The splitter also fixes how a prefix of steps is written back for continuation
(``join_prefix``), so that a model continuing ``join_prefix(steps[:i])`` produces text that
splits into further steps the same way. That round trip is what makes a Monte Carlo
completion a true continuation of the same solution.

Delimiter modes find steps in the text alone. ``confidence`` mode (AdaptiveStep, Liu et al.
2025) instead starts a step wherever the policy was unsure of the token it sampled, which
needs the generation's per-token log-probabilities and byte lengths; its steps are exact,
unstripped slices of the text, so writing a prefix back is plain concatenation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SplitMode = Literal["blank_line", "newline", "step_prefix", "numbered", "regex", "confidence"]
_STEP_PREFIX = re.compile(r"(?im)^\s*(?:#+\s*)?\**step\s*\d+\s*[:.)]\**\s*")
# A blank line, or a line break before a numbered item ("2. ", "3) ", "**Step 4", "### 5.").
_NUMBERED = re.compile(r"\n[ \t]*\n+|\n(?=[ \t]*(?:#+[ \t]*)?\**(?:step[ \t]*)?\d+[.):])", re.IGNORECASE)


class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SplitMode = Field(
        default="blank_line",
        description="blank_line: steps separated by an empty line; newline: one step per line; "
        "step_prefix: steps introduced by 'Step k:'; numbered: blank lines or numbered items "
        "('1.', 'Step 2:'), as instruct models write; regex: split on `pattern`; confidence: a step "
        "starts at each sampled token whose probability is below `confidence_threshold` (AdaptiveStep); "
        "needs the generation's logprobs, which requests then ask for.",
    )
    pattern: str | None = Field(default=None, description="Regex separating steps when mode is 'regex'.")
    max_steps: int = Field(default=40, ge=1, description="Later steps are merged into the last one.")
    confidence_threshold: float = Field(
        default=0.8, ge=0.0, le=1.0,
        description="confidence mode: a sampled token whose probability under the policy (before "
        "temperature) is below this starts a new step. AdaptiveStep calibrates it so that about 2% of "
        "tokens qualify; weak policies need a lower value.",
    )
    min_step_tokens: int = Field(
        default=8, ge=1,
        description="confidence mode: no step has fewer generated tokens than this (a short tail is "
        "merged into the step before), so a run of unsure tokens does not make one-token steps.",
    )
    cut_at_word_start: bool = Field(
        default=True,
        description="confidence mode: only cut before a token that begins with whitespace or follows a "
        "line break, so a step never ends inside a word or number (digits are often separate tokens).",
    )

    def separator(self) -> str:
        """The text placed between steps when a prefix is written back for continuation."""
        if self.mode == "confidence":
            return ""  # its steps keep their own whitespace
        return "\n" if self.mode == "newline" else "\n\n"


def split_steps(
    text: str,
    config: SplitConfig,
    *,
    token_bytes: Sequence[int] | None = None,
    logprobs: Sequence[float] | None = None,
) -> list[str]:
    """Non-empty steps in order. Text with no separator is one step.

    Delimiter modes return stripped steps and ignore the token arguments. ``confidence`` mode
    needs them (``Generation.token_bytes`` and ``.logprobs``) and returns unstripped slices
    whose concatenation is ``text``; see ``split_by_confidence``.
    """
    if config.mode == "confidence":
        if token_bytes is None or logprobs is None:
            missing = "logprobs" if logprobs is None else "token_bytes"
            raise ValueError(
                f"split mode 'confidence' needs the generation's per-token logprobs and token_bytes "
                f"({missing} missing): request logprobs=True from a backend that reports tokens"
            )
        return split_by_confidence(text, token_bytes, logprobs, config)
    if config.mode == "blank_line":
        parts = re.split(r"\n[ \t]*\n+", text)
    elif config.mode == "newline":
        parts = text.split("\n")
    elif config.mode == "step_prefix":
        parts = _STEP_PREFIX.split(text)
    elif config.mode == "numbered":
        parts = _NUMBERED.split(text)
    else:
        if not config.pattern:
            raise ValueError("split mode 'regex' needs a pattern")
        parts = re.split(config.pattern, text)
    steps = [p.strip() for p in parts if p and p.strip()]
    if len(steps) > config.max_steps:
        steps = steps[: config.max_steps - 1] + [config.separator().join(steps[config.max_steps - 1 :])]
    return steps


def join_prefix(steps: list[str], config: SplitConfig) -> str:
    """Steps written back as the start of an assistant turn, ending where the next step begins."""
    if not steps:
        return ""
    if config.mode == "step_prefix":
        return "".join(f"Step {i}: {s}\n" for i, s in enumerate(steps, 1)) + f"Step {len(steps) + 1}:"
    if config.mode == "confidence":
        return "".join(steps)  # the steps are slices of one text, whitespace included
    sep = config.separator()
    return sep.join(steps) + sep


def split_by_confidence(
    text: str, token_bytes: Sequence[int], logprobs: Sequence[float], config: SplitConfig
) -> list[str]:
    """Steps that start where the policy was unsure of the token it sampled (AdaptiveStep).

    ``token_bytes[i]`` is generated token i's length in UTF-8 bytes of ``text`` and
    ``logprobs[i]`` its log-probability; ``logprobs`` may be longer (an end-of-generation
    token is scored but has no text). A step starts before token i (i > 0) when
    ``exp(logprobs[i]) < confidence_threshold``, the current step already holds at least
    ``min_step_tokens`` tokens, the cut falls on a character boundary inside ``text`` (bytes
    past a stop string are ignored), and, with ``cut_at_word_start``, the token begins with
    whitespace or follows a line break.

    The low-confidence token opens the new step, so the prefix before it ends just ahead of
    the decision and a completion from that prefix makes the decision again.

    Steps are exact slices: their concatenation is ``text`` (whitespace-only text gives no
    steps). A whitespace-only step joins the next one (the last joins the one before), a
    final step shorter than ``min_step_tokens`` joins the one before, and steps past
    ``max_steps`` are merged into the last.
    """
    if len(logprobs) < len(token_bytes):
        raise ValueError(f"{len(token_bytes)} tokens but only {len(logprobs)} logprobs")
    if not text.strip():
        return []
    encoded = text.encode("utf-8")
    # A token is unsure below this logprob; comparing logprobs avoids exp() per token.
    floor = math.log(config.confidence_threshold) if config.confidence_threshold > 0 else -math.inf
    cuts: list[int] = [0]  # byte offsets where steps start
    tokens_since_cut = 0
    offset = 0
    for length, logprob in zip(token_bytes, logprobs):
        if length < 0:
            raise ValueError("token_bytes must not be negative")
        if offset >= len(encoded):
            break
        if (
            offset > 0
            and logprob < floor
            and tokens_since_cut >= config.min_step_tokens
            and _is_char_start(encoded, offset)
            and (not config.cut_at_word_start or _starts_word(encoded, offset))
        ):
            cuts.append(offset)
            tokens_since_cut = 0
        tokens_since_cut += 1
        offset += length
    if len(cuts) > 1 and tokens_since_cut < config.min_step_tokens:
        cuts.pop()  # the tail after the last cut is too short to stand alone
    bounds = cuts + [len(encoded)]
    steps = [encoded[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]
    steps = _merge_blank_steps(steps)
    if len(steps) > config.max_steps:
        steps = steps[: config.max_steps - 1] + ["".join(steps[config.max_steps - 1 :])]
    return steps


def _is_char_start(encoded: bytes, offset: int) -> bool:
    """Whether ``offset`` starts a UTF-8 character (byte-level tokens can split one)."""
    return (encoded[offset] & 0xC0) != 0x80


def _starts_word(encoded: bytes, offset: int) -> bool:
    """Whether a token at ``offset`` begins with whitespace or follows a line break."""
    first = encoded[offset : offset + 4].decode("utf-8", errors="ignore")[:1]
    return first.isspace() or encoded[offset - 1 : offset] in (b"\n", b"\r")


def _merge_blank_steps(steps: list[str]) -> list[str]:
    """Whitespace-only steps join the following step (the last one joins the step before)."""
    merged: list[str] = []
    pending = ""
    for step in steps:
        if step.strip():
            merged.append(pending + step)
            pending = ""
        else:
            pending += step
    if pending:
        if merged:
            merged[-1] += pending
        else:
            return []
    return merged
