"""Step-level filtering of agent trajectories (WebSTAR): keep the steps worth imitating.

For every policy trajectory of an agent problem, one ``StepDecision`` per step: kept, or the
reason it is not, checked in this order:

1. ``after_error`` (only with ``drop_after_error``): a step after a dropped -1 step. Off by
   default: a good step after a mistake teaches recovery, and its context keeps the mistake
   visible but untrained (the SFT export masks every turn that is not kept).
2. ``unlabelled``: consensus gave the step no label.
3. ``label_negative`` / ``label_neutral``: the label is below ``min_label``.
4. ``low_confidence``: the label's confidence is below ``min_confidence``.
5. ``no_score`` (only with ``require_score``) / ``score_below_threshold``: the rubric judge's
   mean score (``meta.score`` of the step's rubric ``judge`` evaluations) is below ``min_score``.

Pure: it reads labels and evaluations and writes decisions; changing the thresholds re-derives
the decisions without a generation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Problem, StepDecision
from stepforge.stages.agent import trajectory as agent

STAGE = "filter"
VERSION = 1


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_label: int = Field(
        default=1, ge=-1, le=1, description="Lowest consensus label kept: 1 keeps helpful steps only, 0 neutral ones too."
    )
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0, description="Lowest label confidence kept.")
    min_score: float | None = Field(
        default=7.0, ge=1.0, le=10.0,
        description="Lowest rubric-judge score (1-10) kept when the step was graded; none ignores scores (WebSTAR keeps "
        "steps the grader scores highly).",
    )
    require_score: bool = Field(
        default=False, description="Drop steps the rubric judge did not grade (no_score) instead of deciding on the label."
    )
    drop_after_error: bool = Field(
        default=False, description="Also drop every step after a step labelled -1 in the same trajectory."
    )

    @property
    def policy_id(self) -> str:
        parts = [f"label>={self.min_label}"]
        if self.min_confidence:
            parts.append(f"conf>={self.min_confidence:g}")
        if self.min_score is not None:
            parts.append(f"score>={self.min_score:g}" + ("!" if self.require_score else ""))
        if self.drop_after_error:
            parts.append("stop_at_error")
        return f"{STAGE}@{VERSION}:" + ",".join(parts)


def rubric_scores(evaluations: Iterable[dict]) -> dict[str, float]:
    """Node -> mean rubric score over its rubric judge evaluations."""
    found: dict[str, list[float]] = defaultdict(list)
    for e in evaluations:
        if e["source"] != "judge":
            continue
        meta = json.loads(e.get("meta") or "{}")
        if meta.get("style") == "rubric" and meta.get("score") is not None:
            found[e["node_id"]].append(float(meta["score"]))
    return {nid: sum(v) / len(v) for nid, v in found.items()}


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    labels: Iterable[dict],
    evaluations: Iterable[dict],
    config: FilterConfig,
) -> Iterator[StepDecision]:
    """Decisions for every step of every policy trajectory of the agent problems, in rollout order."""
    tasks = {p.problem_id for p in problems if agent.is_agent_problem(p)}
    label_of = {label["node_id"]: label for label in labels}
    scores = rubric_scores(evaluations)
    policy = config.policy_id
    for rollout in sorted(rollouts, key=lambda r: (r["problem_id"], r["sample_index"], r["rollout_id"])):
        if rollout["origin"] != "policy" or rollout["problem_id"] not in tasks:
            continue
        errored = False
        for index, nid in enumerate(rollout["node_ids"]):
            label = label_of.get(nid)
            score = scores.get(nid)
            reason = _reason(label, score, errored, config)
            if label is not None and label["label"] == -1:
                errored = True
            yield StepDecision(
                rollout_id=rollout["rollout_id"], node_id=nid, problem_id=rollout["problem_id"], step_index=index,
                kept=reason == "kept", reason=reason, label=None if label is None else label["label"],
                confidence=None if label is None else label["confidence"],
                score=None if score is None else round(score, 3), policy=policy,
            )


def _reason(label: dict | None, score: float | None, errored: bool, config: FilterConfig) -> str:
    if errored and config.drop_after_error:
        return "after_error"
    if label is None:
        return "unlabelled"
    if label["label"] < config.min_label:
        return "label_negative" if label["label"] < 0 else "label_neutral"
    if label["confidence"] < config.min_confidence:
        return "low_confidence"
    if config.min_score is not None:
        if score is None:
            if config.require_score:
                return "no_score"
        elif score < config.min_score:
            return "score_below_threshold"
    return "kept"
