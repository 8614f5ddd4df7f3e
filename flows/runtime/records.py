"""What a run hands on: its datasets (export), what they cost (traffic), and its record.

Export only reads: it is re-runnable at will, from any copy of the store (every path comes
from the ``RunContext``'s store, never from where the run was first made).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict

from stepforge.flows.runtime.chain import Chains, chain_shard_keys, shard_key
from stepforge.flows.runtime.context import RunContext
from stepforge.flows.runtime.registry import ROOT
from stepforge.stages.export import datasets as export
from stepforge.stages.review import annotations as review
from stepforge.storage.runs import write_run_record
from stepforge.storage.shards import ShardManifest

STEP_PAIRS_SLOT, AGENT_SLOT = "pairs", "agent_steps"  # export keeps step pairs and agent pairs apart


def export_run(ctx: RunContext, chains: Chains, reject_shard: ShardManifest) -> list[dict]:
    """The datasets of the given complete chains; the card counts the ingest rejects of ``reject_shard`` too."""
    writers = {ROOT: ("problems", "rollouts", "nodes")} | {
        slot: ctx.chain.stage(slot).writes for slot in ctx.chain.stage_slots
    }

    def read(table: str, slots: tuple[str, ...] | None = None):
        slots = slots or tuple(s for s in ctx.chain.slots if table in writers[s])
        return ctx.store.read(table, [chain[slot] for chain in chains for slot in slots])

    return list(
        export.run(
            ctx.config.export,
            problems=read("problems", (ROOT,)),
            rollouts=read("rollouts"),
            nodes=read("nodes"),
            labels=read("labels"),
            pairs=read("pairs", (STEP_PAIRS_SLOT,)),
            step_filter=read("step_filter"),
            augmentations=read("augmentations"),
            agent_pairs=read("pairs", (AGENT_SLOT,)),
            provenance=run_provenance(ctx, chains, reject_shard),
        )
    )


def figure_shard_keys(ctx: RunContext, chains: list[dict], reject_shard: ShardManifest | dict) -> set[str]:
    """What a card, report or artifact counts: the current chains, the ingest rejects, and the run's
    review shards (pushed items, every pulled annotation version, rejected annotations)."""
    return chain_shard_keys(chains, reject_shard) | {m.shard for m in ctx.store.manifests(ctx.run, review.STAGE)}


def run_provenance(ctx: RunContext, chains: Chains, reject_shard: ShardManifest) -> dict:
    """What the dataset card says about how the data was made: the run's key figures over exactly
    these chains (the DuckDB catalog restricted to their shards), the config, and the traffic."""
    from stepforge.flows.figures import run_figures

    # The run record's traffic is written after the export; the chains' manifests already hold it.
    traffic = shard_traffic([{slot: asdict(m) for slot, m in chain.items()} for chain in chains])
    figures = run_figures(ctx.store.root, ctx.run, figure_shard_keys(ctx, chains, reject_shard), traffic=traffic)
    return {"figures": figures, "config": ctx.config.model_dump(mode="json")}


def shard_traffic(chains: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Generation counts summed over the shards of these chains, from their manifests: what producing
    the run's data cost (requests, retries and give-ups by reason, tokens, cost), whichever process
    or Ray worker produced each shard, and however many times the run was resumed."""
    totals: dict[str, Counter] = {}
    for chain in chains:
        for manifest in chain.values():
            for role in RunContext.CLIENT_ROLES:
                if counts := (manifest.get("stats") or {}).get(role):
                    totals.setdefault(role, Counter()).update(counts)
    return {role: {k: round(v, 6) for k, v in sorted(counts.items())} for role, counts in totals.items()}


def saturation(ctx: RunContext, chains: list[dict]) -> dict[str, dict]:
    """This invocation's samples in flight over its whole wall time, per client role, beside the
    bound (``RunContext.saturation``), and each stage's share of it: the stage's in-flight seconds
    in the chains' shards made by this invocation over the same wall time (shards an earlier
    invocation made are skipped; the shares then add up to the whole)."""
    figures = ctx.saturation()
    for role, figure in figures.items():
        by_stage: Counter = Counter()
        for chain in chains:
            for slot, manifest in chain.items():
                m = asdict(manifest) if isinstance(manifest, ShardManifest) else manifest
                if slot == ROOT or m.get("created_at", 0) < ctx.window_opened_at:
                    continue
                if seconds := ((m.get("stats") or {}).get(role) or {}).get("in_flight_seconds"):
                    by_stage[ctx.chain.stage(slot).name] += seconds
        wall = figure["wall_seconds"]
        figure["mean_in_flight_by_stage"] = {name: round(v / wall, 3) for name, v in sorted(by_stage.items()) if wall}
    return figures


def record_run(
    ctx: RunContext, status: str, exports: list[dict] | None = None, traffic: dict | None = None,
    chains: list[dict] | None = None, reject_shard: ShardManifest | dict | None = None,
) -> dict:
    """The run's record: config, status, exported datasets, this process's generation counts, and the
    shard key of every chain slot (what a later backfill compares its labels with).

    ``stepforge export`` re-reads the config from it; the counts say what the last invocation
    paid for (generated) and replayed (cache_hits).
    """
    client = ctx.clients.get("generation")
    record = {
        "run": ctx.run, "created_at": time.time(), "status": status,
        "config": ctx.config.model_dump(mode="json"), "exports": exports or [],
        "generation": {**client.stats.as_dict(), **client.counters()} if client else {},
        "saturation": saturation(ctx, chains or []),
        "traffic": traffic or {},
        "chains": {
            shard_key(c[ROOT]): {slot: shard_key(m) for slot, m in c.items() if slot != ROOT} for c in chains or []
        },
        # With the chains, what an export or report of the stored run reads without the source.
        "reject_shard": shard_key(reject_shard) if reject_shard is not None else None,
    }
    write_run_record(ctx.store.root, ctx.run, record)
    return record
