"""Step-DPO pairs: at the first step where a solution goes wrong, a right step from the same prefix.

For each policy rollout whose steps keep a positive value up to step j and then drop to 0:
prompt = problem + steps[:j] (the correct prefix), rejected = step j, chosen = the first step
of a completion from that same prefix that reached the gold answer (for j = 0, a correct
policy rollout's first step). Among several, the one with the highest value: its own MC
value if it was labelled, else the success rate of the continuations through it — which is
also what the pair's margin is measured with. One pair per (prefix, rejected step).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Pair, Problem, Record, Reject
from stepforge.stages.split import SplitConfig, join_prefix

STAGE = "pairs"
VERSION = 1


class PairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    split: SplitConfig = Field(default_factory=SplitConfig, description="Joins the prefix steps in the prompt.")
    max_pairs_per_problem: int = Field(default=16, ge=1, description="Cap, to keep easy problems from dominating.")


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    labels: Iterable[dict],
    config: PairsConfig,
) -> Iterator[Record]:
    """Pairs in problem order; a first error with no correct alternative is a reject, counted."""
    text = {n["node_id"]: n["text"] for n in nodes}
    value = {lab["node_id"]: lab["value"] for lab in labels}
    policy: dict[str, list[dict]] = defaultdict(list)
    # (problem, prefix node or None) -> next step -> [continuations through it, of which correct]
    next_steps: dict[tuple[str, str | None], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for rollout in sorted(rollouts, key=lambda r: r["rollout_id"]):
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
                prompt=problem.question + "\n\n" + join_prefix([text[i] for i in prefix_ids], config.split),
                chosen=text[chosen], rejected=text[rejected], prefix_node_id=prefix,
                chosen_node_id=chosen, rejected_node_id=rejected, chosen_value=chosen_value,
                rejected_value=values[first_bad],
                margin=chosen_value - values[first_bad],
                sources="mc",
            )
        yield from made.values()
