"""The review loop's pure parts: selection, tasks, annotations → evidence, agreement, consensus keys."""

from __future__ import annotations

import json

import pytest

from stepforge.schemas.records import Reject
from stepforge.stages.consensus import policy as consensus
from stepforge.stages.consensus.policy import ConsensusConfig
from stepforge.stages.review.annotations import (
    AnnotationError,
    Candidate,
    ReviewConfig,
    agreement,
    audit_picks,
    build_task,
    label_config,
    latest,
    parse_annotation,
    select,
)

STEPS = [{"idx": i, "node_id": f"n{i}", "text": f"step {i}", "automatic": "correct"} for i in range(3)]
TASK = {"id": 7, "data": {"item_id": "it", "problem_id": "p", "rollout_id": "r", "steps": STEPS}}


def annotation(result, *, id=1, updated="2026-11-23T04:00:00Z", cancelled=False, who=3):
    return {"id": id, "result": result, "was_cancelled": cancelled, "completed_by": who, "updated_at": updated,
            "created_at": updated, "lead_time": 4.2}


def choice(i, value, score=None):
    region = {"from_name": f"label_{i}", "to_name": f"step_{i}", "type": "choices", "value": {"choices": [value]}}
    if score is not None:
        region["score"] = score
    return region


def correction(i, text):
    return {"from_name": f"correction_{i}", "to_name": f"step_{i}", "type": "textarea", "value": {"text": [text]}}


def test_an_annotation_becomes_one_human_evaluation_per_labelled_step():
    rows = parse_annotation(TASK, annotation([choice(0, "correct", score=0.42), choice(1, "incorrect"),
                                              correction(1, "7 * 6 = 42")]), annotator="ann@example.com")
    assert [(r.node_id, r.verdict) for r in rows] == [("n0", 1), ("n1", -1)], "step 2 was left alone: no evidence"
    assert all(r.source == "human" and r.problem_id == "p" for r in rows)
    # The prediction's score travels on a result the annotator accepted; it is not the human's confidence.
    assert all(r.confidence is None for r in rows)
    meta = json.loads(rows[1].meta)
    assert meta["annotator"] == "ann@example.com" and meta["correction"] == "7 * 6 = 42"
    assert meta["updated_at"] == "2026-11-23T04:00:00Z" and meta["lead_time"] == 4.2 and meta["step_index"] == 1
    assert rows[1].rationale == "7 * 6 = 42"
    again = parse_annotation(TASK, annotation([choice(1, "incorrect")], updated="2026-11-23T05:00:00Z"))
    assert again[0].evaluation_id == rows[1].evaluation_id, "one annotation, one step: one id across edits"


@pytest.mark.parametrize(
    ("result", "kwargs", "reason"),
    [
        ([choice(0, "correct")], {"cancelled": True}, "annotation_cancelled"),
        ({"not": "a list"}, {}, "malformed_result"),
        (["label_0"], {}, "malformed_result"),
        ([choice(0, "maybe")], {}, "unknown_choice"),
        ([choice(5, "correct")], {}, "unknown_step"),
        ([{"from_name": "label_x", "value": {"choices": ["correct"]}}], {}, "unknown_step"),
        ([{"from_name": "sentiment", "value": {"choices": ["positive"]}}], {}, "unknown_control"),
        ([correction(0, "better")], {}, "correction_without_label"),
        ([], {}, "empty_annotation"),
    ],
)
def test_an_annotation_that_does_not_fit_the_view_is_rejected_with_a_reason(result, kwargs, reason):
    with pytest.raises(AnnotationError) as caught:
        parse_annotation(TASK, annotation(result, **kwargs))
    assert caught.value.reason == reason
    Reject(stage="review", item="annotation:1", reason=caught.value.reason, detail=str(caught.value))  # a valid row


def test_a_task_not_made_by_stepforge_is_rejected():
    with pytest.raises(AnnotationError) as caught:
        parse_annotation({"id": 1, "data": {"text": "hello"}}, annotation([choice(0, "correct")]))
    assert caught.value.reason == "task_not_stepforge"


def _rows(*annotations):
    return [r.model_dump() for a, who in annotations for r in parse_annotation(TASK, a, annotator=who)]


def test_latest_keeps_each_annotations_newest_version_once():
    old = annotation([choice(0, "correct"), choice(1, "correct")], updated="2026-11-23T04:00:00Z")
    new = annotation([choice(0, "incorrect")], updated="2026-11-23T05:00:00Z")
    other = annotation([choice(0, "correct")], id=2, who=4)
    rows = _rows((old, "a"), (new, "a"), (new, "a"), (other, "b"))  # the new version pulled twice
    current = latest(rows)
    assert sorted((json.loads(r["meta"])["annotation_id"], r["node_id"], r["verdict"]) for r in current) == [
        (1, "n0", -1), (2, "n0", 1),
    ], "the edit removed annotation 1's label on step 1 and flipped step 0"


def test_agreement_counts_pairs_alpha_and_conflicts():
    a = annotation([choice(0, "correct"), choice(1, "incorrect"), choice(2, "correct")], id=1)
    b = annotation([choice(0, "correct"), choice(1, "correct"), choice(2, "correct")], id=2)
    report = agreement(latest(_rows((a, "ann1"), (b, "ann2"))))
    assert report.steps_multi == 3 and report.pairs == 3 and report.agreeing_pairs == 2
    assert report.pairwise == pytest.approx(2 / 3)
    # Krippendorff's alpha (nominal): coincidences +1/+1: 4, +1/-1: 1, -1/+1: 1 → n=6, D_o=2/6,
    # D_e = (5*1 + 1*5) / (6*5) = 1/3 → alpha = 1 - (1/3)/(1/3) = 0.
    assert report.alpha == pytest.approx(0.0)
    assert [c["node_id"] for c in report.conflicts] == ["n1"]
    assert report.conflicts[0]["votes"] == {"ann1": "incorrect", "ann2": "correct"}
    unanimous = agreement(latest(_rows((a, "ann1"), (annotation(a["result"], id=3), "ann3"))))
    assert unanimous.alpha == pytest.approx(1.0) and not unanimous.conflicts


