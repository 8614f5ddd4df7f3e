"""ProcessBench scoring: references read per row, predictions from labels, the metric."""

from __future__ import annotations

import json

import pytest

from stepforge.stages.verify.evaluate import processbench_metrics, processbench_results
from stepforge.stages.ingest.importers import import_evaluation_id


def human(rollout_id: str, step: int, node: str, verdict: int, row: str) -> dict:
    return {"evaluation_id": import_evaluation_id("processbench", rollout_id, step), "node_id": node,
            "source": "human", "verdict": verdict, "meta": json.dumps({"imported": "processbench", "row": row})}


def test_rows_sharing_a_step_keep_their_own_reference() -> None:
    # Two generators' solutions share step "a"; row A says it is the first error, row B that it is fine.
    rollouts = [{"rollout_id": "A", "problem_id": "p", "node_ids": ["a", "b"]},
                {"rollout_id": "B", "problem_id": "p", "node_ids": ["a", "c"]}]
    reference = [human("A", 0, "a", -1, "row-A"), human("B", 0, "a", 1, "row-B"), human("B", 1, "c", 1, "row-B")]
    labels = [{"node_id": "a", "label": 1, "reason": "fine"}, {"node_id": "c", "label": -1, "reason": "3*4 is 12"}]
    results = {r.item: r for r in processbench_results(rollouts, reference, labels, "m")}
    assert (results["row-A"].reference, results["row-A"].predicted, results["row-A"].correct) == (0, -1, False)
    assert (results["row-B"].reference, results["row-B"].predicted) == (-1, 1)
    assert results["row-B"].detail == "3*4 is 12" and results["row-B"].labelled_steps == 2


def test_neutral_labels_count_as_errors_only_when_asked() -> None:
    rollouts = [{"rollout_id": "A", "problem_id": "p", "node_ids": ["a", "b"]}]
    reference = [human("A", 0, "a", 1, "r"), human("A", 1, "b", -1, "r")]
    labels = [{"node_id": "a", "label": 0, "reason": "neutral"}, {"node_id": "b", "label": -1, "reason": "x"}]
    (positive,) = processbench_results(rollouts, reference, labels, "m", neutral_as="positive")
    (negative,) = processbench_results(rollouts, reference, labels, "m", neutral_as="negative")
    assert (positive.predicted, positive.correct) == (1, True)
    assert (negative.predicted, negative.correct) == (0, False)


def test_rollouts_without_a_reference_are_not_scored() -> None:
    rollouts = [{"rollout_id": "generated", "problem_id": "p", "node_ids": ["a"]}]
    assert list(processbench_results(rollouts, [], [], "m")) == []


def test_the_metric_is_the_harmonic_mean_of_the_two_accuracies() -> None:
    rows = [
        {"reference": 2, "correct": True, "num_steps": 4, "labelled_steps": 4},
        {"reference": 1, "correct": False, "num_steps": 4, "labelled_steps": 2},
        {"reference": -1, "correct": True, "num_steps": 2, "labelled_steps": 2},
    ]
    metrics = processbench_metrics(rows)
    assert (metrics["acc_error"], metrics["acc_correct"]) == (0.5, 1.0)
    assert metrics["f1"] == pytest.approx(2 * 0.5 / 1.5) and metrics["coverage"] == pytest.approx(0.8)
    assert processbench_metrics(rows[:2])["f1"] is None, "no all-correct rows: F1 is undefined, not 0"
