"""The labeller kind: one hook that values a shard's steps by spending completions on them.

Every labeller (``mc_label``, ``binary_search``, ``mcts``) takes the same inputs — the shard's
problems, its policy and imported trajectories (rollouts and nodes of the ``problems`` and
``rollouts`` slots), its config section, the policy's client and the answer checker — and writes
``evaluations`` plus the completions it spent (as ``rollouts`` and ``nodes`` below their prefix),
into the ``step_values`` slot. ``labeller_stage`` turns such a function into the stage the
runtime runs; ``RunConfig.labeller`` chooses one per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from stepforge.schemas.records import Record
from stepforge.stages.agent.episodes import key_of as episodes_key
from stepforge.stages.agent.episodes import runner_for
from stepforge.stages.base import Stage, key_settings
from stepforge.stages.tree import TREE_SLOTS

SLOT = "step_values"
TABLES = ("evaluations", "rollouts", "nodes", "rejects")
TREE = TREE_SLOTS[:2]  # a labeller reads the trajectories before its own completions: imported and sampled


def labeller_stage(
    name: str, version: int, config_name: str, config_field: str | None, label: Callable[..., Iterable[Record]],
    progress: Callable[[list], int] | None = None, doc: str = "",
) -> Stage:
    """A labeller as a stage. ``label(problems, rollouts, nodes, config, client, checker, advance, agent=)``
    (``agent``: the run's episode runner when its problems are live agent tasks, else None);
    ``progress(rollouts)`` is the progress bar's total (default: the shard's problems)."""

    def run(inputs, ctx) -> Iterator[Record]:
        problems, rollouts, nodes = inputs.problems(), inputs.rows("rollouts"), inputs.rows("nodes")
        total = progress(rollouts) if progress else len(problems)
        with ctx.track(f"{name} {inputs.shard[:8]}", total) as advance:
            # Only a run of live agent tasks passes a runner, so a plugin labeller without ``agent`` still fits.
            extra = {"agent": runner} if (runner := runner_for(ctx)) is not None else {}
            yield from label(problems, rollouts, nodes, getattr(ctx.config, config_field), ctx.client(), ctx.checker,
                             advance, **extra)

    return Stage(
        name=name, version=version, slot=SLOT, after="rollouts", kind="label", writes=TABLES,
        reads={"problems": ("problems",), "rollouts": TREE, "nodes": TREE}, run=run,
        # The policy's engine and the labeller's settings shape the completions it spends.
        key=lambda ctx, shard: (ctx.engine(), key_settings(getattr(ctx.config, config_field)), *episodes_key(ctx)),
        chosen=lambda config: config.labeller == config_name, config_field=config_field, doc=doc,
    )
