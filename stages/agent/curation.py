"""The agent-curation stage (WebSTAR): step decisions, written reasoning for kept steps, better
actions at wrong ones — one shard per problem shard, in the ``agent_steps`` slot. For live agent
tasks the better actions are executed and valued by the episodes continued after them (their
continuations are this slot's ``rollouts``).

The filter is pure; the reasoning writer and the alternatives enter the key (and load a model)
only when enabled. A shard without agent problems is written empty without loading a model.
"""

from __future__ import annotations

from collections.abc import Iterator

from stepforge.schemas.records import Record
from stepforge.stages.agent import agent_pairs, augment, step_filter
from stepforge.stages.agent.episodes import key_of as episodes_key
from stepforge.stages.agent.episodes import runner_for
from stepforge.stages.agent.trajectory import is_agent_problem
from stepforge.stages.base import Stage
from stepforge.stages.tree import EVIDENCE_SLOTS, TREE_SLOTS


def _key(ctx, shard) -> tuple:
    cfg = ctx.config
    parts: dict = {"filter": cfg.filter.model_dump(mode="json")}
    if cfg.augment.enabled:
        writer = ctx.writer_backend()
        parts["augment"] = (cfg.augment.model_dump(mode="json"), *ctx.engine(writer))
    if cfg.agent_pairs.enabled:
        live = episodes_key(ctx)  # () unless the run's problems are live agent tasks
        parts["agent_pairs"] = (
            cfg.agent_pairs.key(bool(live)), ctx.engine(), cfg.verify.agent_judge.model_dump(mode="json"),
            *ctx.engine(cfg.verify.judge_backend or cfg.backend), *live,
        )
    return (parts,)


def _run_shard(inputs, ctx) -> Iterator[Record]:
    cfg = ctx.config
    problems = [p for p in inputs.problems() if is_agent_problem(p)]
    if not problems:
        return
    rollouts, labels = inputs.rows("rollouts"), inputs.rows("labels")
    decisions = list(step_filter.run(problems, rollouts, labels, inputs.rows("evaluations"), cfg.filter))
    yield from decisions
    if cfg.augment.enabled:
        kept = [d.node_id for d in decisions if d.kept]
        with ctx.track(f"reasoning {inputs.shard[:8]}", len(set(kept))):
            yield from augment.run(problems, inputs.rows("nodes"), kept, cfg.augment, ctx.writer_client())
    if cfg.agent_pairs.enabled:
        with ctx.track(f"agent pairs {inputs.shard[:8]}", len(problems)):
            yield from agent_pairs.run(problems, rollouts, inputs.rows("nodes"), labels, cfg.agent_pairs,
                                       cfg.verify.agent_judge, ctx.client(), ctx.judge_client(),
                                       runner=runner_for(ctx), checker=ctx.checker)


SPEC = Stage(
    name="filter", version=step_filter.VERSION, slot="agent_steps", after="labels", kind="curate",
    reads={"problems": ("problems",), "rollouts": TREE_SLOTS, "nodes": TREE_SLOTS, "labels": ("labels",),
           "evaluations": EVIDENCE_SLOTS},
    writes=("step_filter", "augmentations", "nodes", "rollouts", "evaluations", "pairs", "rejects"),
    run=_run_shard, key=_key, config_field="filter",
    doc="Agent trajectories (WebSTAR): kept/dropped steps; opt-in, reasoning for kept steps and sampled, graded better actions at wrong ones.",
)
