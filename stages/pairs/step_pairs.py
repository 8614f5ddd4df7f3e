"""Preference pairs from the step tree: Step-DPO, sibling (MCTS-DPO / Tree-PLV) and trajectory pairs.

``PairsConfig.kinds`` chooses which constructions run (default: Step-DPO only). Every
prompt is written the same way: ``question + "\\n\\n" + join_prefix(prefix steps, split)``,
so a first step's prompt is the question followed by a blank line.

- ``step_dpo``: for each policy rollout whose steps keep a positive value up to step j and
  then drop to 0: prompt = problem + steps[:j] (the correct prefix), rejected = step j,
  chosen = the first step of a completion from that same prefix that reached the gold answer
  (for j = 0, a correct policy rollout's first step). Among several, the one with the highest
  value: its own MC value if it was labelled, else the success rate of the continuations
  through it — which is also what the pair's margin is measured with. One pair per (prefix,
  rejected step). A first error with no correct alternative is a ``no_correct_alternative``
  reject.
- ``sibling``: for every prefix (problem, parent node or None), its children that have a
  label value (any origin: policy, mc, mcts), paired higher-value vs lower-value whenever the
  values differ by at least ``sibling_margin`` (and the hard labels do not say the opposite).
  ``margin`` = the value difference. The ``max_sibling_pairs_per_problem`` largest margins
  are kept (ties by pair_id). ``sources`` = the label policies behind the two values.
- ``trajectory``: complete solutions of one problem, a correct one (outcome True) vs an
  incorrect one (outcome False), both from rollouts whose origin is in
  ``trajectory_origins``. chosen/rejected = all steps joined with the split separator;
  chosen/rejected_node_id = the leaf nodes, prefix_node_id None. A side's value is the mean
  label value of its steps (the known ones; the outcome, 1.0/0.0, when none is known), and
  ``margin`` = chosen value - rejected value (it can be <= 0: the pair is decided by the
  answer check, the margin only says how the step labels saw the two). Correct solutions
  are ranked best first and incorrect ones worst first (by that value, ties by leaf id);
  pair i joins the i-th of each list, cycling the shorter one, up to
  ``max_trajectory_pairs_per_problem`` pairs. ``sources`` = ``outcome``.

Sibling and trajectory pairs are made only when the tree has the contrast; a problem without
one yields no pair and no reject. Pairs are yielded per problem: step_dpo, then sibling, then
trajectory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Pair, Problem, Record, Reject
from stepforge.stages.base import Stage
from stepforge.stages.agent.episodes import live_environment
from stepforge.stages.tree import TREE_SLOTS, StepTree
from stepforge.stages.rollout.split import SplitConfig, join_prefix

STAGE = "pairs"
VERSION = 1

PairKind = Literal["step_dpo", "sibling", "trajectory"]
TrajectoryOrigin = Literal["policy", "mc", "mcts"]

# Float noise: 0.7 - 0.4 is 0.29999999999999993, which must still pass a 0.3 margin.
_MARGIN_TOLERANCE = 1e-9


class PairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    split: SplitConfig = Field(default_factory=SplitConfig, description="Joins the prefix steps in the prompt.")
    max_pairs_per_problem: int = Field(
        default=16, ge=1, description="Cap on step_dpo pairs per problem, to keep easy problems from dominating."
    )
    kinds: list[PairKind] = Field(
        default_factory=lambda: ["step_dpo"],
        min_length=1,
        description="Pair constructions to run: step_dpo (first error vs a correct next step from the same "
        "prefix), sibling (two labelled children of one prefix whose values differ by at least "
        "sibling_margin; MCTS-DPO / Tree-PLV), trajectory (a correct vs an incorrect complete solution).",
    )
    sibling_margin: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Smallest value difference between two sibling steps for a sibling pair; kept as its margin.",
    )
    max_sibling_pairs_per_problem: int = Field(
        default=16, ge=1, description="Cap on sibling pairs per problem; the largest margins are kept (ties by pair_id)."
    )
    trajectory_origins: list[TrajectoryOrigin] = Field(
        default_factory=lambda: ["policy"],
        min_length=1,
        description="Rollout origins whose complete solutions can form trajectory pairs (mcts: a search's full paths).",
    )
    max_trajectory_pairs_per_problem: int = Field(
        default=4, ge=1, description="Cap on trajectory pairs per problem."
    )


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    labels: Iterable[dict],
    config: PairsConfig,
) -> Iterator[Record]:
    """Pairs in problem order; a first error with no correct alternative is a reject, counted."""
    rollouts, nodes, labels = list(rollouts), list(nodes), list(labels)
    text = {n["node_id"]: n["text"] for n in nodes}
    value = {lab["node_id"]: lab["value"] for lab in labels}
    label_by_node = {lab["node_id"]: lab for lab in labels}
    kinds = set(config.kinds)
    tree = StepTree(nodes) if "sibling" in kinds else None
    sorted_rollouts = sorted(rollouts, key=lambda r: r["rollout_id"])
    policy: dict[str, list[dict]] = defaultdict(list)
    by_problem: dict[str, list[dict]] = defaultdict(list)
    # (problem, prefix node or None) -> next step -> [continuations through it, of which correct]
    next_steps: dict[tuple[str, str | None], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for rollout in sorted_rollouts:
        by_problem[rollout["problem_id"]].append(rollout)
        if rollout["origin"] == "policy":
            policy[rollout["problem_id"]].append(rollout)
        # A rollout continues every prefix of its path, not only the one it was sampled from.
        ids = rollout["node_ids"]
        for position, nid in enumerate(ids):
            tally = next_steps[(rollout["problem_id"], ids[position - 1] if position else None)][nid]
            tally[0] += 1
            tally[1] += bool(rollout["outcome"])

    def step_value(nid: str, tally: list[int]) -> float:
        """The step's own MC value if it was labelled, else the success rate of the continuations through it."""
        return value[nid] if value.get(nid) is not None else tally[1] / tally[0]

    for problem in problems:
        if "step_dpo" in kinds:
            made: dict[str, Pair] = {}
            for rollout in policy.get(problem.problem_id, []):
                ids = rollout["node_ids"]
                values = [value.get(nid) for nid in ids]
                first_bad = next((j for j, v in enumerate(values) if v is not None and v == 0.0), None)
                if first_bad is None or any(v is None or v <= 0.0 for v in values[:first_bad]):
                    continue
                prefix_ids = ids[:first_bad]
                prefix = prefix_ids[-1] if prefix_ids else None
                rejected = ids[first_bad]
                candidates = next_steps.get((problem.problem_id, prefix), {})
                # Best-evidenced correct alternative first; ties broken by id so the choice is stable.
                options = sorted(
                    ((step_value(nid, tally), tally[0], nid) for nid, tally in candidates.items() if tally[1] and nid != rejected),
                    key=lambda option: (-option[0], -option[1], option[2]),
                )
                if not options:
                    yield Reject(
                        stage=STAGE, item=rollout["rollout_id"], reason="no_correct_alternative",
                        detail=f"first error at step {first_bad + 1}; no completion from its prefix reached the answer",
                    )
                    continue
                chosen_value, _, chosen = options[0]
                pair_id = content_hash("pair", "step_dpo", prefix, chosen, rejected)
                if pair_id in made or len(made) >= config.max_pairs_per_problem:
                    continue
                made[pair_id] = Pair(
                    pair_id=pair_id, problem_id=problem.problem_id, kind="step_dpo",
                    prompt=_prompt(problem, [text[i] for i in prefix_ids], config.split),
                    chosen=text[chosen], rejected=text[rejected], prefix_node_id=prefix,
                    chosen_node_id=chosen, rejected_node_id=rejected, chosen_value=chosen_value,
                    rejected_value=values[first_bad],
                    margin=chosen_value - values[first_bad],
                    sources="mc",
                )
            yield from made.values()
        if tree is not None:
            yield from sibling_pairs(problem, tree, label_by_node, config)
        if "trajectory" in kinds:
            yield from trajectory_pairs(problem, by_problem.get(problem.problem_id, []), text, value, config)


