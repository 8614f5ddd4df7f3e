"""Rollout stage: N sampled solutions per problem, split into steps, final answers checked; for a live
agent task (``ingest.environment``), N episodes in its environment (``stages.agent.episodes``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Problem, Record
from stepforge.stages.agent.episodes import EpisodeBuilder, EpisodeRunner, live_environment, runner_for
from stepforge.stages.agent.episodes import key_of as episodes_key
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient
from stepforge.stages.rollout.prompting import PromptConfig, SamplingConfig, build_request
from stepforge.stages.base import Stage
from stepforge.stages.rollout.split import SplitConfig
from stepforge.stages.tree import PathPrefix, TreeBuilder, first_occurrences

STAGE = "rollout"
VERSION = 1


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples_per_problem: int = Field(
        default=4, ge=0,
        description="Independent solutions sampled per problem; 0 = none (label imported solutions only).",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters of the policy.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="How the problem is put to the policy.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="How a solution is cut into steps.")


def run(
    problems: Iterable[Problem],
    config: RolloutConfig,
    client: GenerationClient,
    checker: AnswerChecker,
    on_problem_done: Callable[[], None] | None = None,
) -> Iterator[Record]:
    """Rollouts and their nodes for every problem; a failed or empty sample becomes a reject."""
    builder = TreeBuilder(config.split, checker, client.backend.count_tokens, client.model_id)

    async def solve(problem: Problem) -> list[Record]:
        request = build_request(
            problem.question, [], config.samples_per_problem, config.prompt, config.split, config.sampling
        )
        records: list[Record] = []
        for index, result in enumerate(await client.generate_each(request)):
            rollout, nodes, reject = builder.from_result(
                STAGE, problem.problem_id, problem.gold_answer, PathPrefix(), result, "policy", index,
                item=f"{problem.problem_id}#{index}",
            )
            records.extend(nodes)
            records.append(rollout or reject)
        if on_problem_done:
            on_problem_done()
        return first_occurrences(records, set())

    yield from run_in_order(problems, solve)


def run_episodes(
    problems: Iterable[Problem],
    config: RolloutConfig,
    runner: EpisodeRunner,
    checker: AnswerChecker,
    on_problem_done: Callable[[], None] | None = None,
) -> Iterator[Record]:
    """Episodes and their nodes for every live agent task: ``samples_per_problem`` episodes each,
    turns sampled with the rollout's sampling (its ``max_tokens`` is a turn's limit)."""
    builder = EpisodeBuilder(checker, runner.client.model_id)

    async def solve(problem: Problem) -> list[Record]:
        episodes = await asyncio.gather(
            *(runner.run(problem, PathPrefix(), index, config.sampling) for index in range(config.samples_per_problem))
        )
        records: list[Record] = []
        for index, episode in enumerate(episodes):
            rollout, nodes, reject = builder.from_result(
                STAGE, problem, PathPrefix(), episode, "policy", index, item=f"{problem.problem_id}#{index}"
            )
            records.extend(nodes)
            records.append(rollout or reject)
        if on_problem_done:
            on_problem_done()
        return first_occurrences(records, set())

    yield from run_in_order(problems, solve)


def _run_shard(inputs, ctx) -> Iterator[Record]:
    config: RolloutConfig = ctx.config.rollout
    if config.samples_per_problem == 0:  # imported solutions only: no model needed
        return
    problems = inputs.problems()
    runner = runner_for(ctx)
    tasks = [p for p in problems if runner is not None and live_environment(p)]
    others = [p for p in problems if not (runner is not None and live_environment(p))]
    with ctx.track(f"rollouts {inputs.shard[:8]}", len(problems)) as advance:
        if others:
            yield from run(others, config, ctx.client(), ctx.checker, on_problem_done=advance)
        if tasks:
            yield from run_episodes(tasks, config, runner, ctx.checker, on_problem_done=advance)


# The policy's engine enters the key: other weights or another context size sample other solutions;
# so do the episode limits and the environment of a run whose problems are live agent tasks.
SPEC = Stage(
    name=STAGE, version=VERSION, slot="rollouts", after="problems", kind="generate",
    reads={"problems": ("problems",)}, writes=("rollouts", "nodes", "rejects"),
    run=_run_shard, key=lambda ctx, shard: (ctx.engine(), ctx.config.rollout.model_dump(), *episodes_key(ctx)),
    config_field="rollout", doc="N sampled solutions per problem, split into steps, final answers checked.",
)
