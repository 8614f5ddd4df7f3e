"""Error propagation in consensus: ``all_after`` (every step below a -1 is -1) and ``until_recovered``
(-1 until a step whose own label is +1 repairs the path), on hand-built trees; and on the
AgentProcessBench sample, which of the two the human labels follow."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from stepforge.schemas.records import Label, Reject
from stepforge.stages.consensus import policy as consensus
from stepforge.stages.base import key_settings
from stepforge.stages.consensus.policy import ConsensusConfig

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "agentprocessbench_hotpotqa_dev10.jsonl"
RECOVER = {"propagate_errors": True, "propagation": "until_recovered"}


def ev(node: str, source: str, verdict: int | None, *, confidence: float | None = None, n: int = 1,
       successes: int = 0, rationale: str | None = None) -> dict:
    return {"node_id": node, "problem_id": "p", "source": source, "n": n, "successes": successes,
            "verdict": verdict, "confidence": confidence, "rationale": rationale}


def fail(node: str, why: str = "a check failed") -> dict:
    return ev(node, "tool", -1, confidence=1.0, rationale=why)


def ok(node: str) -> dict:
    return ev(node, "tool", 1, n=2, successes=2)


def tree(*edges: tuple[str, str | None]) -> list[dict]:
    return [{"node_id": nid, "problem_id": "p", "parent_id": parent} for nid, parent in edges]


def chain(*ids: str) -> list[dict]:
    return tree(*zip(ids, (None, *ids[:-1])))


def labels(evidence: list[dict], nodes: list[dict], **config) -> tuple[dict[str, Label], dict[str, Reject]]:
    out = list(consensus.run(evidence, ConsensusConfig(**config), nodes))
    return ({r.node_id: r for r in out if isinstance(r, Label)}, {r.item: r for r in out if isinstance(r, Reject)})


def signs(got: dict[str, Label]) -> dict[str, int]:
    return {nid: label.label for nid, label in got.items()}


# s1 right, s2 wrong, s3 unchecked, s4 right again (repairs), s5 unchecked, s6 wrong again, s7 unchecked.
PATH = chain("s1", "s2", "s3", "s4", "s5", "s6", "s7")
CHECKS = [ok("s1"), fail("s2", "3*4 is 12, not 13"), ok("s4"), fail("s6", "wrong_answer")]


def test_until_recovered_ends_at_a_step_whose_own_evidence_is_positive_and_reopens_at_the_next_error() -> None:
    got, _ = labels(CHECKS, PATH, policy="tool", **RECOVER)
    assert signs(got) == {"s1": 1, "s2": -1, "s3": -1, "s4": 1, "s6": -1, "s7": -1}, "s5: repaired, no evidence: no label"
    assert got["s3"].sources == "tool+propagated" and got["s3"].confidence == 1.0
    assert "below the wrong step s2" in got["s3"].reason and "3*4 is 12, not 13" in got["s3"].reason
    assert got["s4"].sources == "tool" and "repairs the wrong step s2" in got["s4"].reason
    assert got["s4"].confidence == pytest.approx(0.3), "a repair keeps its own (weak) confidence"
    assert "below the wrong step s6" in got["s7"].reason and "wrong_answer" in got["s7"].reason
    assert got["s6"].sources == "tool" and "propagated" not in got["s6"].reason
    assert {label.policy for label in got.values()} == {"tool@1+tool_veto+propagate_until_recovered@1+human"}


def test_all_after_is_unchanged_every_step_below_the_first_error_is_wrong() -> None:
    got, _ = labels(CHECKS, PATH, policy="tool", propagate_errors=True)
    assert signs(got) == {"s1": 1, **{f"s{i}": -1 for i in range(2, 8)}}
    for nid in ("s3", "s4", "s5", "s7"):
        assert got[nid].sources == "tool+propagated" and "below the wrong step s2 (errors propagate)" in got[nid].reason
    assert got["s4"].value is None and got["s1"].policy == "tool@1+tool_veto+propagate+human"
    explicit, _ = labels(CHECKS, PATH, policy="tool", propagate_errors=True, propagation="all_after")
    assert explicit == got
    plain, _ = labels(CHECKS, PATH, policy="tool")
    assert signs(plain) == {"s1": 1, "s2": -1, "s4": 1, "s6": -1}


def test_branches_sharing_a_prefix_recover_or_not_each_on_its_own() -> None:
    nodes = tree(("s1", None), ("s2", "s1"), ("a3", "s2"), ("a4", "a3"), ("b3", "s2"), ("b4", "b3"), ("t2", "s1"))
    evidence = [ok("s1"), fail("s2"), ok("a3"), ev("t2", "judge", 0, confidence=1.0)]
    got, _ = labels(evidence, nodes, policy="vote", **RECOVER)
    assert signs(got) == {"s1": 1, "s2": -1, "a3": 1, "b3": -1, "b4": -1, "t2": 0}, "a4 is below a repair; t2 above the error"
    assert "repairs the wrong step s2" in got["a3"].reason and "below the wrong step s2" in got["b4"].reason
    strict, _ = labels(evidence, nodes, policy="vote", propagate_errors=True)
    assert signs(strict) == {"s1": 1, "s2": -1, "a3": -1, "a4": -1, "b3": -1, "b4": -1, "t2": 0}


def test_no_positive_evidence_is_no_repair_a_neutral_or_unlabelled_step_stays_wrong() -> None:
    nodes = chain("s1", "s2", "s3", "s4", "s5")
    evidence = [ev("s1", "mc", None, n=4, successes=0),     # 0/4 reached the answer: -1
                ev("s2", "judge", 0, confidence=1.0),        # neutral
                ev("s4", "judge", 1, confidence=0.6)]        # s3 has nothing; s4 a hesitant +1
    got, _ = labels(evidence, nodes, policy="vote", tool_veto=False, **RECOVER)
    assert signs(got) == {"s1": -1, "s2": -1, "s3": -1, "s4": 1}
    assert got["s2"].sources == "mc+propagated" and got["s2"].value == 0.0, "the step's own value is kept"
    assert got["s3"].sources == "mc+propagated" and got["s3"].value is None
    assert got["s3"].confidence == got["s1"].confidence, "a propagated label is as sure as the error it comes from"
    assert "repairs the wrong step s1" in got["s4"].reason


def test_a_dropped_step_under_an_open_error_is_labelled_wrong_not_rejected() -> None:
    nodes = chain("s1", "s2", "s3")
    evidence = [ev("s1", "mc", None, n=4, successes=0), ev("s1", "judge", -1, confidence=1.0),
                ev("s2", "mc", None, n=4, successes=3), ev("s2", "judge", -1, confidence=1.0),
                ev("s3", "mc", None, n=4, successes=3), ev("s3", "judge", 1, confidence=1.0)]
    got, dropped = labels(evidence, nodes, policy="agreement", tool_veto=False, **RECOVER)
    assert signs(got) == {"s1": -1, "s2": -1, "s3": 1} and not dropped
    assert got["s2"].sources == "judge+mc+propagated" and "repairs the wrong step s1" in got["s3"].reason
    kept, dropped = labels(evidence, nodes, policy="agreement", tool_veto=False)
    assert set(kept) == {"s1", "s3"} and dropped["s2"].reason == "sources_disagree"


def test_human_labels_are_a_steps_own_label_they_open_and_repair_errors() -> None:
    nodes = chain("s1", "s2", "s3", "s4", "s5", "s6", "s7")
    evidence = [ok("s1"), ev("s1", "human", -1),          # the human overrules the checks: an error
                ok("s2"), ev("s2", "human", 0),           # neutral under the error: kept 0, repairs nothing
                ev("s4", "human", 1),                     # unchecked, but a human says right: repaired
                fail("s5"), ev("s6", "human", -1)]
    got, _ = labels(evidence, nodes, policy="tool", **RECOVER)
    assert signs(got) == {"s1": -1, "s2": 0, "s3": -1, "s4": 1, "s5": -1, "s6": -1, "s7": -1}
    assert got["s1"].sources == "human" and got["s2"].sources == "human"
    assert got["s3"].sources == "human+propagated" and "below the wrong step s1" in got["s3"].reason
    assert got["s4"].sources == "human" and "repairs the wrong step s1" in got["s4"].reason
    assert "human: 1/1 annotations say +1" in got["s4"].reason
    assert got["s7"].sources == "human+propagated" and "below the wrong step s6" in got["s7"].reason
    # Without human_override human evidence is ignored, for the repair too.
    ignored, _ = labels(evidence, nodes, policy="tool", human_override=False, **RECOVER)
    assert signs(ignored) == {"s1": 1, "s2": 1, "s5": -1, "s6": -1, "s7": -1}
    # all_after as before: humans replace their steps' labels after propagation and propagate nothing.
    strict, _ = labels(evidence, nodes, policy="tool", propagate_errors=True)
    assert signs(strict) == {"s1": -1, "s2": 0, "s4": 1, "s5": -1, "s6": -1, "s7": -1}
    assert strict["s7"].sources == "tool+propagated" and "s3" not in strict


def test_a_long_path_is_walked_without_recursion() -> None:
    ids = [f"n{i:05d}" for i in range(5000)]
    evidence = [fail(ids[10]), ok(ids[4000])]
    got, _ = labels(evidence, chain(*ids), policy="tool", **RECOVER)
    assert all(got[nid].label == -1 for nid in ids[10:4000]) and got[ids[4000]].label == 1
    assert not any(nid in got for nid in ids[4001:])


def test_the_setting_leaves_existing_keys_and_ids_alone() -> None:
    old_keys = {"policy", "soft_threshold", "tool_veto", "propagate_errors", "human_override", "weights",
                "tool_pass_confidence"}
    for config in (ConsensusConfig(), ConsensusConfig(policy="vote", propagate_errors=True)):
        assert set(key_settings(config)) == old_keys, "the default propagation enters no key"
    assert key_settings(ConsensusConfig(**RECOVER))["propagation"] == "until_recovered"
    assert ConsensusConfig(policy="vote", propagate_errors=True, human_override=False).policy_id == "vote@1+tool_veto+propagate"
    assert ConsensusConfig(policy="vote", **RECOVER).policy_id == "vote@1+tool_veto+propagate_until_recovered@1+human"
    # The stage key reads the same settings.
    ctx = SimpleNamespace(config=SimpleNamespace(consensus=ConsensusConfig(propagate_errors=True)),
                          human_evidence=lambda shard: [])
    assert consensus.SPEC.key(ctx, "shard") == [key_settings(ConsensusConfig(propagate_errors=True))]
    # A run recorded before the setting existed reads back as all_after.
    from stepforge.flows.runtime.context import upgrade_recorded

    recorded = upgrade_recorded({"consensus": {"policy": "vote", "propagate_errors": True}})
    assert recorded["consensus"]["propagation"] == "all_after"


def test_until_recovered_without_propagate_errors_is_an_error_not_a_silent_no_op() -> None:
    with pytest.raises(ValidationError, match="propagate_errors"):
        ConsensusConfig(propagation="until_recovered")


# -- AgentProcessBench's human labels --------------------------------------------------------
@pytest.fixture(scope="module")
def sample():
    """The sample's steps, human labels and tool checks. It has no licence upstream, so it is read
    from ../shared/data (see its README) and never copied into the project's fixtures."""
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} not found (the AgentProcessBench sample lives outside the project)")
    from stepforge.schemas.records import Evaluation, Node, Problem, Rollout
    from stepforge.stages.ingest.sources import IngestConfig, run as ingest
    from stepforge.stages.rollout.answers import AnswerChecker
    from stepforge.stages.verify import agent_checks

    records = list(ingest(IngestConfig(source=str(SAMPLE), format="agent_messages")))
    problems = [r for r in records if isinstance(r, Problem)]
    nodes = [r.model_dump() for r in records if isinstance(r, Node)]
    rollouts = [r.model_dump() for r in records if isinstance(r, Rollout)]
    human = {r.node_id: r.verdict for r in records if isinstance(r, Evaluation) and r.source == "human"}
    checker = AnswerChecker()
    try:
        tool = [e.model_dump() for e in agent_checks.run(
            problems, rollouts, nodes, agent_checks.AgentCheckConfig(answer_match="cover"), checker)]
    finally:
        checker.close()
    return SimpleNamespace(nodes=nodes, rollouts=rollouts, human=human, tool=tool)