def _prompt(problem: Problem, prefix_texts: list[str], split: SplitConfig) -> str:
    return problem.question + "\n\n" + join_prefix(prefix_texts, split)


def sibling_pairs(
    problem: Problem, tree: StepTree, label_by_node: dict[str, dict], config: PairsConfig
) -> list[Pair]:
    """Higher- vs lower-value children of one prefix, margin >= sibling_margin, largest margins first."""
    candidates: dict[str, Pair] = {}
    for prefix, children in tree.children(problem.problem_id).items():
        valued = sorted(
            (label_by_node[nid]["value"], nid)
            for nid in children
            if nid in label_by_node and label_by_node[nid].get("value") is not None
        )
        if len(valued) < 2:
            continue
        prefix_path = tree.path(prefix)
        if prefix_path is None:
            continue  # the prompt cannot be written without every step above
        prompt = _prompt(problem, tree.texts(prefix_path), config.split)
        for low_index, (low_value, rejected) in enumerate(valued):
            for high_value, chosen in valued[low_index + 1:]:
                margin = high_value - low_value
                if margin < config.sibling_margin - _MARGIN_TOLERANCE:
                    continue
                chosen_label = label_by_node[chosen].get("label")
                rejected_label = label_by_node[rejected].get("label")
                # The hard labels, where known, must not say the opposite of the values.
                if chosen_label is not None and rejected_label is not None and chosen_label < rejected_label:
                    continue
                if not (chosen_label == 1 or high_value > low_value):
                    continue
                pair_id = content_hash("pair", "sibling", prefix, chosen, rejected)
                policies = sorted({p for p in (label_by_node[chosen].get("policy"), label_by_node[rejected].get("policy")) if p})
                candidates[pair_id] = Pair(
                    pair_id=pair_id, problem_id=problem.problem_id, kind="sibling", prompt=prompt,
                    chosen=tree.nodes[chosen]["text"], rejected=tree.nodes[rejected]["text"], prefix_node_id=prefix,
                    chosen_node_id=chosen, rejected_node_id=rejected, chosen_value=high_value,
                    rejected_value=low_value, margin=margin, sources=",".join(policies) or "labels",
                )
    ranked = sorted(candidates.values(), key=lambda pair: (-pair.margin, pair.pair_id))
    return ranked[: config.max_sibling_pairs_per_problem]


