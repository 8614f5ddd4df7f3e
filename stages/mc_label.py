"""Math-Shepherd Monte Carlo labelling: K independent completions from every step prefix.

For each distinct internal step of a problem's policy rollouts, the policy continues the
solution from just after that step K times (K separate samples, each its own request, so
they are independent and individually cached). The fraction that reach the gold answer is
the step's soft value; "any reached it" is its hard label (consensus derives labels).
A rollout's last step is valued by the rollout's own checked outcome.

Every prefix of every problem is requested at once; the backend batches. Completions are
stored as ``mc`` rollouts below their prefix node, and their steps as ``mc`` nodes, so the
tree keeps the evidence (Step-DPO's chosen steps come from it).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Problem, Record, Reject
from stepforge.stages.answers import AnswerChecker
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient, GenerationError
from stepforge.stages.prompting import PromptConfig, SamplingConfig, build_request
from stepforge.stages.split import SplitConfig
from stepforge.stages.tree import PathPrefix, TreeBuilder, first_occurrences

STAGE = "mc_label"
VERSION = 1


class MCLabelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    completions_per_step: int = Field(default=8, ge=1, description="K: independent completions per step prefix.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling of the completions.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Must match the rollout stage's prompt.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Must match the rollout stage's splitting.")


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
) -> Iterator[Record]:
    """Evaluations (``mc`` for internal steps, ``outcome`` for last steps), completion rollouts and nodes."""
    nodes_by_id = {n["node_id"]: n for n in nodes}
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for rollout in rollouts:
        if rollout["origin"] == "policy":
            by_problem[rollout["problem_id"]].append(rollout)
    builder = TreeBuilder(config.split, checker, client.backend.count_tokens, client.model_id, frozenset(nodes_by_id))

    async def label_step(problem: Problem, nid: str, prefix: PathPrefix) -> list[Record]:
        request = build_request(
            problem.question, list(prefix.texts), config.completions_per_step, config.prompt, config.split,
            config.sampling,
        )
        records: list[Record] = []
        successes = n = cost = 0
        for index, generation in enumerate(await client.generate_each(request)):
            if isinstance(generation, GenerationError):
                records.append(Reject(stage=STAGE, item=f"{nid}#{index}", reason="generation_failed", detail=str(generation)))
                continue
            if isinstance(generation, BaseException):
                raise generation
            cost += generation.num_tokens
            rollout, new_nodes, reject = builder.from_generation(
                STAGE, problem.problem_id, problem.gold_answer, prefix, generation, "mc", index
            )
            records.extend(new_nodes)
            if reject is not None:
                # An empty continuation of a prefix is a failed attempt, not a missing one.
                records.append(reject)
                n += 1
                continue
            records.append(rollout)
            n += 1
            successes += bool(rollout.outcome)
        if n:
            records.append(
                Evaluation(
                    evaluation_id=content_hash("eval", nid, "mc", client.model_id, config.model_dump()),
                    node_id=nid, problem_id=problem.problem_id, source="mc", value=successes / n, n=n,
                    successes=successes, model=client.model_id, cost_tokens=cost,
                    meta=json.dumps({"k": config.completions_per_step, "temperature": config.sampling.temperature}),
                )
            )
        if on_step_done:
            on_step_done(1)
        return records

    async def label_problem(problem: Problem) -> list[Record]:
        internal, leaves = step_prefixes(by_problem.get(problem.problem_id, []), nodes_by_id)
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
        for part in await asyncio.gather(*(label_step(problem, nid, internal[nid]) for nid in sorted(internal))):
            records.extend(part)
        return first_occurrences(records, set())

    yield from run_in_order(problems, label_problem)

