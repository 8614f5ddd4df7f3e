"""Rollout stage: N sampled solutions per problem, split into steps, final answers checked."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Problem, Record
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


def _run_shard(inputs, ctx) -> Iterator[Record]:
    config: RolloutConfig = ctx.config.rollout
    if config.samples_per_problem == 0:  # imported solutions only: no model needed
        return
    problems = inputs.problems()
    with ctx.track(f"rollouts {inputs.shard[:8]}", len(problems)) as advance:
        yield from run(problems, config, ctx.client(), ctx.checker, on_problem_done=advance)


# The policy's engine enters the key: other weights or another context size sample other solutions.
SPEC = Stage(
    name=STAGE, version=VERSION, slot="rollouts", after="problems", kind="generate",
    reads={"problems": ("problems",)}, writes=("rollouts", "nodes", "rejects"),
    run=_run_shard, key=lambda ctx, shard: (ctx.engine(), ctx.config.rollout.model_dump()),
    config_field="rollout", doc="N sampled solutions per problem, split into steps, final answers checked.",
)
