"""A stage from outside stepforge, as a user would write one: one module, declared with ``SPEC``.

It checks each step's length and writes the result as tool evidence in a slot of its own. Its
settings are the run config's ``plugins.step_lengths`` entry. Nothing in stepforge's runtime,
flows or CLI knows of it (tests/test_stage_plugin.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Reject
from stepforge.stages.base import Stage


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_chars: int = 20


def settings(ctx) -> Settings:
    return Settings(**ctx.config.plugins[__name__])


def run(inputs, ctx):
    cfg = settings(ctx)
    for node in inputs.rows("nodes"):
        if not node["text"].strip():
            yield Reject(stage=SPEC.name, item=node["node_id"], reason="empty_step", detail="a step with no text")
            continue
        long_enough = len(node["text"]) >= cfg.min_chars
        yield Evaluation(
            evaluation_id=content_hash("step_lengths", node["node_id"], cfg.min_chars), node_id=node["node_id"],
            problem_id=node["problem_id"], source="tool", value=None, n=1, successes=int(long_enough),
            verdict=1 if long_enough else -1, model="step-length", rationale=f"{len(node['text'])} chars",
        )


SPEC = Stage(
    name="step_lengths", version=1, slot="step_lengths", after="rollouts", kind="derive",
    reads={"nodes": ("problems", "rollouts")}, writes=("evaluations", "rejects"), run=run,
    key=lambda ctx, shard: (settings(ctx).model_dump(),),
    chosen=lambda config: __name__ in config.plugins, doc="Flags steps shorter than min_chars.",
)
