"""Consensus policies and Step-DPO pair construction on a hand-built step tree."""

from __future__ import annotations

import pytest

from stepforge.schemas.ids import node_id
from stepforge.schemas.records import Pair, Problem, Reject
from stepforge.stages import consensus, pairs
from stepforge.stages.split import SplitConfig, join_prefix, split_steps

PROBLEM = Problem(problem_id="p", source="t", source_index=0, question="Q?", gold_answer="72")


def path(*texts: str) -> list[str]:
    ids, parent = [], None
    for text in texts:
        parent = node_id("p", parent, text)
        ids.append(parent)
    return ids


def rollout(rid: str, ids: list[str], outcome: bool, origin: str = "policy", prefix: str | None = None) -> dict:
    return {"rollout_id": rid, "problem_id": "p", "origin": origin, "prefix_node_id": prefix,
            "node_ids": ids, "outcome": outcome}


def nodes_for(*paths_texts: tuple[str, ...]) -> list[dict]:
    out = {}
    for texts in paths_texts:
        for nid, text in zip(path(*texts), texts):
            out[nid] = {"node_id": nid, "text": text}
    return list(out.values())


def test_consensus_mc_hard_and_soft():
    evaluations = [
        {"node_id": "a", "problem_id": "p", "source": "mc", "n": 4, "successes": 1},
        {"node_id": "b", "problem_id": "p", "source": "mc", "n": 4, "successes": 0},
        {"node_id": "c", "problem_id": "p", "source": "outcome", "n": 1, "successes": 1},
        {"node_id": "c", "problem_id": "p", "source": "mc", "n": 3, "successes": 2},
        {"node_id": "d", "problem_id": "p", "source": "judge", "n": 1, "successes": 1},  # not MC evidence
    ]
    hard = {lab.node_id: lab for lab in consensus.run(evaluations, consensus.ConsensusConfig())}
    assert set(hard) == {"a", "b", "c"}
    assert (hard["a"].label, hard["a"].value, hard["a"].confidence) == (1, 0.25, 1.0)
    assert (hard["b"].label, hard["b"].confidence) == (-1, 0.8)
    assert hard["c"].value == 0.75 and hard["c"].reason.startswith("mc+outcome")
    soft = {lab.node_id: lab for lab in consensus.run(evaluations, consensus.ConsensusConfig(policy="mc_soft"))}
    assert soft["a"].label == -1 and soft["c"].label == 1 and soft["a"].policy == "mc_soft@1"


def test_step_dpo_pair_at_first_error_with_a_correct_continuation_of_the_same_prefix():
    wrong = ("48/2 = 24", "24+48 = 82", "The answer is 82")
    right_tail = ("24+48 = 72", "The answer is 72")
    policy_ids = path(*wrong)
    completion_ids = path(wrong[0], *right_tail)
    tree_nodes = nodes_for(wrong, (wrong[0], *right_tail))
    rollouts = [
        rollout("r1", policy_ids, False),
        rollout("c1", completion_ids, True, origin="mc", prefix=policy_ids[0]),
    ]
    labels = [{"node_id": policy_ids[0], "value": 0.5}, {"node_id": policy_ids[1], "value": 0.0},
              {"node_id": policy_ids[2], "value": 0.0}]
    out = list(pairs.run([PROBLEM], rollouts, tree_nodes, labels, pairs.PairsConfig()))
    assert len(out) == 1 and isinstance(out[0], Pair)
    pair = out[0]
    assert pair.rejected == "24+48 = 82" and pair.chosen == "24+48 = 72"
    assert pair.prompt == "Q?\n\n48/2 = 24\n\n"
    assert pair.prefix_node_id == policy_ids[0] and pair.rejected_value == 0.0
    assert (pair.chosen_value, pair.margin) == (1.0, 1.0), "one of one continuations through the chosen step succeeded"


