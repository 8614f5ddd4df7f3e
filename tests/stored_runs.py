"""A stored, fully labelled run made without Prefect (ingest → every chain slot → export → run record),
for tests of what works on existing runs: review, backfill."""

from __future__ import annotations

from pathlib import Path

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig


def store_run(cfg: RunConfig) -> runtime.RunContext:
    """Every stage over every problem shard of ``cfg``, its exports and its run record; returns the
    context (the caller closes it, or lets it go: a model-free run holds no model)."""
    ctx = runtime.RunContext(cfg)
    problem_shards, reject_shard = runtime.ingest_shards(ctx)
    chains = [runtime.run_chain(ctx, m) for m in problem_shards]
    runtime.record_run(ctx, "completed", runtime.export_run(ctx, chains, reject_shard), {}, chains=chains, reject_shard=reject_shard)
    return ctx


FIXTURES = Path(__file__).parent / "fixtures"


def processbench_config(store: Path, run: str, limit: int, **overrides) -> RunConfig:
    """ProcessBench trajectories (GSM8K split) checked by the tools alone, their human labels kept out
    (human_override off): a model-free run whose labels come from arithmetic checks."""
    return RunConfig.model_validate({
        "run": run, "store": str(store), "labeller": "none", "shard_size": 4,
        "ingest": {"source": str(FIXTURES / "processbench_gsm8k_dev40.json"), "format": "processbench",
                   "gold_source": str(FIXTURES / "gsm8k_processbench40.jsonl"), "limit": limit},
        "rollout": {"samples_per_problem": 0}, "verify": {"sources": ["tool"]},
        "consensus": {"policy": "tool", "human_override": False},
        "export": {"out_dir": str(store / "export"), "formats": ["prm_stepwise"]},
        **overrides,
    })
