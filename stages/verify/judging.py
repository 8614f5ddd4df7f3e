"""What every LLM judge shares: reading a judgement out of free text or JSON, voting, and the
request plumbing around them (``stages.verify.judge`` for math solutions, ``stages.verify.agent_judge``
for agent steps).

A judgement that cannot be read is a ``JudgementError`` with a snake_case reason; ``read_judgements``
turns each one (and each failed generation) into a ``Reject`` with the raw text, never a default.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from stepforge.schemas.records import Reject
from stepforge.stages.llm.base import Generation, GenerationClient, GenerationError
from stepforge.stages.tree import failed_generation

PAYLOAD_CHARS = 2000
RATIONALE_KEYS = ("analysis", "rationale", "reasoning", "explanation")
# Ties between verdicts go to the more severe one: a judge split between "fine" and "wrong"
# has not vouched for the step.
SEVERITY = {-1: 0, 0: 1, 1: 2}


@dataclass(frozen=True)
class Judgement:
    """One readable judgement: ``value`` is what the judge decided (an earliest-error index or a
    verdict, both ints; a rubric score), ``rationale`` why."""

    value: float
    rationale: str


class JudgementError(ValueError):
    """An unreadable judgement; ``reason`` is the reject's snake_case reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- reading ---------------------------------------------------------------------------------
def json_objects(text: str) -> list[dict]:
    """Every JSON object embedded in ``text`` (outermost braces), in order of appearance."""
    objects, decoder, start = [], json.JSONDecoder(), text.find("{")
    while start >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            objects.append(value)
        start = text.find("{", end)
    return objects


def pick(obj: dict, keys: Iterable[str]):
    """The value of the first of ``keys`` that ``obj`` has (keys compared case-insensitively), or None."""
    lowered = {str(k).lower(): v for k, v in obj.items()}
    return next((lowered[k] for k in keys if k in lowered), None)


def rationale_of(obj: dict | None, text: str) -> str:
    """The rationale field of the JSON answer, else the whole text."""
    if obj is not None and isinstance(found := pick(obj, RATIONALE_KEYS), str):
        return found.strip()
    return text.strip()


def unreadable(text: str, finish_reason: str, what: str) -> JudgementError:
    """Why no ``what`` was found: an empty answer, one cut off by the token budget, or none given."""
    if not text.strip():
        return JudgementError("empty_judgement", "the judge returned no text")
    if finish_reason == "length":
        return JudgementError("truncated_judgement", f"the judgement ran out of tokens before giving {what}")
    return JudgementError("no_verdict", f"no {what} found in the judgement")


def read_judgements(
    results: list[Generation | GenerationError], parse: Callable[[Generation], Judgement], item_name: str, stage: str
) -> tuple[list[Judgement], list[Reject], int]:
    """The readable judgements, a reject of ``stage`` per unreadable or failed sample (named
    ``item_name#index``), and the tokens spent."""
    judgements, rejects, cost = [], [], 0
    for index, result in enumerate(results):
        name = f"{item_name}#{index}"
        if (failed := failed_generation(stage, name, result)) is not None:
            rejects.append(failed)
            continue
        cost += result.num_tokens
        try:
            judgements.append(parse(result))
        except JudgementError as exc:
            rejects.append(
                Reject(stage=stage, item=name, reason=exc.reason, detail=exc.detail, payload=result.text[:PAYLOAD_CHARS])
            )
    return judgements, rejects, cost


# -- aggregation -----------------------------------------------------------------------------
def vote(values: list[int], *, critic: bool) -> int:
    """The most common value; ties go to the more severe one (an earlier error, a worse verdict)."""
    counts = Counter(values)
    top = max(counts.values())
    tied = [v for v, c in counts.items() if c == top]
    if critic:
        errors = [v for v in tied if v >= 0]
        return min(errors) if errors else -1
    return min(tied, key=SEVERITY.__getitem__)


# -- requests --------------------------------------------------------------------------------
class OutputChoice(Protocol):
    output: str  # auto / json_schema / text


def structured_output(config: OutputChoice, client: GenerationClient) -> bool:
    """Whether the judge answers in a JSON schema: when the backend can constrain decoding and the
    config does not ask for text; ``output: json_schema`` on a backend that cannot is an error."""
    supported = bool(getattr(client.backend, "supports_json_schema", False))
    if config.output == "json_schema" and not supported:
        raise ValueError(
            f"judge.output is json_schema but the {type(client.backend).__name__} backend cannot constrain decoding; "
            "use output: auto or text"
        )
    return supported and config.output != "text"