def test_first_step_error_uses_a_correct_policy_rollout_and_missing_alternatives_are_rejects():
    bad, good = path("48*2 = 96", "The answer is 144"), path("48/2 = 24", "The answer is 72")
    tree_nodes = nodes_for(("48*2 = 96", "The answer is 144"), ("48/2 = 24", "The answer is 72"))
    labels = [{"node_id": bad[0], "value": 0.0}, {"node_id": bad[1], "value": 0.0},
              {"node_id": good[0], "value": 1.0}, {"node_id": good[1], "value": 1.0}]
    out = list(pairs.run([PROBLEM], [rollout("b", bad, False), rollout("g", good, True)], tree_nodes, labels,
                         pairs.PairsConfig()))
    assert [(p.chosen, p.rejected, p.prefix_node_id) for p in out] == [("48/2 = 24", "48*2 = 96", None)]
    assert out[0].margin == 1.0
    alone = list(pairs.run([PROBLEM], [rollout("b", bad, False)], tree_nodes, labels, pairs.PairsConfig()))
    assert len(alone) == 1 and isinstance(alone[0], Reject) and alone[0].reason == "no_correct_alternative"


@pytest.mark.parametrize(
    ("mode", "text", "steps"),
    [
        ("blank_line", "a = 1\n\nb = 2\n  \n\nc", ["a = 1", "b = 2", "c"]),
        ("newline", "a\nb\n\nc", ["a", "b", "c"]),
        ("step_prefix", "Step 1: a\nStep 2: b\n**Step 3.** c", ["a", "b", "c"]),
        ("blank_line", "", []),
        ("numbered", "Plan:\n1. a = 2\n   \\[ x \\]\n2) b\n\n**Step 3:** c\n\\boxed{4}", ["Plan:", "1. a = 2\n   \\[ x \\]", "2) b", "**Step 3:** c\n\\boxed{4}"]),
    ],
)
def test_split_steps(mode, text, steps):
    assert split_steps(text, SplitConfig(mode=mode)) == steps


@pytest.mark.parametrize("mode", ["blank_line", "newline", "step_prefix", "numbered"])
def test_a_written_back_prefix_plus_continuation_splits_into_the_same_steps(mode):
    config = SplitConfig(mode=mode)
    prefix = join_prefix(["first", "second"], config)
    continuation = {"blank_line": "third\n\nfourth", "numbered": "third\n\nfourth", "newline": "third\nfourth", "step_prefix": " third\nStep 4: fourth"}[mode]
    assert split_steps(prefix + continuation, config) == ["first", "second", "third", "fourth"]


def test_regex_mode_needs_a_pattern_and_max_steps_merges_the_tail():
    with pytest.raises(ValueError):
        split_steps("a", SplitConfig(mode="regex"))
    assert split_steps("a;b;c;d", SplitConfig(mode="regex", pattern=";", max_steps=2)) == ["a", "b\n\nc\n\nd"]


def test_the_best_evidenced_alternative_is_chosen_and_policy_rollouts_count_as_continuations():
    wrong = ("a", "b-wrong", "end 1")
    rare = ("a", "b-rare", "end 72")
    sure = ("a", "b-sure", "end 72")
    wrong_ids, rare_ids, sure_ids = path(*wrong), path(*rare), path(*sure)
    tree_nodes = nodes_for(wrong, rare, sure)
    rollouts = [
        rollout("p1", wrong_ids, False),
        rollout("p2", sure_ids, True),  # a policy rollout through the same prefix "a"
        rollout("m1", rare_ids, True, origin="mc", prefix=wrong_ids[0]),
        rollout("m2", rare_ids[:2] + [node_id("p", rare_ids[1], "end 5")], False, origin="mc", prefix=wrong_ids[0]),
        rollout("m3", sure_ids, True, origin="mc", prefix=wrong_ids[0]),
    ]
    labels = [{"node_id": wrong_ids[0], "value": 0.6}, {"node_id": wrong_ids[1], "value": 0.0},
              {"node_id": wrong_ids[2], "value": 0.0}]
    out = [p for p in pairs.run([PROBLEM], rollouts, tree_nodes, labels, pairs.PairsConfig()) if isinstance(p, Pair)]
    assert len(out) == 1
    assert (out[0].chosen, out[0].chosen_value) == ("b-sure", 1.0), "2/2 beats 1/2"
