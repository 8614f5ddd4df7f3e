"""Rubric judge for agent steps (WebSTAR's step grader): a 1-10 score with a rationale per step.

One request per distinct step (node) of an agent problem's chosen rollouts: the task, the
trajectory so far (long tool results cut at ``max_observation_chars``), the step's action and,
with ``show_result``, what came back. The judge answers ``{"rationale", "score"}`` (JSON-schema
constrained where the backend can, else parsed from text: JSON, 'Score: n', 'n/10').

Scores map to the ternary labels AgentProcessBench uses: ``score >= good_score`` -> +1
(helpful), ``score <= bad_score`` -> -1 (wrong), otherwise 0 (neutral or exploratory). With
``samples > 1`` the verdicts are voted (ties to the more severe) and the score averaged. The
``judge`` evaluation keeps the mean score in ``meta.score``, ``value = (score - 1) / 9``, the
share of samples agreeing with the verdict as confidence, and the rationale of an agreeing
sample. Unreadable answers are rejects with a reason (``no_score``, ``score_out_of_range``,
``empty_judgement``, ``truncated_judgement``), never a default score.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Origin, Problem, Record
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient, GenerationRequest
from stepforge.stages.tree import StepTree
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

SYSTEM = (
    "You are an expert evaluator of tool-using AI agents. You grade single steps of an agent's trajectory "
    "strictly and consistently."
)
TASK = (
    "Below is an agent's task, its trajectory so far, and the step to grade.\n\n"
    "[Trajectory so far]\n{context}\n\n[Step to grade]\n{step}\n\n"
    "Grade how much this step helps to accomplish the task, given only what the agent knew when it acted.\n"
    "- 9-10: correct and clearly advances the task (the right tool with the right arguments, or a final answer "
    "that the evidence supports).\n"
    "- 7-8: sound and useful, with minor inefficiency.\n"
    "- 4-6: neutral or exploratory: harmless but gains little (a vague search, redundant information).\n"
    "- 2-3: unhelpful: a wrong tool or bad arguments, ignoring what earlier results showed, repeating a call.\n"
    "- 1: wrong: an unsupported or wrong final answer, a made-up fact, an action that derails the task.\n"
)
ANSWER_JSON = 'Answer with a JSON object: {{"rationale": "<one or two sentences>", "score": <integer 1 to 10>}}.'
ANSWER_TEXT = "Explain briefly, then end with a line 'Score: <integer 1 to 10>'."

_SCORE_KEYS = ("score", "grade", "rating")
_SCORE_LINE = re.compile(r"\bscore\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_OUT_OF_TEN = re.compile(r"\b(\d+(?:\.\d+)?)\s*/\s*10\b")


class AgentJudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    good_score: int = Field(default=7, ge=1, le=10, description="A score at or above this is +1 (helpful).")
    bad_score: int = Field(default=3, ge=1, le=10, description="A score at or below this is -1 (wrong).")
    samples: int = Field(default=1, ge=1, description="Gradings per step, voted (ties to the more severe verdict).")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature of the grader.")
    max_tokens: int = Field(default=256, ge=16, description="Generation budget of one grading.")
    seed: int = Field(default=0, description="Seed of the grader's samples.")
    output: str = Field(
        default="auto", pattern="^(auto|json_schema|text)$",
        description="auto: JSON schema when the backend can constrain decoding; json_schema: require it; text: parse free text.",
    )
    show_result: bool = Field(
        default=True, description="Show the grader what came back from the step's tool calls (WebSTAR grades with it)."
    )
    max_observation_chars: int = Field(
        default=1200, ge=50, description="Tool results longer than this are cut in the grader's prompt (the cut is marked)."
    )
    max_rationale_chars: int = Field(default=400, ge=0, description="Longest rationale the JSON schema allows.")
    origins: tuple[Origin, ...] = Field(default=("policy",), description="Steps of which rollouts are graded.")

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "AgentJudgeConfig":
        if self.bad_score >= self.good_score:
            raise ValueError(f"bad_score ({self.bad_score}) must be below good_score ({self.good_score})")
        if self.samples > 1 and self.temperature == 0.0:
            raise ValueError("samples > 1 needs temperature > 0: greedy samples are identical")
        return self

    def verdict(self, score: float) -> int:
        return 1 if score >= self.good_score else -1 if score <= self.bad_score else 0


def score_schema(max_rationale_chars: int) -> str:
    return json.dumps(
        {
            "type": "object",
            "properties": {
                "rationale": {"type": "string", "maxLength": max_rationale_chars},
                "score": {"type": "integer", "enum": list(range(1, 11))},
            },
            "required": ["rationale", "score"],
            "additionalProperties": False,
        },
        sort_keys=True,
    )


@dataclass(frozen=True)
class Grade:
    value: float  # the score, 1..10
    rationale: str


def parse_score(text: str, finish_reason: str = "stop") -> Grade:
    """A 1-10 score: JSON key, then a 'Score: n' line, then 'n/10'."""
    for obj in reversed(json_objects(text)):
        raw = pick(obj, _SCORE_KEYS)
        if raw is None or isinstance(raw, bool):
            continue
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise JudgementError("no_score", f"score {raw!r} is not a number") from None
        return _checked(score, rationale_of(obj, text))
    for pattern in (_SCORE_LINE, _OUT_OF_TEN):
        if found := pattern.findall(text):
            return _checked(float(found[-1]), text.strip())
    error = unreadable(text, finish_reason, "a score")
    raise JudgementError("no_score" if error.reason == "no_verdict" else error.reason, error.detail)


def _checked(score: float, rationale: str) -> Grade:
    if not 1 <= score <= 10:
        raise JudgementError("score_out_of_range", f"score {score:g} is not between 1 and 10")
    return Grade(score, rationale)


def grading_messages(
    context: list[dict], step: list[dict], config: AgentJudgeConfig, structured: bool
) -> tuple[tuple[str, str], ...]:
    shown_step = step if config.show_result else step[:1]
    task = TASK.format(
        context=agent.render_transcript(context, config.max_observation_chars),
        step=agent.render_transcript(shown_step, config.max_observation_chars),
    )
    return (("system", SYSTEM), ("user", task + (ANSWER_JSON if structured else ANSWER_TEXT)))


def grade_requests(config: AgentJudgeConfig, messages, structured: bool) -> GenerationRequest:
    return GenerationRequest(
        messages=messages, n=config.samples, temperature=config.temperature, max_tokens=config.max_tokens,
        seed=config.seed, json_schema=score_schema(config.max_rationale_chars) if structured else None,
    )


async def grade_step(
    context: list[dict], step: list[dict], config: AgentJudgeConfig, client: GenerationClient, structured: bool, item: str
) -> tuple[list[Grade], list[Record], int]:
    """The readable grades of one step, a reject per unreadable sample, and the tokens spent."""
    results = await client.generate_each(grade_requests(config, grading_messages(context, step, config, structured), structured))
    grades, rejects, cost = read_judgements(results, lambda g: _as_judgement(parse_score(g.text, g.finish_reason)), item, SOURCE)
    return [Grade(j.value, j.rationale) for j in grades], list(rejects), cost


def _as_judgement(grade: Grade) -> Judgement:
    return Judgement(grade.value, grade.rationale)


def evaluation_of(
    node_id: str, problem_id: str, grades: list[Grade], cost: int, config: AgentJudgeConfig, model: str,
    context_ids: tuple[str, ...], meta: dict,
) -> Evaluation:
    verdicts = [config.verdict(g.value) for g in grades]
    verdict = vote(verdicts, critic=False)
    score = sum(g.value for g in grades) / len(grades)
    return Evaluation(
        evaluation_id=content_hash("eval", node_id, "agent_judge", VERSION, model, config.model_dump(mode="json"), context_ids),
        node_id=node_id, problem_id=problem_id, source="judge", value=round((score - 1) / 9, 6), n=len(grades),
        successes=verdicts.count(1), verdict=verdict, confidence=round(verdicts.count(verdict) / len(verdicts), 6),
        rationale=next(g.rationale for g, v in zip(grades, verdicts) if v == verdict)[:2000],
        model=model, cost_tokens=cost,
        meta=json.dumps({"style": "rubric", "score": round(score, 3), "scores": [g.value for g in grades], **meta}),
    )


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: AgentJudgeConfig,
    client: GenerationClient,
    on_problem_done: Callable[[int], None] | None = None,
) -> Iterator[Record]:
    """A ``judge`` evaluation per graded step of the agent problems, and a reject per unreadable grading."""
    structured = structured_output(config, client)
    problems = [p for p in problems if agent.is_agent_problem(p)]
    tree = StepTree(nodes)
    steps: dict[str, list[str]] = {}
    for rollout in sorted(rollouts, key=lambda r: r["rollout_id"]):
        if rollout["origin"] in config.origins:
            for nid in rollout["node_ids"]:
                if nid in tree and nid not in steps.setdefault(rollout["problem_id"], []):
                    steps[rollout["problem_id"]].append(nid)

    async def grade_problem(problem: Problem) -> list[Record]:
        meta = agent.agent_meta(problem.meta) or {}

        async def one(nid: str) -> list[Record]:
            above = tree.above(nid)
            context = agent.context_messages(meta, tree.texts(above))
            grades, records, cost = await grade_step(
                context, agent.step_messages(tree.nodes[nid]["text"]), config, client, structured, nid
            )
            if grades:
                records.append(
                    evaluation_of(nid, problem.problem_id, grades, cost, config, client.model_id, above,
                                  {"step_index": len(above)})
                )
            return records

        records = [r for part in await asyncio.gather(*(one(nid) for nid in steps.get(problem.problem_id, []))) for r in part]
        if on_problem_done:
            on_problem_done(1)
        return records

    yield from run_in_order(problems, grade_problem)
