"""Consensus policies and Step-DPO pair construction on a hand-built step tree."""

from __future__ import annotations

import pytest

from stepforge.schemas.ids import content_hash, node_id
from stepforge.schemas.records import Pair, Problem, Reject
from stepforge.stages.consensus import policy as consensus
from stepforge.stages.pairs import step_pairs as pairs
from stepforge.stages.rollout.split import SplitConfig, join_prefix, split_steps

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


def nodes_for(*paths_texts: tuple[str, ...], origin: str = "policy") -> list[dict]:
    out = {}
    for texts in paths_texts:
        parent = None
        for depth, (nid, text) in enumerate(zip(path(*texts), texts), 1):
            out[nid] = {"node_id": nid, "problem_id": "p", "parent_id": parent, "depth": depth, "text": text,
                        "origin": origin}
            parent = nid
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
    assert soft["a"].label == -1 and soft["c"].label == 1 and soft["a"].policy.startswith(f"mc_soft@{consensus.POLICY_VERSIONS['mc_soft']}+")


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


# ---------------------------------------------------------------------------------------------
# Sibling pairs (MCTS-DPO / Tree-PLV) and trajectory pairs.


def label(nid: str, value: float | None, lab: int, policy: str = "mc_hard@1") -> dict:
    return {"node_id": nid, "problem_id": "p", "label": lab, "value": value, "confidence": 1.0, "policy": policy}


def only(kind: str, records) -> list[Pair]:
    out = list(records)
    assert all(isinstance(r, Pair) and r.kind == kind for r in out), out
    return out


# Root children a-good (0.9), a-ok (0.5), a-bad (0.0), a-none (no value); under a-good: b-best (1.0, an MC
# node), b-near (0.8), b-mid (0.7), b-low (0.4).
SIBLING_TREE = [("a-good", "b-best"), ("a-good", "b-near"), ("a-good", "b-mid"), ("a-good", "b-low"),
                ("a-ok",), ("a-bad",), ("a-none",)]
SIBLING_VALUES = {("a-good",): (0.9, 1), ("a-ok",): (0.5, 1), ("a-bad",): (0.0, -1), ("a-none",): (None, 1),
                  ("a-good", "b-best"): (1.0, 1), ("a-good", "b-near"): (0.8, 1), ("a-good", "b-mid"): (0.7, 1),
                  ("a-good", "b-low"): (0.4, -1)}


def sibling_inputs():
    tree_nodes = nodes_for(*SIBLING_TREE[1:]) + nodes_for(SIBLING_TREE[0], origin="mc")
    labels = [label(path(*texts)[-1], value, lab) for texts, (value, lab) in SIBLING_VALUES.items()]
    return tree_nodes, labels


def test_sibling_pairs_respect_the_margin_and_record_it():
    tree_nodes, labels = sibling_inputs()
    config = pairs.PairsConfig(kinds=["sibling"])
    out = only("sibling", pairs.run([PROBLEM], [], tree_nodes, labels, config))
    got = {(p.chosen, p.rejected): p for p in out}
    assert set(got) == {
        ("a-good", "a-bad"), ("a-ok", "a-bad"), ("a-good", "a-ok"),  # 0.9, 0.5, 0.4
        ("b-best", "b-low"), ("b-near", "b-low"), ("b-mid", "b-low"),  # 0.6, 0.4, 0.7-0.4 (float noise < 0.3)
        ("b-best", "b-mid"),  # exactly 0.3; b-best/b-near (0.2) and b-near/b-mid (0.1) are below the margin
    }
    pair = got[("b-near", "b-low")]
    good = path("a-good")[0]
    assert pair.prompt == "Q?\n\na-good\n\n" and pair.prefix_node_id == good
    assert (pair.chosen_node_id, pair.rejected_node_id) == (path("a-good", "b-near")[1], path("a-good", "b-low")[1])
    assert (pair.chosen_value, pair.rejected_value) == (0.8, 0.4) and pair.margin == pytest.approx(0.4)
    assert pair.pair_id == content_hash("pair", "sibling", good, pair.chosen_node_id, pair.rejected_node_id)
    assert pair.sources == "mc_hard@1"
    root = got[("a-good", "a-bad")]
    assert root.prompt == "Q?\n\n" and root.prefix_node_id is None and root.margin == pytest.approx(0.9)
    assert all(p.margin == pytest.approx(p.chosen_value - p.rejected_value) for p in out)
    assert [p.margin for p in out] == sorted((p.margin for p in out), reverse=True), "largest margins first"
    wide = only("sibling", pairs.run([PROBLEM], [], tree_nodes, labels, pairs.PairsConfig(kinds=["sibling"], sibling_margin=0.5)))
    assert {(p.chosen, p.rejected) for p in wide} == {("a-good", "a-bad"), ("a-ok", "a-bad"), ("b-best", "b-low")}


