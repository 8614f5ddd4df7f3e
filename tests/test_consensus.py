"""Consensus policies on hand-made evidence tables: each policy's label, confidence, reason and drops."""

from __future__ import annotations

import pytest

from stepforge.schemas.records import Label, Reject
from stepforge.stages.consensus import policy as consensus
from stepforge.stages.consensus.policy import ConsensusConfig


def ev(node: str, source: str, *, n: int = 1, successes: int = 0, verdict: int | None = None,
       confidence: float | None = None, rationale: str | None = None) -> dict:
    return {"node_id": node, "problem_id": "p", "source": source, "n": n, "successes": successes,
            "verdict": verdict, "confidence": confidence, "rationale": rationale}


def labels(evidence: list[dict], nodes: list[dict] = (), **config) -> tuple[dict[str, Label], dict[str, Reject]]:
    out = list(consensus.run(evidence, ConsensusConfig(**config), nodes))
    return ({r.node_id: r for r in out if isinstance(r, Label)}, {r.item: r for r in out if isinstance(r, Reject)})


# Step a: MC says right (2/4), the judge agrees. Step b: MC says wrong (0/4), the judge says right.
# Step c: MC right (1/4), judge wrong, tool finds a false calculation. Step d: only the judge, neutral.
TABLE = [
    ev("a", "mc", n=4, successes=2), ev("a", "judge", n=3, successes=3, verdict=1, confidence=1.0),
    ev("b", "mc", n=4, successes=0), ev("b", "judge", n=3, successes=2, verdict=1, confidence=2 / 3),
    ev("c", "mc", n=4, successes=1), ev("c", "judge", n=3, successes=0, verdict=-1, confidence=1.0),
    ev("c", "tool", n=2, successes=1, verdict=-1, confidence=1.0, rationale="3*4 is 12, not 13"),
    ev("d", "judge", n=1, successes=0, verdict=0, confidence=1.0),
]


def test_mc_hard_reads_only_monte_carlo_evidence() -> None:
    got, dropped = labels(TABLE, tool_veto=False)
    assert {k: v.label for k, v in got.items()} == {"a": 1, "b": -1, "c": 1}
    assert got["b"].confidence == pytest.approx(4 / 5) and got["a"].confidence == 1.0
    assert got["a"].sources == "mc" and got["a"].policy == "mc_hard@2+human"
    assert not dropped


def test_tool_veto_overrides_the_policy_where_a_calculation_is_false() -> None:
    got, _ = labels(TABLE)
    assert got["c"].label == -1 and got["c"].confidence == 1.0 and got["c"].sources == "tool"
    assert "3*4 is 12, not 13" in got["c"].reason
    assert got["c"].value == 0.25, "the soft value the MC estimate gave is kept"
    assert got["c"].policy == "mc_hard@2+tool_veto+human"


def test_judge_policy_pools_verdicts() -> None:
    got, _ = labels(TABLE, policy="judge", tool_veto=False)
    assert {k: v.label for k, v in got.items()} == {"a": 1, "b": 1, "c": -1, "d": 0}
    assert got["b"].value == pytest.approx(2 / 3) and got["b"].sources == "judge"


def test_tool_policy_labels_only_checked_steps() -> None:
    got, _ = labels(TABLE + [ev("e", "tool", n=3, successes=3, verdict=1)], policy="tool")
    assert {k: v.label for k, v in got.items()} == {"c": -1, "e": 1}
    assert got["e"].confidence == pytest.approx(0.3), "right arithmetic is weak evidence of a right step"


def test_agreement_keeps_only_steps_where_mc_and_judge_agree() -> None:
    got, dropped = labels(TABLE, policy="agreement", tool_veto=False)
    assert set(got) == {"a"} and got["a"].label == 1 and got["a"].sources == "judge+mc"
    assert {k: r.reason for k, r in dropped.items()} == {
        "b": "sources_disagree", "c": "sources_disagree", "d": "missing_mc",
    }
    assert all(r.stage == "consensus" for r in dropped.values())


def test_agreement_drops_a_neutral_judge() -> None:
    _, dropped = labels([ev("x", "mc", n=2, successes=1), ev("x", "judge", verdict=0, confidence=1.0)], policy="agreement")
    assert dropped["x"].reason == "judge_neutral"


def test_vote_weighs_sources_by_confidence() -> None:
    got, _ = labels(TABLE, policy="vote", tool_veto=False)
    # b: mc -1 with confidence 0.8 vs judge +1 with confidence 2/3 -> -1.
    assert got["b"].label == -1 and got["b"].confidence == pytest.approx((0.8 - 2 / 3) / (0.8 + 2 / 3), abs=1e-6)
    # c: mc +1 (confidence 1), judge -1 (1), tool -1 (1) -> -1 with confidence 1/3.
    assert got["c"].label == -1 and got["c"].confidence == pytest.approx(1 / 3)
    assert got["c"].sources == "judge+mc+tool"
    heavy_judge, _ = labels(TABLE, policy="vote", tool_veto=False, weights={"mc": 1.0, "judge": 2.0, "tool": 1.0})
    assert heavy_judge["b"].label == 1, "weights move the vote"


def test_human_labels_override_everything_and_disagreement_is_flagged() -> None:
    table = TABLE + [ev("c", "human", verdict=1), ev("b", "human", verdict=-1), ev("b", "human", verdict=1),
                     ev("b", "human", verdict=-1, confidence=0.99)]
    got, _ = labels(table, policy="vote")
    assert got["c"].label == 1 and got["c"].sources == "human" and got["c"].confidence == 1.0, "even over a tool veto"
    assert got["b"].label == -1 and got["b"].confidence == pytest.approx(2 / 3)
    assert "annotators disagree" in got["b"].reason
    ignored, _ = labels(table, policy="vote", human_override=False)
    assert ignored["c"].label == -1 and "human" not in ignored["c"].sources


def test_errors_propagate_to_every_step_below_a_wrong_one() -> None:
    nodes = [{"node_id": nid, "problem_id": "p", "parent_id": parent}
             for nid, parent in [("s1", None), ("s2", "s1"), ("s3", "s2"), ("s4", "s3"), ("t2", "s1")]]
    table = [ev("s1", "mc", n=4, successes=3), ev("s2", "mc", n=4, successes=0), ev("s3", "mc", n=4, successes=1),
             ev("t2", "mc", n=4, successes=2)]
    got, _ = labels(table, nodes, propagate_errors=True)
    assert {k: v.label for k, v in got.items()} == {"s1": 1, "s2": -1, "s3": -1, "s4": -1, "t2": 1}
    assert "errors propagate" in got["s4"].reason and got["s4"].sources == "mc+propagated"
    assert got["s3"].value == 0.25 and got["s4"].value is None
    plain, _ = labels(table, nodes)
    assert plain["s3"].label == 1 and "s4" not in plain


def test_policy_ids_name_the_rules() -> None:
    assert ConsensusConfig().policy_id == "mc_hard@2+tool_veto+human"
    assert ConsensusConfig(policy="vote", propagate_errors=True, human_override=False).policy_id == "vote@1+tool_veto+propagate"


def test_a_node_without_evidence_for_the_policy_gets_nothing() -> None:
    got, dropped = labels([ev("j", "judge", verdict=1, confidence=1.0)], tool_veto=False)
    assert not got and not dropped
