"""The step tree's records: one pydantic model and one explicit Arrow schema per table.

The pydantic model validates a row at a boundary (ingest, imports, tests); the Arrow schema
is what every Parquet shard of that table is written with, so a column never changes type
between shards and an empty shard still has every column.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    """Base of every stored row. ``TABLE`` names the table, ``ARROW_SCHEMA`` its columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TABLE: ClassVar[str]
    ARROW_SCHEMA: ClassVar[pa.Schema]


class Problem(Record):
    TABLE: ClassVar[str] = "problems"
    problem_id: str = Field(description="Content hash of the normalised question and gold answer.")
    source: str = Field(description="Where the problem came from: dataset id or file path.")
    source_index: int = Field(description="Row index in the source, for tracing back.")
    question: str = Field(min_length=1, description="Problem statement shown to the policy.")
    gold_answer: str | None = Field(
        min_length=1, description="Reference final answer, as extracted; None only for agent tasks without one."
    )
    gold_solution: str | None = Field(default=None, description="Reference worked solution, if any.")
    meta: str = Field(default="{}", description="JSON object of extra source fields.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("problem_id", pa.string()),
            ("source", pa.string()),
            ("source_index", pa.int64()),
            ("question", pa.string()),
            ("gold_answer", pa.string()),
            ("gold_solution", pa.string()),
            ("meta", pa.string()),
        ]
    )


Origin = Literal["policy", "mc", "mcts", "alternative"]


class Node(Record):
    TABLE: ClassVar[str] = "nodes"
    node_id: str = Field(description="Hash of (problem_id, parent_id, normalised text).")
    problem_id: str
    parent_id: str | None = Field(description="Previous step's node; None for a first step.")
    depth: int = Field(ge=1, description="1 for a first step.")
    text: str = Field(description="The step text as generated (not normalised).")
    origin: Origin = Field(
        description="'policy' for a rollout step, 'mc' for a Monte Carlo completion's, 'mcts' for a tree-search "
        "expansion's, 'alternative' for an agent action sampled in place of a wrong one (agent pairs)."
    )
    num_tokens: int = Field(ge=0, description="Tokens of this step, as the policy's tokenizer counts.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("node_id", pa.string()),
            ("problem_id", pa.string()),
            ("parent_id", pa.string()),
            ("depth", pa.int32()),
            ("text", pa.string()),
            ("origin", pa.string()),
            ("num_tokens", pa.int32()),
        ]
    )


class Rollout(Record):
    """A root-to-leaf path: a policy sample (prefix empty) or an MC completion of a prefix."""

    TABLE: ClassVar[str] = "rollouts"
    rollout_id: str
    problem_id: str
    origin: Origin
    prefix_node_id: str | None = Field(description="Node the generation continued from; None = the problem.")
    sample_index: int = Field(ge=0)
    node_ids: list[str] = Field(description="The whole path from the first step to the leaf.")
    text: str = Field(description="Generated text only (the prefix is not repeated).")
    final_answer: str | None
    outcome: bool | None = Field(description="Final answer checked against gold; None if unchecked.")
    outcome_reason: str = Field(
        description="correct / wrong / no_answer / unparseable_answer / unparseable_gold / verify_timeout / verify_error."
    )
    finish_reason: str = Field(description="stop / length, from the backend.")
    num_tokens: int = Field(ge=0)
    model: str
    generation_key: str = Field(description="Generation cache key that produced the text.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("rollout_id", pa.string()),
            ("problem_id", pa.string()),
            ("origin", pa.string()),
            ("prefix_node_id", pa.string()),
            ("sample_index", pa.int32()),
            ("node_ids", pa.list_(pa.string())),
            ("text", pa.string()),
            ("final_answer", pa.string()),
            ("outcome", pa.bool_()),
            ("outcome_reason", pa.string()),
            ("finish_reason", pa.string()),
            ("num_tokens", pa.int32()),
            ("model", pa.string()),
            ("generation_key", pa.string()),
        ]
    )


EvaluationSource = Literal["mc", "mcts", "judge", "tool", "human", "outcome"]


