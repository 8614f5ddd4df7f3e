"""Human review of step labels in Label Studio: which trajectories people see, how they are shown,
and how their clicks come back as ``human`` evaluations.

Pure functions only (no network): ``flows/review.py`` talks to the server with label-studio-sdk.

- **select**: a trajectory goes to review when its steps' sources disagree, when a label's
  consensus confidence is low, when a seeded random audit picks it (so automatic labels are
  measured, not only corrected), or when a SQL query over the catalog names it.
- **task**: one Label Studio task per trajectory: the problem and each step with the automatic
  label as a prediction (model version = the consensus policy id, score = its confidence) that
  pre-fills the annotation. Audit items are shown blind (no prediction, no automatic label in
  the step titles): a pre-filled label anchors the annotator, and the audit sample is what
  measures the automatic labels.
- **annotations → evidence**: each per-step choice becomes a ``human`` Evaluation carrying the
  annotator, the time and the correction; a cancelled (skipped) annotation or a result that
  does not fit the labelling view becomes a Reject with a reason.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation
from stepforge.stages.agent.trajectory import agent_meta, render_transcript, step_messages
from stepforge.stages.consensus.policy import ConsensusConfig, judge_opinion, mc_opinion, tool_opinion

VERSION = 1
STAGE = "review"

Policy = Literal["disagreement", "low_confidence", "audit", "sql"]


class ReviewConfig(BaseModel):
    """Where the Label Studio server is and which trajectories go to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(default="http://127.0.0.1:8080", description="Label Studio's base URL.")
    token_env: str = Field(
        default="LABEL_STUDIO_API_KEY",
        description="Environment variable holding the Label Studio API token (never a config value: configs are "
        "stored in runs, shards and Prefect parameters).",
    )
    token_file: Path | None = Field(
        default=None, description="A file holding the API token; read when set (the environment variable is then ignored)."
    )
    project: str | None = Field(
        default=None, description="Title of the Label Studio project; default 'stepforge <run>'."
    )
    policies: tuple[Policy, ...] = Field(
        default=("disagreement", "low_confidence", "audit"),
        description="Why a trajectory is sent: its sources disagree on a step, a step's consensus confidence is "
        "below low_confidence, the random audit picked it, or the sql query names it.",
    )
    low_confidence: float = Field(
        default=0.6, ge=0.0, le=1.0, description="A step whose consensus label has a lower confidence sends its trajectory."
    )
    audit_rate: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="Fraction of all trajectories sent at random (seeded by audit_seed and the rollout id), whatever "
        "their labels: the sample that measures the automatic labels.",
    )
    audit_seed: int = Field(default=0, description="Seed of the audit sample.")
    sql: str | None = Field(
        default=None,
        description="A DuckDB query over the run's catalog (views problems, rollouts, nodes, evaluations, labels, ...) "
        "returning a rollout_id column: those trajectories are sent (policy 'sql').",
    )
    max_items: int | None = Field(
        default=200, ge=1, description="At most this many new trajectories per push (disagreement first, then low "
        "confidence, sql, audit); none for no limit.",
    )
    timeout_seconds: float = Field(default=30.0, gt=0, description="Per-request timeout of the Label Studio API.")
    page_size: int = Field(default=100, ge=1, le=1000, description="Tasks per page when reading annotations back.")


# -- records -------------------------------------------------------------------------------
CHOICES: dict[str, int] = {"correct": 1, "incorrect": -1, "neutral": 0}
CHOICE_OF = {v: k for k, v in CHOICES.items()}
POLICY_ORDER: tuple[Policy, ...] = ("disagreement", "low_confidence", "sql", "audit")


def item_id(run: str, rollout_id: str) -> str:
    """A trajectory's review item: stable per run, so a second push finds the task the first made."""
    return content_hash("review-item", run, rollout_id)[:24]