def test_sibling_pairs_are_deduplicated_and_capped_by_margin_then_id():
    tree_nodes, labels = sibling_inputs()
    # The same nodes stored by two shards, and the same labels twice.
    out = only("sibling", pairs.run([PROBLEM], [], tree_nodes + tree_nodes, labels + labels,
                                    pairs.PairsConfig(kinds=["sibling"])))
    assert len(out) == 7 and len({p.pair_id for p in out}) == 7
    capped = only("sibling", pairs.run([PROBLEM], [], tree_nodes, labels,
                                       pairs.PairsConfig(kinds=["sibling"], max_sibling_pairs_per_problem=3)))
    assert [(p.chosen, p.rejected) for p in capped] == [("a-good", "a-bad"), ("b-best", "b-low"), ("a-ok", "a-bad")]
    # A tie in margin is broken by pair_id: two prefixes, each with a 1.0 / 0.0 pair of children.
    tie_nodes = nodes_for(("x", "x-right"), ("x", "x-wrong"), ("y", "y-right"), ("y", "y-wrong"))
    tie_labels = [label(path(*t)[-1], v, lab) for t, v, lab in [
        (("x",), 0.5, 1), (("y",), 0.5, 1), (("x", "x-right"), 1.0, 1), (("x", "x-wrong"), 0.0, -1),
        (("y", "y-right"), 1.0, 1), (("y", "y-wrong"), 0.0, -1)]]
    config = pairs.PairsConfig(kinds=["sibling"], max_sibling_pairs_per_problem=1)
    kept = only("sibling", pairs.run([PROBLEM], [], tie_nodes, tie_labels, config))
    both = only("sibling", pairs.run([PROBLEM], [], tie_nodes, tie_labels, pairs.PairsConfig(kinds=["sibling"])))
    assert len(both) == 2 and [p.pair_id for p in kept] == [min(p.pair_id for p in both)]
    reversed_input = only("sibling", pairs.run([PROBLEM], [], tie_nodes[::-1], tie_labels[::-1], config))
    assert reversed_input == kept, "the choice does not depend on input order"


def test_sibling_pairs_need_values_and_labels_that_agree():
    tree_nodes = nodes_for(("c-high",), ("c-low",), ("c-unlabelled",))
    # Values say c-high is better, the hard labels say the opposite (e.g. two labellers disagree): no pair.
    labels = [label(path("c-high")[0], 0.9, -1), label(path("c-low")[0], 0.1, 1)]
    assert list(pairs.run([PROBLEM], [], tree_nodes, labels, pairs.PairsConfig(kinds=["sibling"]))) == []
    labels = [label(path("c-high")[0], 0.9, 1), label(path("c-low")[0], 0.1, -1)]
    out = only("sibling", pairs.run([PROBLEM], [], tree_nodes, labels, pairs.PairsConfig(kinds=["sibling"])))
    assert [(p.chosen, p.rejected) for p in out] == [("c-high", "c-low")]


def test_sibling_margin_must_be_positive():
    with pytest.raises(ValueError):
        pairs.PairsConfig(sibling_margin=0.0)


TRAJECTORIES = {
    # name: (texts, outcome, origin, step values)
    "g-sure": (("s1", "s2-a", "end 72"), True, "policy", (0.9, 1.0, 1.0)),
    "g-lucky": (("s1", "s2-b", "end 72"), True, "policy", (0.9, 0.2, 1.0)),
    "w-close": (("s1", "s2-c", "end 70"), False, "policy", (0.9, 0.5, 0.0)),
    "w-far": (("t1", "t2", "end 5"), False, "policy", (0.1, 0.0, 0.0)),
    "w-mid": (("t1", "t3", "end 6"), False, "policy", (0.1, 0.4, None)),
    "unchecked": (("u1", "end ?"), None, "policy", (0.5, 0.5)),
    "mc-right": (("s1", "s2-d", "end 72"), True, "mc", (None, None, None)),
}


def trajectory_inputs(names=TRAJECTORIES):
    rollouts, tree_nodes, labels = [], [], []
    for name in names:
        texts, outcome, origin, values = TRAJECTORIES[name]
        ids = path(*texts)
        rollouts.append(rollout(f"r-{name}", ids, outcome, origin=origin))
        tree_nodes += nodes_for(texts)
        labels += [label(nid, v, 1 if v else -1) for nid, v in zip(ids, values) if v is not None]
    return rollouts, tree_nodes, labels


