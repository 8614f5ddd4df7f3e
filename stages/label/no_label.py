"""``labeller: none``: no completions are spent; steps are labelled by verifiers, imported labels and humans."""

from __future__ import annotations

from stepforge.stages.base import Stage
from stepforge.stages.label.labeller import SLOT, TABLES


def _nothing(inputs, ctx):
    return iter(())


SPEC = Stage(
    name="no_label", version=1, slot=SLOT, after="rollouts", kind="derive", writes=TABLES, reads={},
    run=_nothing, chosen=lambda config: config.labeller == "none",
    doc="No Monte Carlo evidence (labeller: none): the slot is an empty shard.",
)
