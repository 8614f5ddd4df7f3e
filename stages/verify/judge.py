"""LLM-as-judge: a model reads a solution and says which steps are wrong.

Two prompt styles, each writing ``judge`` evaluations onto the step tree:

- ``critic`` (ProcessBench): one request per solution path; the judge returns the index of
  the earliest wrong step, or -1. Steps before the predicted index get verdict +1, the step at
  it -1, the steps after it nothing (a critic that stopped at the first error said nothing
  about them).
- ``stepwise`` (Step-DPO's error localisation, per step): one request per step, in the
  context of the problem and the steps before it; the verdict is correct / neutral /
  incorrect (+1 / 0 / -1) with a short rationale.

Each item is judged ``samples`` times and the valid judgements are aggregated by vote
(self-consistency, as in SPARK); ties go to the more severe verdict. The evaluation keeps the
votes (``n``, ``successes``, ``meta.votes``), the share agreeing with the verdict as its
confidence, and the rationale of an agreeing sample.

Where the backend can constrain decoding (``Backend.supports_json_schema``: llama.cpp
grammars here, vLLM guided decoding and OpenAI ``response_format`` behind the same field),
the judge must answer in a JSON schema; otherwise it is asked in words, and the parser reads
JSON, ``\\boxed{}`` or plain phrases. A judgement that cannot be read is a ``Reject`` with a
reason (``empty_judgement``, ``truncated_judgement``, ``no_verdict``, ``ambiguous_verdict``,
``index_out_of_range``) and the raw text — never a crash and never a silent default; an
item whose every sample is unreadable gets no evaluation.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Origin, Problem, Record
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient, GenerationRequest
from stepforge.stages.verify.judging import (
    Judgement,
    JudgementError,
    json_objects,
    pick,
    rationale_of,
    read_judgements,
    structured_output,
    unreadable,
    vote,
)

SOURCE = "judge"  # the evidence source it writes (not a stage of its own: the verify stage runs it)
VERSION = 1

Style = Literal["critic", "stepwise"]
VERDICT_NAMES = {"correct": 1, "neutral": 0, "incorrect": -1}


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Style = Field(
        default="critic",
        description="critic: one request per solution, answer = index of the earliest wrong step or -1 "
        "(ProcessBench); stepwise: one request per step, verdict correct / neutral / incorrect with a rationale.",
    )
    samples: int = Field(default=1, ge=1, description="Judgements per item (m), aggregated by majority vote.")
    temperature: float = Field(
        default=0.0, ge=0.0, le=2.0, description="Sampling temperature of the judge; must be > 0 when samples > 1."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass of the judge.")
    max_tokens: int = Field(default=384, ge=16, description="Generation budget of one judgement.")
    seed: int = Field(default=0, description="Seed of the judge's samples.")
    output: Literal["auto", "json_schema", "text"] = Field(
        default="auto",
        description="auto: a JSON schema constrains the answer when the backend supports it, else free text; "
        "json_schema: require it (error if the backend cannot); text: always free text, parsed.",
    )
    origins: tuple[Origin, ...] = Field(
        default=("policy",),
        description="Which rollouts' paths are judged: policy samples (and imported solutions) by default; "
        "add 'mc' / 'mcts' to judge completions too (one request per path or step each).",
    )
    max_rationale_chars: int = Field(
        default=600, ge=0, description="Longest rationale the JSON schema allows (keeps constrained answers short)."
    )

    @model_validator(mode="after")
    def _votes_need_variety(self) -> "JudgeConfig":
        if self.samples > 1 and self.temperature == 0.0:
            raise ValueError("samples > 1 needs temperature > 0: greedy samples are identical, so the vote means nothing")
        return self


# -- prompts -------------------------------------------------------------------------------
SYSTEM = "You are a meticulous grader of math solutions. You check every calculation and every inference."

CRITIC_TASK = (
    "Below is a math problem and a proposed solution, split into paragraphs numbered from 0.\n\n"
    "[Problem]\n{question}\n\n[Solution]\n{paragraphs}\n\n"
    "Review the solution paragraph by paragraph: recompute the arithmetic, and check that each paragraph "
    "follows from the problem and the paragraphs before it. Find the earliest paragraph that contains an "
    "error. If every paragraph is correct, the answer is -1.\n"
)
CRITIC_JSON = (
    'Answer with a JSON object: {{"analysis": "<one or two sentences>", "earliest_error": <index from 0 to '
    '{last}, or -1>}}.'
)
CRITIC_TEXT = (
    "Explain briefly, then give the index of the earliest wrong paragraph (from 0 to {last}), or -1 if there "
    "is none, in \\boxed{{}}."
)

STEPWISE_TASK = (
    "Below is a math problem, the steps of a solution so far, and the next step.\n\n"
    "[Problem]\n{question}\n\n[Steps so far]\n{previous}\n\n[Step to check]\n{step}\n\n"
    "Is the step to check correct? Recompute its arithmetic and check its reasoning against the problem "
    "and the steps before it. Verdicts: correct (right, and it moves the solution forward), neutral (not "
    "wrong, but it makes no progress or cannot be judged yet), incorrect (it contains an error).\n"
)
STEPWISE_JSON = 'Answer with a JSON object: {{"rationale": "<one or two sentences>", "verdict": "correct" | "neutral" | "incorrect"}}.'
STEPWISE_TEXT = "Explain briefly, then end with a line 'Verdict: correct', 'Verdict: neutral' or 'Verdict: incorrect'."


def critic_schema(num_steps: int, max_rationale_chars: int) -> str:
    schema = {
        "type": "object",
        "properties": {
            "analysis": {"type": "string", "maxLength": max_rationale_chars},
            # An enum rather than minimum/maximum: grammar converters (llama-cpp-python's) ignore bounds.
            "earliest_error": {"type": "integer", "enum": list(range(-1, num_steps))},
        },
        "required": ["analysis", "earliest_error"],
        "additionalProperties": False,
    }
    return json.dumps(schema, sort_keys=True)


def stepwise_schema(max_rationale_chars: int) -> str:
    schema = {
        "type": "object",
        "properties": {
            "rationale": {"type": "string", "maxLength": max_rationale_chars},
            "verdict": {"type": "string", "enum": list(VERDICT_NAMES)},
        },
        "required": ["rationale", "verdict"],
        "additionalProperties": False,
    }
    return json.dumps(schema, sort_keys=True)


def critic_messages(question: str, steps: list[str], structured: bool) -> tuple[tuple[str, str], ...]:
    paragraphs = "\n".join(f"<paragraph_{i}>\n{text}\n</paragraph_{i}>" for i, text in enumerate(steps))
    answer = (CRITIC_JSON if structured else CRITIC_TEXT).format(last=len(steps) - 1)
    return (("system", SYSTEM), ("user", CRITIC_TASK.format(question=question, paragraphs=paragraphs) + answer))


def stepwise_messages(question: str, previous: list[str], step: str, structured: bool) -> tuple[tuple[str, str], ...]:
    shown = "\n".join(f"Step {i}: {text}" for i, text in enumerate(previous, 1)) or "(none: this is the first step)"
    task = STEPWISE_TASK.format(question=question, previous=shown, step=f"Step {len(previous) + 1}: {step}")
    return (("system", SYSTEM), ("user", task + (STEPWISE_JSON if structured else STEPWISE_TEXT)))


# -- parsing (``Judgement.value``: the earliest-error index for critic, the verdict for stepwise) --
_INDEX_KEYS = ("earliest_error", "earliest_error_index", "first_error", "error_index", "index", "paragraph")
_VERDICT_KEYS = ("verdict", "label", "judgement", "judgment", "rating")
_BOXED = re.compile(r"\\boxed\s*\{\s*([^{}]*?)\s*\}")
_INT = re.compile(r"^[+-]?\d+$")
_NO_ERROR = re.compile(
    r"\b(?:no (?:error|mistake)s?\b|(?:all|every) (?:the )?(?:paragraphs?|steps?) (?:are|is) correct|"
    r"(?:the )?(?:whole |entire )?solution is (?:entirely |completely )?correct)",
    re.IGNORECASE,
)
_INDEX_PHRASE = re.compile(
    r"(?:earliest|first)\s+(?:error|mistake|wrong paragraph|incorrect paragraph)[^.\n]*?\b(?:paragraph|step|index)\s*"
    r"(?:_|#|is|:)?\s*(-?\d+)|(?:paragraph|step)\s*_?(-?\d+)\s+(?:is|contains)\s+(?:the\s+)?(?:earliest|first)\s+"
    r"(?:error|mistake|wrong)",
    re.IGNORECASE,
)
_VERDICT_LINE = re.compile(r"verdict\s*[:=]\s*\**\s*(correct|neutral|incorrect|[+-]?1|0)\b", re.IGNORECASE)
_VERDICT_WORD = re.compile(r"\b(incorrect|correct|neutral)\b", re.IGNORECASE)


def parse_critic(text: str, num_steps: int, finish_reason: str = "stop") -> Judgement:
    """The earliest-error index a critic gave: JSON key, then the last ``\\boxed{}``, then phrases."""
    index: int | None = None
    found_in: dict | None = None
    for obj in reversed(json_objects(text)):
        raw = pick(obj, _INDEX_KEYS)
        if isinstance(raw, bool):
            continue
        if isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer()):
            index, found_in = int(raw), obj
            break
        if isinstance(raw, str) and _INT.match(raw.strip()):
            index, found_in = int(raw.strip()), obj
            break
    if index is None and (boxed := _BOXED.findall(text)):
        last = boxed[-1].replace("paragraph", "").replace("_", "").strip()
        if not _INT.match(last):
            raise JudgementError("no_verdict", f"\\boxed{{{boxed[-1]}}} is not a paragraph index")
        index = int(last)
    if index is None and (phrases := _INDEX_PHRASE.findall(text)):
        index = int(next(group for group in phrases[-1] if group))
    if index is None and _NO_ERROR.search(text):
        index = -1
    if index is None:
        raise unreadable(text, finish_reason, "an earliest-error index")
    if not -1 <= index < num_steps:
        raise JudgementError("index_out_of_range", f"index {index} is not -1 or a step of 0..{num_steps - 1}")
    return Judgement(index, rationale_of(found_in, text))


def _verdict_value(raw) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float) and raw in (-1, 0, 1):
        return int(raw)
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in VERDICT_NAMES:
            return VERDICT_NAMES[word]
        if word in ("+1", "1", "0", "-1"):
            return int(word)
    return None


def parse_stepwise(text: str, finish_reason: str = "stop") -> Judgement:
    """A per-step verdict: JSON key, then a 'Verdict:' line, then a lone verdict word."""
    for obj in reversed(json_objects(text)):
        raw = pick(obj, _VERDICT_KEYS)
        if raw is None:
            continue
        if (value := _verdict_value(raw)) is None:
            raise JudgementError("no_verdict", f"verdict {raw!r} is not correct / neutral / incorrect")
        return Judgement(value, rationale_of(obj, text))
    if lines := _VERDICT_LINE.findall(text):
        return Judgement(_verdict_value(lines[-1]), text.strip())
    words = {w.lower() for w in _VERDICT_WORD.findall(text)}
    if len(words) == 1:
        return Judgement(VERDICT_NAMES[words.pop()], text.strip())
    if len(words) > 1:
        raise JudgementError("ambiguous_verdict", f"the judgement says {' and '.join(sorted(words))} without a verdict line")
    raise unreadable(text, finish_reason, "a verdict")


# -- the stage -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    problem: Problem
    rollout_id: str
    node_ids: tuple[str, ...]
    texts: tuple[str, ...]


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: JudgeConfig,
    client: GenerationClient,
    on_problem_done: Callable[[int], None] | None = None,
) -> Iterator[Record]:
    """``judge`` evaluations for the steps of the chosen rollouts, and a reject per unreadable judgement."""
    structured = structured_output(config, client)
    text_of = {n["node_id"]: n["text"] for n in nodes}
    by_problem: dict[str, list[_Item]] = {}
    problems = list(problems)
    wanted = {p.problem_id: p for p in problems}
    seen_paths: set[tuple[str, ...]] = set()
    for rollout in sorted(rollouts, key=lambda r: r["rollout_id"]):
        path = tuple(rollout["node_ids"])
        if rollout["origin"] not in config.origins or rollout["problem_id"] not in wanted or path in seen_paths:
            continue
        seen_paths.add(path)  # the same path reached twice is judged once
        if any(nid not in text_of for nid in path):
            continue  # a path through nodes this shard does not hold is judged where they are
        item = _Item(wanted[rollout["problem_id"]], rollout["rollout_id"], path, tuple(text_of[n] for n in path))
        by_problem.setdefault(item.problem.problem_id, []).append(item)
    judge_one = _critic if config.style == "critic" else _stepwise

    async def judge_problem(problem: Problem) -> list[Record]:
        records: list[Record] = []
        judged: set[str] = set()
        for part in await asyncio.gather(
            *(judge_one(item, config, client, structured, judged) for item in by_problem.get(problem.problem_id, []))
        ):
            records.extend(part)
        if on_problem_done:
            on_problem_done(1)
        return records

    yield from run_in_order(problems, judge_problem)


def _request(config: JudgeConfig, messages, schema: str | None) -> GenerationRequest:
    return GenerationRequest(
        messages=messages, n=config.samples, temperature=config.temperature, top_p=config.top_p,
        max_tokens=config.max_tokens, seed=config.seed, json_schema=schema,
    )


def _evaluation_id(config: JudgeConfig, model: str, node_id: str, context: tuple[str, ...]) -> str:
    return content_hash("eval", node_id, SOURCE, VERSION, model, config.model_dump(mode="json"), context)


async def _critic(
    item: _Item, config: JudgeConfig, client: GenerationClient, structured: bool, judged: set[str]
) -> list[Record]:
    steps = list(item.texts)
    schema = critic_schema(len(steps), config.max_rationale_chars) if structured else None
    results = await client.generate_each(_request(config, critic_messages(item.problem.question, steps, structured), schema))
    judgements, records, cost = read_judgements(
        results, lambda g: parse_critic(g.text, len(steps), g.finish_reason), f"{item.rollout_id}", SOURCE
    )
    if not judgements:
        return list(records)
    votes = [j.value for j in judgements]
    predicted = vote(votes, critic=True)
    rationale = next(j.rationale for j in judgements if j.value == predicted)
    judged_steps = range(len(steps)) if predicted < 0 else range(predicted + 1)
    shares = _split_cost(cost, len(judged_steps))
    for i, share in zip(judged_steps, shares):
        # A vote has an opinion on step i if it reached it: it found no error before i.
        opinionated = [v for v in votes if v < 0 or v >= i]
        fine = sum(1 for v in opinionated if v < 0 or v > i)
        verdict = 1 if i != predicted else -1
        agreeing = fine if verdict == 1 else len(opinionated) - fine
        records.append(
            Evaluation(
                evaluation_id=_evaluation_id(config, client.model_id, item.node_ids[i], item.node_ids),
                node_id=item.node_ids[i], problem_id=item.problem.problem_id, source="judge",
                value=fine / len(opinionated), n=len(opinionated), successes=fine, verdict=verdict,
                confidence=round(agreeing / len(opinionated), 6),
                rationale=rationale if i == max(judged_steps) else None,
                model=client.model_id, cost_tokens=share,
                meta=json.dumps(
                    {"style": "critic", "rollout_id": item.rollout_id, "step_index": i, "predicted": predicted,
                     "votes": votes, "unreadable": len(results) - len(judgements)}
                ),
            )
        )
    return records


async def _stepwise(
    item: _Item, config: JudgeConfig, client: GenerationClient, structured: bool, judged: set[str]
) -> list[Record]:
    schema = stepwise_schema(config.max_rationale_chars) if structured else None
    todo = []
    for i, nid in enumerate(item.node_ids):
        if nid in judged:
            continue  # a step shared by two paths has one context (its ancestors): judged once
        judged.add(nid)
        messages = stepwise_messages(item.problem.question, list(item.texts[:i]), item.texts[i], structured)
        todo.append((i, nid, client.generate_each(_request(config, messages, schema))))
    records: list[Record] = []
    for (i, nid, _), results in zip(todo, await asyncio.gather(*(call for _, _, call in todo))):
        judgements, rejects, cost = read_judgements(results, lambda g: parse_stepwise(g.text, g.finish_reason), nid, SOURCE)
        records.extend(rejects)
        if not judgements:
            continue
        votes = [j.value for j in judgements]
        verdict = vote(votes, critic=False)
        records.append(
            Evaluation(
                evaluation_id=_evaluation_id(config, client.model_id, nid, item.node_ids[:i]),
                node_id=nid, problem_id=item.problem.problem_id, source="judge",
                value=votes.count(1) / len(votes), n=len(votes), successes=votes.count(1), verdict=verdict,
                confidence=round(votes.count(verdict) / len(votes), 6),
                rationale=next(j.rationale for j in judgements if j.value == verdict),
                model=client.model_id, cost_tokens=cost,
                meta=json.dumps(
                    {"style": "stepwise", "rollout_id": item.rollout_id, "step_index": i, "votes": votes,
                     "unreadable": len(results) - len(judgements)}
                ),
            )
        )
    return records


def _split_cost(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` evaluations, summing exactly (the remainder goes first)."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