def label_config() -> str:
    """The labelling view: the problem, then per step its text, correct / incorrect / neutral and a correction.

    ``Repeater`` expands one block per element of ``$steps``; the controls are named
    ``label_<i>`` / ``correction_<i>`` after the step's position, which is how results come back.
    """
    return """<View>
  <Header value="Problem"/>
  <Text name="problem" value="$problem"/>
  <Header value="$trajectory_note" size="6"/>
  <Repeater on="$steps" indexFlag="{{idx}}">
    <View style="border-top: 1px solid #ddd; padding-top: 8px; margin-top: 8px">
      <Header value="$steps[{{idx}}].title" size="5"/>
      <Text name="step_{{idx}}" value="$steps[{{idx}}].text"/>
      <Choices name="label_{{idx}}" toName="step_{{idx}}" choice="single" showInline="true">
        <Choice value="correct" hint="The step is right and moves towards the answer"/>
        <Choice value="incorrect" hint="The step has an error (calculation, logic, wrong action)"/>
        <Choice value="neutral" hint="Neither helps nor hurts"/>
      </Choices>
      <TextArea name="correction_{{idx}}" toName="step_{{idx}}" placeholder="Optional: the corrected step"
                rows="2" maxSubmissions="1" editable="true"/>
    </View>
  </Repeater>
</View>"""


# -- selection -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    rollout_id: str
    problem_id: str
    reasons: tuple[str, ...]


def disagreeing_nodes(evaluations: Iterable[dict], consensus: ConsensusConfig) -> set[str]:
    """Steps on which the automatic sources (mc, judge, tool) do not all give the same sign."""
    by_node: dict[str, list[dict]] = defaultdict(list)
    for e in evaluations:
        if e["source"] != "human":
            by_node[e["node_id"]].append(e)
    out = set()
    for nid, evidence in by_node.items():
        opinions = (mc_opinion(evidence, consensus, hard=True), judge_opinion(evidence), tool_opinion(evidence, consensus))
        signs = {o.label for o in opinions if o is not None and o.label != 0}
        if len(signs) > 1:
            out.add(nid)
    return out


def audit_picks(rollout_id: str, config: ReviewConfig) -> bool:
    """A seeded coin per trajectory: the same trajectories are in the audit sample on every push."""
    if config.audit_rate <= 0:
        return False
    draw = int(content_hash("audit", config.audit_seed, rollout_id)[:12], 16) / 16**12
    return draw < config.audit_rate


def select(
    rollouts: Iterable[dict],
    labels: Iterable[dict],
    evaluations: Iterable[dict],
    config: ReviewConfig,
    consensus: ConsensusConfig,
    sql_rollouts: Iterable[str] = (),
) -> list[Candidate]:
    """Trajectories (policy solutions and imported ones, not MC completions) that the policies send,
    most urgent first: disagreement, then low confidence, then the SQL selection, then the audit."""
    policies = set(config.policies)
    label_of = {row["node_id"]: row for row in labels}
    disagree = disagreeing_nodes(evaluations, consensus) if "disagreement" in policies else set()
    sql_ids = set(sql_rollouts) if "sql" in policies else set()
    out = []
    for r in sorted(rollouts, key=lambda r: r["rollout_id"]):
        if r["prefix_node_id"] is not None or not r["node_ids"]:
            continue
        reasons = []
        if disagree.intersection(r["node_ids"]):
            reasons.append("disagreement")
        if "low_confidence" in policies and any(
            (label := label_of.get(nid)) is not None and label["confidence"] < config.low_confidence for nid in r["node_ids"]
        ):
            reasons.append("low_confidence")
        if r["rollout_id"] in sql_ids:
            reasons.append("sql")
        if "audit" in policies and audit_picks(r["rollout_id"], config):
            reasons.append("audit")
        if reasons:
            out.append(Candidate(r["rollout_id"], r["problem_id"], tuple(reasons)))
    out.sort(key=lambda c: min(POLICY_ORDER.index(reason) for reason in c.reasons))
    return out


# -- tasks ---------------------------------------------------------------------------------
def _step_view(problem: dict, text: str) -> str:
    if agent_meta(problem.get("meta") or "{}") is None:
        return text
    return render_transcript(step_messages(text), max_observation_chars=2000)


