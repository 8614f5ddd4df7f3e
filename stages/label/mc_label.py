"""Math-Shepherd Monte Carlo labelling: K independent completions from every step prefix.

For each distinct internal step of a problem's policy rollouts, the policy continues the
solution from just after that step K times (K separate samples, each its own request, so
they are independent and individually cached). The fraction that reach the gold answer is
the step's soft value; "any reached it" is its hard label (consensus derives labels).
A rollout's last step is valued by the rollout's own checked outcome.

Every prefix of every problem is requested at once; the backend batches. Completions are
stored as ``mc`` rollouts below their prefix node, and their steps as ``mc`` nodes, so the
tree keeps the evidence (Step-DPO's chosen steps come from it).

Adaptive sampling (``adaptive``) draws a prefix's completions in rounds and stops once its
label is decided; for a hard label, a policy rollout that already went through the step to
the right answer decides it before any completion is drawn.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from pydantic import Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Problem, Record
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.label.labeller import labeller_stage
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient
from stepforge.stages.label.search import AdaptiveConfig, CompletionConfig, labeller_inputs, sampler_for
from stepforge.stages.tree import PathPrefix, first_occurrences

STAGE = "mc_label"
VERSION = 1


class MCLabelConfig(CompletionConfig):
    """Sampling, prompt and split (shared with the rollout stage) come from ``CompletionConfig``."""

    completions_per_step: int = Field(default=8, ge=1, description="K: independent completions per step prefix.")
    adaptive: AdaptiveConfig = Field(
        default_factory=AdaptiveConfig,
        description="Sample each prefix in rounds and stop once its label is decided; K stays the cap.",
    )


def step_prefixes(rollouts: Iterable[dict], nodes: dict[str, dict]) -> tuple[dict[str, PathPrefix], dict[str, list[dict]]]:
    """Distinct internal prefixes (node -> path to it) and the rollouts ending at each leaf node."""
    internal: dict[str, PathPrefix] = {}
    leaves: dict[str, list[dict]] = defaultdict(list)
    for rollout in rollouts:
        path = PathPrefix()
        ids = rollout["node_ids"]
        for position, nid in enumerate(ids):
            path = path.extend(nid, nodes[nid]["text"])
            if position < len(ids) - 1:
                internal.setdefault(nid, path)
        leaves[ids[-1]].append(rollout)
    return internal, leaves


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: MCLabelConfig,
    client: GenerationClient,
    checker: AnswerChecker,
    on_step_done: Callable[[int], None] | None = None,
    agent=None,
) -> Iterator[Record]:
    """Evaluations (``mc`` for internal steps, ``outcome`` for last steps), completion rollouts and nodes.
    With an episode runner (``agent``), a live agent task's completions are continued episodes."""
    nodes_by_problem, by_problem, builder = labeller_inputs(rollouts, nodes, config, client, checker)

    async def label_step(problem: Problem, nid: str, prefix: PathPrefix, seen: tuple[int, int], sampler) -> list[Record]:
        records: list[Record] = []
        successes = n = failed = cost = 0
        k, adaptive = config.completions_per_step, config.adaptive
        if adaptive.enabled and adaptive.target == "hard" and seen[1]:
            # A policy rollout through this step already reached the answer: the hard label is
            # decided before any completion (every step of a correct solution costs nothing).
            if on_step_done:
                on_step_done(1)
            return [
                Evaluation(
                    evaluation_id=content_hash("eval", nid, "mc", client.model_id, config.model_dump()),
                    node_id=nid, problem_id=problem.problem_id, source="mc", value=seen[1] / seen[0], n=seen[0],
                    successes=seen[1], model=client.model_id, cost_tokens=0,
                    meta=json.dumps({"k": k, "temperature": config.sampling.temperature, "adaptive": True,
                                     "stopped_early": True, "from_policy_rollouts": True}),
                )
            ]
        batch = adaptive.batch if adaptive.enabled else k
        # Rounds draw sample indices 0, 1, 2, ... of the same prompt, so an adaptive run's
        # completions are exactly the first ones a full K-sample run draws (and share its cache).
        while n < k and not adaptive.decided(successes, n):
            for index, result in enumerate(await sampler.draw(prefix, min(batch, k - n), n), n):
                n += 1
                rollout, new_nodes, reject = sampler.make(STAGE, prefix, result, "mc", index, f"{nid}#{index}")
                records.extend(new_nodes)
                # An empty continuation of a prefix is a failed attempt, not a missing one; a failed
                # sample counts as drawn (it cost an attempt) but not as evidence.
                records.append(rollout or reject)
                successes += bool(rollout and rollout.outcome)
                failed += reject is not None and reject.reason == "generation_failed"
                cost += sampler.tokens(result) or 0
        if n - failed:
            records.append(
                Evaluation(
                    evaluation_id=content_hash("eval", nid, "mc", client.model_id, config.model_dump()),
                    node_id=nid, problem_id=problem.problem_id, source="mc", value=successes / (n - failed),
                    n=n - failed, successes=successes, model=client.model_id, cost_tokens=cost,
                    meta=json.dumps(
                        {"k": k, "temperature": config.sampling.temperature, "adaptive": adaptive.enabled,
                         "stopped_early": n < k}
                    ),
                )
            )
        if on_step_done:
            on_step_done(1)
        return records

    async def label_problem(problem: Problem) -> list[Record]:
        own_nodes = nodes_by_problem.get(problem.problem_id, {})
        internal, leaves = step_prefixes(by_problem.get(problem.problem_id, []), own_nodes)
        records: list[Record] = []
        for leaf_id, ending in sorted(leaves.items()):
            correct = sum(bool(r["outcome"]) for r in ending)
            records.append(
                Evaluation(
                    evaluation_id=content_hash("eval", leaf_id, "outcome", sorted(r["rollout_id"] for r in ending)),
                    node_id=leaf_id, problem_id=problem.problem_id, source="outcome", value=correct / len(ending),
                    n=len(ending), successes=correct, model=client.model_id,
                    meta=json.dumps({"rollout_ids": sorted(r["rollout_id"] for r in ending)}),
                )
            )
        # Sorted so that the order of work (and of output rows) never depends on rollout order.
        seen: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # policy rollouts through a step, of which correct
        for rollout in by_problem.get(problem.problem_id, []):
            for step in rollout["node_ids"]:
                seen[step][0] += 1
                seen[step][1] += bool(rollout["outcome"])
        steps = sorted(internal)
        sampler = sampler_for(problem, client, builder, config, agent, own_nodes)
        for part in await asyncio.gather(*(label_step(problem, nid, internal[nid], tuple(seen[nid]), sampler) for nid in steps)):
            records.extend(part)
        return first_occurrences(records, set())

    yield from run_in_order(problems, label_problem)



def _label(problems, rollouts, nodes, config, client, checker, advance, agent=None):
    return run(problems, rollouts, nodes, config, client, checker, on_step_done=advance, agent=agent)


SPEC = labeller_stage(
    STAGE, VERSION, "mc", "mc_label", _label,
    progress=lambda rollouts: len({nid for r in rollouts for nid in r["node_ids"][:-1]}),  # one tick per prefix
    doc="Math-Shepherd: K completions after every step prefix (labeller: mc).",
)