class Evaluation(Record):
    """One piece of evidence about one node from one source."""

    TABLE: ClassVar[str] = "evaluations"
    evaluation_id: str
    node_id: str
    problem_id: str
    source: EvaluationSource
    value: float | None = Field(description="Estimated probability the step leads to a correct answer.")
    n: int = Field(ge=0, description="Samples behind the value (completions, votes, ...).")
    successes: int = Field(ge=0, description="Of those, how many reached / voted correct.")
    verdict: int | None = Field(default=None, description="+1 / 0 / -1 when the source gives one.")
    confidence: float | None = None
    rationale: str | None = None
    model: str | None = None
    cost_tokens: int = Field(default=0, ge=0, description="Generated tokens spent on this evidence.")
    meta: str = Field(default="{}", description="JSON object: source-specific provenance.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("evaluation_id", pa.string()),
            ("node_id", pa.string()),
            ("problem_id", pa.string()),
            ("source", pa.string()),
            ("value", pa.float64()),
            ("n", pa.int32()),
            ("successes", pa.int32()),
            ("verdict", pa.int8()),
            ("confidence", pa.float64()),
            ("rationale", pa.string()),
            ("model", pa.string()),
            ("cost_tokens", pa.int64()),
            ("meta", pa.string()),
        ]
    )


class Label(Record):
    """Derived from evaluations by a versioned consensus policy; never generated."""

    TABLE: ClassVar[str] = "labels"
    node_id: str
    problem_id: str
    label: Literal[-1, 0, 1]
    value: float | None = Field(description="Soft label (e.g. MC fraction correct).")
    confidence: float = Field(ge=0.0, le=1.0)
    reason: str
    policy: str = Field(description="name@version of the consensus policy, plus the rules that were on.")
    sources: str = Field(default="", description="'+'-joined evidence sources behind the label (mc, judge, tool, human, ...).")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("node_id", pa.string()),
            ("problem_id", pa.string()),
            ("label", pa.int8()),
            ("value", pa.float64()),
            ("confidence", pa.float64()),
            ("reason", pa.string()),
            ("policy", pa.string()),
            ("sources", pa.string()),
        ]
    )


class Pair(Record):
    TABLE: ClassVar[str] = "pairs"
    pair_id: str
    problem_id: str
    kind: str = Field(
        description="How the pair was built: 'step_dpo' (first error vs a correct next step from the same prefix), "
        "'sibling' (two labelled steps from one prefix whose values differ by at least a margin), "
        "'trajectory' (a correct vs an incorrect complete solution of the problem)."
    )
    prompt: str = Field(description="Problem plus the shared correct prefix.")
    chosen: str
    rejected: str
    prefix_node_id: str | None
    chosen_node_id: str
    rejected_node_id: str
    chosen_value: float | None
    rejected_value: float | None
    margin: float | None
    sources: str = Field(description="Comma-separated evaluation sources behind the pair.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("pair_id", pa.string()),
            ("problem_id", pa.string()),
            ("kind", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("prefix_node_id", pa.string()),
            ("chosen_node_id", pa.string()),
            ("rejected_node_id", pa.string()),
            ("chosen_value", pa.float64()),
            ("rejected_value", pa.float64()),
            ("margin", pa.float64()),
            ("sources", pa.string()),
        ]
    )


class Reject(Record):
    """A row a stage could not use, with a stable snake_case reason, or an infrastructure error."""

    TABLE: ClassVar[str] = "rejects"
    stage: str
    item: str = Field(description="What was rejected: 'source#row', a problem_id, a rollout_id.")
    reason: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    detail: str = Field(description="Human-readable specifics: the offending field, the error text.")
    payload: str | None = Field(default=None, description="The offending input, truncated.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("stage", pa.string()),
            ("item", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
            ("payload", pa.string()),
        ]
    )


class EvalResult(Record):
    """One trajectory scored by a benchmark (e.g. ProcessBench) under one label source or policy."""

    TABLE: ClassVar[str] = "eval_results"
    benchmark: str = Field(description="Which metric: 'processbench' (exact earliest-error index).")
    method: str = Field(description="The consensus policy id whose labels were scored.")
    problem_id: str
    rollout_id: str
    item: str = Field(description="The source row's own id (e.g. ProcessBench 'gsm8k-0').")
    num_steps: int = Field(ge=0)
    reference: int = Field(ge=-1, description="Reference earliest wrong step (0-based), -1 if none.")
    predicted: int = Field(ge=-1, description="First step the labels call wrong (0-based), -1 if none.")
    correct: bool = Field(description="predicted == reference.")
    labelled_steps: int = Field(ge=0, description="Steps of the path that have a label (coverage).")
    detail: str = Field(description="Why the prediction: the reason of the first wrong label.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("benchmark", pa.string()),
            ("method", pa.string()),
            ("problem_id", pa.string()),
            ("rollout_id", pa.string()),
            ("item", pa.string()),
            ("num_steps", pa.int32()),
            ("reference", pa.int32()),
            ("predicted", pa.int32()),
            ("correct", pa.bool_()),
            ("labelled_steps", pa.int32()),
            ("detail", pa.string()),
        ]
    )