def build_task(
    run: str, candidate: Candidate, problem: dict, rollout: dict, nodes: dict[str, dict], labels: dict[str, dict],
    policy_id: str,
) -> dict:
    """One Label Studio task: data the view shows and ids the pull needs, with the automatic labels
    as a prediction (model version = consensus policy id, score = mean label confidence), except
    for audit items, which annotators label blind."""
    blind = "audit" in candidate.reasons
    steps, result, confidences = [], [], []
    for index, nid in enumerate(rollout["node_ids"]):
        label = labels.get(nid)
        auto = CHOICE_OF[label["label"]] if label is not None else "unlabelled"
        title = f"Step {index + 1}" if blind else f"Step {index + 1} · automatic: {auto}"
        if label is not None and not blind:
            title += f" ({label['confidence']:.2f})"
        steps.append({"idx": index, "node_id": nid, "text": _step_view(problem, nodes[nid]["text"]), "title": title,
                      "automatic": auto})
        if label is not None:
            confidences.append(label["confidence"])
            result.append({
                "id": f"auto-{index}", "from_name": f"label_{index}", "to_name": f"step_{index}", "type": "choices",
                "value": {"choices": [auto]},
            })
    agent = agent_meta(problem.get("meta") or "{}")
    question = render_transcript(agent.get("context") or [], 4000) if agent else problem["question"]
    data = {
        "item_id": item_id(run, rollout["rollout_id"]), "run": run, "problem_id": rollout["problem_id"],
        "rollout_id": rollout["rollout_id"], "problem": question, "steps": steps,
        "reasons": ", ".join(candidate.reasons),
        "trajectory_note": f"Sent for review: {', '.join(candidate.reasons)} · final answer: {rollout.get('final_answer')}"
        + (f" (gold: {problem['gold_answer']})" if problem.get("gold_answer") else ""),
    }
    task: dict = {"data": data}
    if result and not blind:
        task["predictions"] = [{
            "model_version": policy_id, "score": round(sum(confidences) / len(confidences), 6), "result": result,
        }]
    return task


