"""Verify stage: the evidence sources beyond Monte Carlo, over one shard of the step tree.

Verifiers only add evidence: they write evaluations and never labels, so how evidence becomes
a label stays one decision, made by consensus (``stages/consensus/policy.py``). Two sources:
``tool`` (sympy, math-verify, sandboxed code; ``stages/verify/math_checks.py``) and ``judge``
(an LLM critic or step grader; ``stages/verify/judge.py``). Which of them run is configuration.

Agent tasks (``stages/agent/trajectory.py``) get their own verifiers under the same two sources:
the tool-grounded call / result / answer checks (``stages/verify/agent_checks.py``) and the 1-10
rubric grader (``stages/verify/agent_judge.py``). ``VERIFIERS`` below is the table of (source,
problem kind) → verifier; each problem goes to the verifiers of its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Problem, Record
from stepforge.stages.base import Stage
from stepforge.stages.tree import TREE_SLOTS
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.verify import agent_checks
from stepforge.stages.verify import agent_judge
from stepforge.stages.verify import judge
from stepforge.stages.verify import math_checks as tool_verify
from stepforge.stages.verify.agent_checks import AgentCheckConfig
from stepforge.stages.verify.agent_judge import AgentJudgeConfig
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.verify.judge import JudgeConfig
from stepforge.stages.llm import BackendConfig, GenerationClient
from stepforge.stages.verify.math_checks import ToolConfig

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


# One verifier per (evidence source, problem kind): each writes evaluations of its source onto the
# step tree and ticks progress once per problem. Tool checks need no model; judges get the client.
VERIFIERS: dict[Source, dict[bool, Callable[..., Iterator[Record]]]] = {
    "tool": {
        False: lambda ps, rs, ns, cfg, client, checker, tick: tool_verify.run(ps, rs, ns, cfg.tool, checker, on_problem_done=tick),
        True: lambda ps, rs, ns, cfg, client, checker, tick: agent_checks.run(ps, rs, ns, cfg.agent_tool, checker, on_problem_done=tick),
    },
    "judge": {
        False: lambda ps, rs, ns, cfg, client, checker, tick: judge.run(ps, rs, ns, cfg.judge, client(), on_problem_done=tick),
        True: lambda ps, rs, ns, cfg, client, checker, tick: agent_judge.run(ps, rs, ns, cfg.agent_judge, client(), on_problem_done=tick),
    },
}
"""source → is an agent problem → the verifier."""


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: VerifyConfig,
    judge_client: Callable[[], GenerationClient],
    checker: AnswerChecker,
    on_problem_done: Callable[[int], None] | None = None,
) -> Iterator[Record]:
    """Each configured verifier's evaluations and rejects, tool first, maths before agents.
    ``judge_client`` is called only when the judge runs, so a tool-only run never loads a model;
    ``on_problem_done`` ticks once per problem per source."""
    problems, rollouts, nodes = list(problems), list(rollouts), list(nodes)
    tick = on_problem_done or (lambda n=1: None)
    for source in ("tool", "judge"):
        if source not in config.sources:
            continue
        for is_agent in (False, True):
            chosen = [p for p in problems if agent.is_agent_problem(p) == is_agent]
            if chosen:
                yield from VERIFIERS[source][is_agent](chosen, rollouts, nodes, config, judge_client, checker, tick)


def _key(ctx, shard) -> tuple:
    """Only the verifiers that run enter the key: a tool-only shard never loads the judge's model,
    and changing the judge's settings does not redo it."""
    cfg: VerifyConfig = ctx.config.verify
    parts: dict = {"sources": list(cfg.sources)}
    if "tool" in cfg.sources:
        parts["tool"] = cfg.tool.model_dump(mode="json", exclude={"code_workers"})
    # Agent settings enter only when changed, so stores made before they existed keep their keys.
    for section in ("agent_tool", "agent_judge"):
        source = "tool" if section == "agent_tool" else "judge"
        current = getattr(cfg, section)
        if source in cfg.sources and current != type(current)():
            parts[section] = current.model_dump(mode="json")
    if "judge" in cfg.sources:
        parts["judge"] = cfg.judge.model_dump(mode="json")
        # Named, not loaded: `stepforge export` computes every key and must not load a judge model.
        parts["judge_engine"] = ctx.engine(cfg.judge_backend or ctx.config.backend)
    return (parts,)


def _run_shard(inputs, ctx) -> Iterator[Record]:
    problems, cfg = inputs.problems(), ctx.config.verify
    with ctx.track(f"verify {inputs.shard[:8]}", len(problems) * len(cfg.sources)) as advance:
        yield from run(problems, inputs.rows("rollouts"), inputs.rows("nodes"), cfg, ctx.judge_client, ctx.checker,
                       on_problem_done=advance)


SPEC = Stage(
    name=STAGE, version=VERSION, slot="verification", after="step_values", kind="verify",
    reads={"problems": ("problems",), "rollouts": TREE_SLOTS, "nodes": TREE_SLOTS}, writes=("evaluations", "rejects"),
    run=_run_shard, key=_key, config_field="verify",
    doc="Evidence beyond completions: tool checks (math, agent) and LLM judges, per problem kind.",
)
