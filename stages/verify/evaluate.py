"""Scoring label sources against reference step labels: ProcessBench's earliest-error metric.

ProcessBench asks one question per solution: which step is the first wrong one (-1 if none)?
A method (a consensus policy over some evidence) answers with the first step of the path its
labels call wrong. The metric (Zheng et al., 2024): accuracy on the rows that have an error
(exact index), accuracy on the rows that have none, and F1 = their harmonic mean.

The reference is the imported human annotation (``human`` evaluations written by the
ProcessBench importer: +1 before the earliest error, -1 at it), so any dataset imported in
that shape can be scored, and the methods never see it (evaluation runs consensus with
``human_override`` off).

A step without a label (no evidence, or dropped by a filtering policy such as ``agreement``)
is not called wrong; ``labelled_steps`` says how much of each path a method covered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Literal

from stepforge.schemas.records import EvalResult
from stepforge.stages.ingest.importers import import_evaluation_id

NeutralAs = Literal["positive", "negative"]
REFERENCE_FORMAT = "processbench"  # the importer whose labels are the reference


def reference_index(verdicts: list[int | None]) -> int | None:
    """Earliest wrong step from per-step reference verdicts (None = unannotated), as the importer's
    ``processbench_reference`` reads them; None when the row has no reference (nothing annotated,
    or an unannotated step before any error)."""
    for index, verdict in enumerate(verdicts):
        if verdict == -1:
            return index
        if verdict is None:
            return None
    return -1 if verdicts else None


def processbench_results(
    rollouts: Iterable[dict],
    reference: Iterable[dict],
    labels: Iterable[dict],
    method: str,
    neutral_as: NeutralAs = "positive",
) -> Iterator[EvalResult]:
    """One result per trajectory that has a complete reference (its imported human verdicts).

    The reference of a step is looked up by the row's own label id, not by node: two rows of one
    problem can share a step and disagree about it.
    """
    human = {e["evaluation_id"]: e for e in reference if e["source"] == "human"}
    label_of = {lab["node_id"]: lab for lab in labels}
    for rollout in sorted(rollouts, key=lambda r: r["rollout_id"]):
        path = rollout["node_ids"]
        own = [human.get(import_evaluation_id(REFERENCE_FORMAT, rollout["rollout_id"], i)) for i in range(len(path))]
        expected = reference_index([e["verdict"] if e else None for e in own])
        if expected is None:
            continue
        item = next((json.loads(e["meta"]).get("row") for e in own if e), None) or rollout["rollout_id"]
        predicted, detail = -1, "no step labelled wrong"
        for index, nid in enumerate(path):
            label = label_of.get(nid)
            if label is None:
                continue
            if label["label"] == -1 or (label["label"] == 0 and neutral_as == "negative"):
                predicted, detail = index, label["reason"]
                break
        yield EvalResult(
            benchmark="processbench", method=method, problem_id=rollout["problem_id"], rollout_id=rollout["rollout_id"],
            item=str(item), num_steps=len(path), reference=expected, predicted=predicted, correct=predicted == expected,
            labelled_steps=sum(nid in label_of for nid in path), detail=detail[:500],
        )


def processbench_metrics(results: Iterable[EvalResult | dict]) -> dict:
    """Accuracy on erroneous rows, on correct rows, their harmonic mean (F1), and coverage."""
    rows = [r.model_dump() if isinstance(r, EvalResult) else r for r in results]
    erroneous = [r for r in rows if r["reference"] >= 0]
    clean = [r for r in rows if r["reference"] < 0]
    acc_error = sum(r["correct"] for r in erroneous) / len(erroneous) if erroneous else None
    acc_correct = sum(r["correct"] for r in clean) / len(clean) if clean else None
    if acc_error is None or acc_correct is None:
        f1 = None
    else:
        f1 = 0.0 if acc_error + acc_correct == 0 else 2 * acc_error * acc_correct / (acc_error + acc_correct)
    steps = sum(r["num_steps"] for r in rows)
    return {
        "rows": len(rows), "erroneous": len(erroneous), "correct_rows": len(clean),
        "acc_error": acc_error, "acc_correct": acc_correct, "f1": f1,
        "coverage": sum(r["labelled_steps"] for r in rows) / steps if steps else None,
    }