# -- annotations → evidence ----------------------------------------------------------------
class AnnotationError(ValueError):
    """An annotation that does not fit the labelling view; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def annotation_version(annotation: dict) -> str:
    """What identifies one state of an annotation: it is edited in place, so id plus last update."""
    return f"{annotation['id']}@{annotation.get('updated_at') or annotation.get('created_at')}"


def _step_index(name: str, prefix: str, steps: int) -> int:
    index = name[len(prefix):]
    if not index.isdigit() or int(index) >= steps:
        raise AnnotationError("unknown_step", f"result {name!r} names no step of this task ({steps} steps)")
    return int(index)


def parse_annotation(task: dict, annotation: dict, annotator: str | None = None) -> list[Evaluation]:
    """The human evaluations of one annotation of one task. Raises AnnotationError when it is cancelled
    or does not fit the view. A step without a label gives no evaluation; a pre-filled (predicted)
    label submitted unchanged is the annotator's confirmation, kept with ``meta.origin`` =
    'prediction' (Label Studio marks edited ones 'prediction-changed', new ones 'manual')."""
    data = task.get("data") or {}
    steps = data.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, dict) and "node_id" in s for s in steps):
        raise AnnotationError("task_not_stepforge", "the task has no steps list with node ids (not pushed by stepforge)")
    if annotation.get("was_cancelled"):
        raise AnnotationError("annotation_cancelled", "the annotator skipped the task")
    result = annotation.get("result")
    if not isinstance(result, list):
        raise AnnotationError("malformed_result", f"result is {type(result).__name__}, not a list")
    verdicts: dict[int, int] = {}
    origins: dict[int, str | None] = {}
    corrections: dict[int, str] = {}
    for region in result:
        if not isinstance(region, dict) or not isinstance(region.get("from_name"), str):
            raise AnnotationError("malformed_result", f"result item without from_name: {str(region)[:200]}")
        name, value = region["from_name"], region.get("value") or {}
        if name.startswith("label_"):
            index = _step_index(name, "label_", len(steps))
            choices = value.get("choices")
            if not isinstance(choices, list) or len(choices) != 1 or choices[0] not in CHOICES:
                raise AnnotationError("unknown_choice", f"{name}: choices {choices!r} are not one of {sorted(CHOICES)}")
            verdicts[index] = CHOICES[choices[0]]
            origins[index] = region.get("origin")
        elif name.startswith("correction_"):
            index = _step_index(name, "correction_", len(steps))
            text = value.get("text")
            text = "\n".join(text) if isinstance(text, list) else text
            if text is not None and not isinstance(text, str):
                raise AnnotationError("malformed_result", f"{name}: text is {type(text).__name__}")
            if text and text.strip():
                corrections[index] = text.strip()
        else:
            raise AnnotationError("unknown_control", f"result from {name!r}: not a control of the stepforge view")
    if not verdicts and not corrections:
        raise AnnotationError("empty_annotation", "the annotation labels no step")
    orphan = sorted(set(corrections) - set(verdicts))
    if orphan:
        raise AnnotationError(
            "correction_without_label", f"step(s) {', '.join(str(i + 1) for i in orphan)} have a correction but no label"
        )
    who = annotator or str(annotation.get("completed_by"))
    out = []
    for index in sorted(verdicts):
        step = steps[index]
        verdict = verdicts[index]
        meta = {
            "annotation_id": annotation["id"], "version": annotation_version(annotation), "task_id": task.get("id"),
            "item_id": data.get("item_id"), "rollout_id": data.get("rollout_id"), "step_index": index,
            "annotator": who, "annotator_id": annotation.get("completed_by"),
            "created_at": annotation.get("created_at"), "updated_at": annotation.get("updated_at"),
            "lead_time": annotation.get("lead_time"), "correction": corrections.get(index),
            "automatic": step.get("automatic"), "origin": origins.get(index),
        }
        out.append(Evaluation(
            evaluation_id=content_hash("human-review", annotation["id"], step["node_id"]), node_id=step["node_id"],
            problem_id=data["problem_id"], source="human", value=None, n=1, successes=int(verdict == 1),
            verdict=verdict, confidence=None, rationale=corrections.get(index), model=None,
            meta=json.dumps(meta, sort_keys=True),
        ))
    return out


def latest(evaluations: Iterable[dict]) -> list[dict]:
    """Human review evidence as it stands: each annotation's latest version only (an edited
    annotation replaces its earlier rows; several pulls of one version count once)."""
    rows = list(evaluations)
    newest: dict[object, tuple[str, str]] = {}
    for row in rows:
        meta = json.loads(row["meta"])
        stamp = (meta.get("updated_at") or "", meta["version"])
        if stamp > newest.get(meta["annotation_id"], ("", "")):
            newest[meta["annotation_id"]] = stamp
    seen, out = set(), []
    for row in rows:
        meta = json.loads(row["meta"])
        if meta["version"] == newest[meta["annotation_id"]][1] and row["evaluation_id"] not in seen:
            seen.add(row["evaluation_id"])
            out.append(row)
    return sorted(out, key=lambda r: r["evaluation_id"])


# -- agreement -----------------------------------------------------------------------------
@dataclass
class Agreement:
    """How annotators agree where several labelled the same step."""

    steps_multi: int = 0  # steps with at least two annotations
    pairs: int = 0
    agreeing_pairs: int = 0
    alpha: float | None = None  # Krippendorff's alpha (nominal) over those steps
    conflicts: list[dict] = field(default_factory=list)

    @property
    def pairwise(self) -> float | None:
        return self.agreeing_pairs / self.pairs if self.pairs else None


def agreement(human: Iterable[dict]) -> Agreement:
    """Pairwise agreement, Krippendorff's alpha and the conflicting steps of the latest human evidence."""
    by_node: dict[str, list[dict]] = defaultdict(list)
    for row in human:
        by_node[row["node_id"]].append(row)
    report = Agreement()
    coincidence: dict[tuple[int, int], float] = defaultdict(float)
    for nid, rows in sorted(by_node.items()):
        if len(rows) < 2:
            continue
        report.steps_multi += 1
        verdicts = [int(r["verdict"]) for r in rows]
        m = len(verdicts)
        for i in range(m):
            for j in range(m):
                if i != j:
                    coincidence[(verdicts[i], verdicts[j])] += 1 / (m - 1)
        for i in range(m):
            for j in range(i + 1, m):
                report.pairs += 1
                report.agreeing_pairs += verdicts[i] == verdicts[j]
        if len(set(verdicts)) > 1:
            metas = [json.loads(r["meta"]) for r in rows]
            report.conflicts.append({
                "node_id": nid, "problem_id": rows[0]["problem_id"], "rollout_id": metas[0].get("rollout_id"),
                "step_index": metas[0].get("step_index"),
                "votes": {m["annotator"]: CHOICE_OF[int(r["verdict"])] for m, r in zip(metas, rows)},
            })
    total = sum(coincidence.values())
    if total > 1:
        marginal: dict[int, float] = defaultdict(float)
        for (a, _b), count in coincidence.items():
            marginal[a] += count
        observed = sum(count for (a, b), count in coincidence.items() if a != b) / total
        expected = sum(marginal[a] * marginal[b] for a in marginal for b in marginal if a != b) / (total * (total - 1))
        report.alpha = 1.0 - observed / expected if expected else 1.0
    return report
