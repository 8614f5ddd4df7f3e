"""Verify stage: the evidence sources beyond Monte Carlo, over one shard of the step tree.

Verifiers only add evaluations (DESIGN §2): ``tool`` (sympy, math-verify, sandboxed code;
``stages.tool_verify``) and ``judge`` (an LLM critic or step grader; ``stages.judge``). Which
of them run is configuration; consensus decides how their evidence combines.

Agent tasks (``stages.agent``) get their own verifiers under the same two sources: the
tool-grounded call / result / answer checks (``stages.agent_checks``) and the 1-10 rubric
grader (``stages.agent_judge``). Each problem goes to the verifiers of its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Problem, Record
from stepforge.stages import agent, agent_checks, agent_judge, judge, tool_verify
from stepforge.stages.agent_checks import AgentCheckConfig
from stepforge.stages.agent_judge import AgentJudgeConfig
from stepforge.stages.answers import AnswerChecker
from stepforge.stages.judge import JudgeConfig
from stepforge.stages.llm import BackendConfig, GenerationClient
from stepforge.stages.tool_verify import ToolConfig

STAGE = "verify"
VERSION = 1

Source = Literal["tool", "judge"]


class VerifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: tuple[Source, ...] = Field(
        default=("tool",),
        description="Verifiers to run: tool (calculations, final answers, code; no model, cheap) and/or judge "
        "(an LLM reads the solution; costs a generation per solution or step).",
    )
    tool: ToolConfig = Field(default_factory=ToolConfig, description="Tool-grounded checks.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="LLM-as-judge.")
    agent_tool: AgentCheckConfig = Field(
        default_factory=AgentCheckConfig, description="Tool-grounded checks of agent steps (source tool)."
    )
    agent_judge: AgentJudgeConfig = Field(
        default_factory=AgentJudgeConfig, description="1-10 rubric grading of agent steps (source judge)."
    )
    judge_backend: BackendConfig | None = Field(
        default=None, description="The judge's model and engine; None = the policy's backend."
    )


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: VerifyConfig,
    judge_client: Callable[[], GenerationClient],
    checker: AnswerChecker,
    on_problem_done: Callable[[int], None] | None = None,
) -> Iterator[Record]:
    """Each configured verifier's evaluations and rejects, tool first. ``judge_client`` is called
    only when the judge runs, so a tool-only run never loads a model."""
    problems, rollouts, nodes = list(problems), list(rollouts), list(nodes)
    tasks = [p for p in problems if agent.is_agent_problem(p)]
    maths = [p for p in problems if not agent.is_agent_problem(p)]
    if "tool" in config.sources:
        if maths:
            yield from tool_verify.run(maths, rollouts, nodes, config.tool, checker)
        if tasks:
            yield from agent_checks.run(tasks, rollouts, nodes, config.agent_tool, checker)
    if "judge" in config.sources:
        if maths:
            yield from judge.run(maths, rollouts, nodes, config.judge, judge_client(), on_problem_done=on_problem_done)
        if tasks:
            yield from agent_judge.run(tasks, rollouts, nodes, config.agent_judge, judge_client(), on_problem_done=on_problem_done)
    elif on_problem_done:
        on_problem_done(len(problems))