def test_humans_override_consensus_and_a_tie_is_not_a_vouch():
    a = annotation([choice(0, "correct"), choice(1, "incorrect")], id=1)
    b = annotation([choice(0, "correct"), choice(1, "correct")], id=2)
    machine = [{"evaluation_id": f"t{i}", "node_id": f"n{i}", "problem_id": "p", "source": "tool", "value": None,
                "n": 1, "successes": 0, "verdict": -1, "confidence": 1.0, "rationale": "false", "meta": "{}"}
               for i in range(2)]
    labels = {lab.node_id: lab for lab in consensus.run(machine + latest(_rows((a, "x"), (b, "y"))), ConsensusConfig(policy="tool"))}
    assert labels["n0"].label == 1 and labels["n0"].confidence == 1.0 and labels["n0"].sources == "human"
    assert labels["n1"].label == -1 and labels["n1"].confidence == 0.5, "1 vs 1: the more severe label, half sure"


def _evidence(node, source, verdict=None, successes=0, n=0):
    return {"evaluation_id": f"{node}-{source}", "node_id": node, "problem_id": "p", "source": source, "value": None,
            "n": n, "successes": successes, "verdict": verdict, "confidence": None, "meta": "{}"}


def test_selection_by_disagreement_low_confidence_sql_and_audit():
    rollouts = [
        {"rollout_id": f"r{i}", "problem_id": "p", "prefix_node_id": None, "node_ids": [f"a{i}", f"b{i}"]} for i in range(40)
    ] + [{"rollout_id": "mc", "problem_id": "p", "prefix_node_id": "a0", "node_ids": ["a0", "x"]}]
    evaluations = [_evidence("b1", "mc", successes=2, n=4), _evidence("b1", "judge", verdict=-1, n=1),  # disagree
                   _evidence("b2", "mc", successes=0, n=4), _evidence("b2", "judge", verdict=-1, n=1)]  # agree
    labels = [{"node_id": f"a{i}", "label": 1, "confidence": 0.9 if i != 3 else 0.2} for i in range(40)]
    cfg = ReviewConfig(audit_rate=0.25, audit_seed=1)
    chosen = select(rollouts, labels, evaluations, cfg, ConsensusConfig(), sql_rollouts=["r5"])
    by_id = {c.rollout_id: c.reasons for c in chosen}
    assert "mc" not in by_id, "MC completions are not trajectories to review"
    assert "disagreement" in by_id["r1"] and "disagreement" not in by_id.get("r2", ())
    assert "low_confidence" in by_id["r3"]
    assert "r5" not in by_id or by_id["r5"] == ("audit",), "sql is not among the default policies"
    audited = [rid for rid, reasons in by_id.items() if "audit" in reasons]
    assert 4 <= len(audited) <= 18, "about a quarter of 40"
    assert set(audited) == {r["rollout_id"] for r in rollouts[:40] if audit_picks(r["rollout_id"], cfg)}, "seeded, stable"
    assert chosen[0].rollout_id == "r1", "disagreement first"
    with_sql = select(rollouts, labels, evaluations, cfg.model_copy(update={"policies": ("sql",)}), ConsensusConfig(),
                      sql_rollouts=["r5"])
    assert [(c.rollout_id, c.reasons) for c in with_sql] == [("r5", ("sql",))]


def test_a_task_shows_every_step_with_the_automatic_label_as_a_prediction():
    problem = {"problem_id": "p", "question": "What is 6 * 7?", "gold_answer": "42", "meta": "{}"}
    rollout = {"rollout_id": "r", "problem_id": "p", "node_ids": ["n0", "n1"], "final_answer": "41"}
    nodes = {"n0": {"text": "6 * 7 = 41"}, "n1": {"text": "So 41."}}
    labels = {"n0": {"label": -1, "confidence": 0.5}}
    task = build_task("run", Candidate("r", "p", ("low_confidence",)), problem, rollout, nodes, labels, "tool@1+human")
    data = task["data"]
    assert [s["node_id"] for s in data["steps"]] == ["n0", "n1"] and data["steps"][0]["text"] == "6 * 7 = 41"
    assert data["problem"] == "What is 6 * 7?" and "gold: 42" in data["trajectory_note"]
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == "tool@1+human" and prediction["score"] == 0.5
    assert prediction["result"] == [{"id": "auto-0", "from_name": "label_0", "to_name": "step_0", "type": "choices",
                                     "value": {"choices": ["incorrect"]}}], "unlabelled steps get no pre-label"
    assert 'Repeater on="$steps"' in label_config() and 'name="label_{{idx}}"' in label_config()
    # What the view produces comes back through the same parser; a submitted pre-label is a confirmation.
    submitted = [{**prediction["result"][0], "origin": "prediction"}]
    (row,) = parse_annotation({"id": 1, "data": data}, annotation(submitted))
    assert row.node_id == "n0" and row.verdict == -1 and json.loads(row.meta)["origin"] == "prediction"
    blind = build_task("run", Candidate("r", "p", ("low_confidence", "audit")), problem, rollout, nodes, labels, "x")
    assert "predictions" not in blind, "the audit sample is labelled blind"
    assert [s["title"] for s in blind["data"]["steps"]] == ["Step 1", "Step 2"]