def trajectory_pairs(
    problem: Problem,
    rollouts: list[dict],
    text: dict[str, str],
    value: dict[str, float | None],
    config: PairsConfig,
) -> list[Pair]:
    """Correct vs incorrect complete solutions of one problem (best correct with worst incorrect first)."""
    origins = set(config.trajectory_origins)
    sides: dict[bool, dict[str, tuple[float, list[str]]]] = {True: {}, False: {}}
    for rollout in rollouts:
        ids = rollout["node_ids"] or []
        outcome = rollout["outcome"]
        if rollout["origin"] not in origins or outcome is None or not ids or any(nid not in text for nid in ids):
            continue
        known = [value[nid] for nid in ids if value.get(nid) is not None]
        score = sum(known) / len(known) if known else float(outcome)
        # One entry per distinct path (its leaf): two rollouts along one path are one solution.
        sides[bool(outcome)].setdefault(ids[-1], (score, ids))
    correct = sorted(sides[True].items(), key=lambda item: (-item[1][0], item[0]))
    wrong = sorted(sides[False].items(), key=lambda item: (item[1][0], item[0]))
    if not correct or not wrong:
        return []
    separator = config.split.separator()
    made: dict[str, Pair] = {}
    for i in range(min(config.max_trajectory_pairs_per_problem, max(len(correct), len(wrong)))):
        (chosen, (chosen_value, chosen_ids)), (rejected, (rejected_value, rejected_ids)) = (
            correct[i % len(correct)], wrong[i % len(wrong)]
        )
        pair_id = content_hash("pair", "trajectory", None, chosen, rejected)
        made.setdefault(pair_id, Pair(
            pair_id=pair_id, problem_id=problem.problem_id, kind="trajectory", prompt=_prompt(problem, [], config.split),
            chosen=separator.join(text[nid] for nid in chosen_ids),
            rejected=separator.join(text[nid] for nid in rejected_ids),
            prefix_node_id=None, chosen_node_id=chosen, rejected_node_id=rejected,
            chosen_value=chosen_value, rejected_value=rejected_value, margin=chosen_value - rejected_value,
            sources="outcome",
        ))
    return list(made.values())


def _run_shard(inputs, ctx) -> Iterator[Record]:
    # A live agent task's steps are conversations, not text to join: its pairs are the agent
    # curation's (executed better actions, in TRL's conversational format).
    live = {p.problem_id for p in inputs.problems() if live_environment(p)}
    problems = [p for p in inputs.problems() if p.problem_id not in live]
    rollouts = [r for r in inputs.rows("rollouts") if r["problem_id"] not in live]
    return run(problems, rollouts, inputs.rows("nodes"), inputs.rows("labels"), ctx.config.pairs)


SPEC = Stage(
    name=STAGE, version=VERSION, slot="pairs", after="labels", kind="derive",
    reads={"problems": ("problems",), "rollouts": TREE_SLOTS, "nodes": TREE_SLOTS, "labels": ("labels",)},
    writes=("pairs", "rejects"), run=_run_shard, key=lambda ctx, shard: (ctx.config.pairs.model_dump(),),
    config_field="pairs", doc="Step-DPO, sibling and trajectory preference pairs from the labelled tree.",
)