def test_the_sample_humans_label_recovered_steps_right_as_until_recovered_does(sample) -> None:
    paths = [[sample.human[nid] for nid in r["node_ids"]] for r in sample.rollouts]
    after_error = [label for path in paths for i, label in enumerate(path) if -1 in path[:i]]
    assert after_error and all(label == 1 for label in after_error), "every step after a human -1 is +1: recovered"
    # The human labels as evidence: all_after contradicts every one of those steps, until_recovered none.
    as_judge = [ev(nid, "judge", label, confidence=1.0) for nid, label in sample.human.items()]
    for settings, wrong in (({"propagate_errors": True}, len(after_error)), (RECOVER, 0)):
        got, _ = labels(as_judge, sample.nodes, policy="judge", human_override=False, **settings)
        assert sum(got[nid].label != label for nid, label in sample.human.items()) == wrong


def test_the_tool_checks_match_the_sample_humans_better_until_recovered_than_all_after(sample) -> None:
    def agreement(**settings) -> tuple[int, int]:
        got, _ = labels(sample.tool, sample.nodes, policy="tool", human_override=False, **settings)
        correct = sum(got[nid].label == label for nid, label in sample.human.items() if nid in got)
        caught = sum(got[nid].label == -1 for nid, label in sample.human.items() if label == -1 and nid in got)
        false_alarms = sum(got[nid].label == -1 for nid, label in sample.human.items() if label != -1 and nid in got)
        return correct, caught - false_alarms

    strict, recovered, none = agreement(propagate_errors=True), agreement(**RECOVER), agreement()
    assert recovered[0] > strict[0] and recovered[1] > strict[1]
    assert recovered == none, "every step of the sample has a check of its own: nothing is left to propagate into"