def test_trajectory_pairs_best_correct_against_worst_incorrect():
    rollouts, tree_nodes, labels = trajectory_inputs()
    # The same path sampled twice is one solution.
    rollouts.append(rollout("r-g-sure-again", path(*TRAJECTORIES["g-sure"][0]), True))
    config = pairs.PairsConfig(kinds=["trajectory"])
    out = only("trajectory", pairs.run([PROBLEM], rollouts, tree_nodes, labels, config))
    # Correct ranked best first (mean step value): g-sure 0.967, g-lucky 0.7; wrong worst first: w-far 0.033,
    # w-mid 0.25 (mean of its known values), w-close 0.467. Three pairs, cycling the two correct solutions.
    assert [(p.chosen_node_id, p.rejected_node_id) for p in out] == [
        (path(*TRAJECTORIES[c][0])[-1], path(*TRAJECTORIES[w][0])[-1])
        for c, w in [("g-sure", "w-far"), ("g-lucky", "w-mid"), ("g-sure", "w-close")]
    ]
    first = out[0]
    assert first.prompt == "Q?\n\n" and first.prefix_node_id is None and first.sources == "outcome"
    assert (first.chosen, first.rejected) == ("s1\n\ns2-a\n\nend 72", "t1\n\nt2\n\nend 5")
    assert first.chosen_value == pytest.approx(2.9 / 3) and first.rejected_value == pytest.approx(0.1 / 3)
    assert first.margin == pytest.approx(2.8 / 3)
    assert first.pair_id == content_hash("pair", "trajectory", None, first.chosen_node_id, first.rejected_node_id)
    assert out[1].rejected_value == pytest.approx(0.25)
    assert len({p.pair_id for p in out}) == 3
    capped = only("trajectory", pairs.run([PROBLEM], rollouts, tree_nodes, labels,
                                          pairs.PairsConfig(kinds=["trajectory"], max_trajectory_pairs_per_problem=2)))
    assert capped == out[:2]
    newline = only("trajectory", pairs.run([PROBLEM], rollouts, tree_nodes, labels,
                                           pairs.PairsConfig(kinds=["trajectory"], split=SplitConfig(mode="newline"))))
    assert newline[0].chosen == "s1\ns2-a\nend 72" and newline[0].prompt == "Q?\n\n"


def test_trajectory_pairs_take_only_the_configured_origins_and_need_both_outcomes():
    rollouts, tree_nodes, labels = trajectory_inputs(["mc-right", "w-far", "unchecked"])
    config = pairs.PairsConfig(kinds=["trajectory"])
    assert list(pairs.run([PROBLEM], rollouts, tree_nodes, labels, config)) == [], "mc is not a trajectory origin by default"
    with_mc = pairs.PairsConfig(kinds=["trajectory"], trajectory_origins=["policy", "mc"])
    out = only("trajectory", pairs.run([PROBLEM], rollouts, tree_nodes, labels, with_mc))
    assert [(p.chosen, p.rejected) for p in out] == [("s1\n\ns2-d\n\nend 72", "t1\n\nt2\n\nend 5")]
    assert out[0].chosen_value == 1.0, "no step of the chosen side has a value: its outcome stands in"
    # The unchecked rollout is on neither side.
    assert all(path("u1", "end ?")[-1] not in (p.chosen_node_id, p.rejected_node_id) for p in out)


def test_kinds_select_the_constructions_and_step_dpo_stays_the_default():
    wrong, right = ("48/2 = 24", "24+48 = 82"), ("48/2 = 24", "24+48 = 72")
    wrong_ids, right_ids = path(*wrong), path(*right)
    tree_nodes = nodes_for(wrong, right)
    rollouts = [rollout("w", wrong_ids, False), rollout("r", right_ids, True)]
    labels = [label(wrong_ids[0], 0.5, 1), label(wrong_ids[1], 0.0, -1), label(right_ids[1], 1.0, 1)]
    default = list(pairs.run([PROBLEM], rollouts, tree_nodes, labels, pairs.PairsConfig()))
    assert [p.kind for p in default] == ["step_dpo"]
    every = list(pairs.run([PROBLEM], rollouts, tree_nodes, labels,
                           pairs.PairsConfig(kinds=["step_dpo", "sibling", "trajectory"])))
    assert [p.kind for p in every] == ["step_dpo", "sibling", "trajectory"]
    assert every[0] == default[0]
    step, sibling = every[0], every[1]
    # The same contrast as a sibling pair: same texts and nodes, its own id and kind.
    assert (sibling.prompt, sibling.chosen, sibling.rejected) == (step.prompt, step.chosen, step.rejected)
    assert sibling.pair_id != step.pair_id
    # Without step_dpo there are no Step-DPO rejects either.
    alone = [rollout("w", wrong_ids, False)]
    assert all(isinstance(r, Reject) for r in pairs.run([PROBLEM], alone, tree_nodes, labels, pairs.PairsConfig()))
    assert list(pairs.run([PROBLEM], alone, tree_nodes, labels, pairs.PairsConfig(kinds=["trajectory"]))) == []