class StepDecision(Record):
    """Whether one step of a trajectory is kept for SFT (WebSTAR-style step filtering), and why."""

    TABLE: ClassVar[str] = "step_filter"
    rollout_id: str
    node_id: str
    problem_id: str
    step_index: int = Field(ge=0, description="0-based position of the step in the trajectory.")
    kept: bool
    reason: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="kept, or why not: unlabelled, label_negative, label_neutral, low_confidence, score_below_threshold, "
        "no_score, after_error.",
    )
    label: int | None = Field(description="The step's consensus label, if any.")
    confidence: float | None
    score: float | None = Field(description="The rubric judge's mean 1-10 score, if graded.")
    policy: str = Field(description="Filter settings id (min_label, min_score, ...).")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("rollout_id", pa.string()),
            ("node_id", pa.string()),
            ("problem_id", pa.string()),
            ("step_index", pa.int32()),
            ("kept", pa.bool_()),
            ("reason", pa.string()),
            ("label", pa.int8()),
            ("confidence", pa.float64()),
            ("score", pa.float64()),
            ("policy", pa.string()),
        ]
    )


class Augmentation(Record):
    """Reasoning written for a kept agent step: why this action, given the context (and its result)."""

    TABLE: ClassVar[str] = "augmentations"
    node_id: str
    problem_id: str
    reasoning: str = Field(min_length=1, description="The written reasoning that leads to the step's action.")
    original: str = Field(description="The thought the agent wrote itself (may be empty).")
    model: str
    generation_key: str
    cost_tokens: int = Field(ge=0)

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("node_id", pa.string()),
            ("problem_id", pa.string()),
            ("reasoning", pa.string()),
            ("original", pa.string()),
            ("model", pa.string()),
            ("generation_key", pa.string()),
            ("cost_tokens", pa.int64()),
        ]
    )


class ReviewItem(Record):
    """A trajectory sent to human review: which Label Studio task shows it, and why it was sent."""

    TABLE: ClassVar[str] = "review_items"
    item_id: str = Field(description="Stable per run and rollout: a second push finds the task the first made.")
    rollout_id: str
    problem_id: str
    node_ids: list[str] = Field(description="The steps shown, in order (result label_<i> is node_ids[i]).")
    reasons: str = Field(description="'+'-joined policies that sent it: disagreement, low_confidence, sql, audit.")
    project: str = Field(description="Label Studio project title.")
    project_id: int
    task_id: int
    prediction_policy: str | None = Field(description="Consensus policy id of the labels shown as the prediction.")
    pushed_at: float = Field(description="Unix time of the push.")

    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("item_id", pa.string()),
            ("rollout_id", pa.string()),
            ("problem_id", pa.string()),
            ("node_ids", pa.list_(pa.string())),
            ("reasons", pa.string()),
            ("project", pa.string()),
            ("project_id", pa.int64()),
            ("task_id", pa.int64()),
            ("prediction_policy", pa.string()),
            ("pushed_at", pa.float64()),
        ]
    )


RECORD_TYPES: dict[str, type[Record]] = {
    cls.TABLE: cls
    for cls in (Problem, Node, Rollout, Evaluation, Label, Pair, Reject, EvalResult, StepDecision, Augmentation, ReviewItem)
}
TABLES = tuple(RECORD_TYPES)


def to_arrow(table: str, rows: list[Record] | list[dict]) -> pa.Table:
    """Rows of one table to an Arrow table with that table's exact schema."""
    schema = RECORD_TYPES[table].ARROW_SCHEMA
    dicts = [r.model_dump() if isinstance(r, BaseModel) else r for r in rows]
    return pa.Table.from_pylist(dicts, schema=schema)
