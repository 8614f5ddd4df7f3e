"""Keys and chains: which shard every slot of every problem shard should be, and which exist.

A shard key is a content hash of what the shard was computed from — the key of the slot its
stage follows, the stage's name and version, and what its declaration says shapes its rows —
never of worker counts or run order. So the keys of a whole run follow from the problem shards
and the config alone: ``chain_keys`` computes them without loading a model, and a chain is
complete when a shard exists under each key.
"""

from __future__ import annotations

from collections import Counter

from stepforge.flows.runtime.context import RunContext
from stepforge.flows.runtime.registry import INGEST, INGEST_TABLES, ROOT
from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Problem, Record, Reject
from stepforge.stages.ingest import sources as ingest
from stepforge.storage.shards import ShardManifest

Chains = list[dict[str, ShardManifest]]


def group(records, tables: tuple[str, ...]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {t: [] for t in tables}
    for record in records:
        grouped[record.TABLE].append(record)
    return grouped


def ingest_shards(ctx: RunContext) -> tuple[list[ShardManifest], ShardManifest]:
    """Problem shards of ``shard_size`` problems each (keyed by their content), and the rejects shard.

    An imported dataset's trajectories and labels travel in the shard of their problem.
    """
    cfg = ctx.config
    problems: list[Problem] = []
    rejects: list[Reject] = []
    imported: dict[str, list[Record]] = {}
    for record in ingest.run(cfg.ingest):
        if isinstance(record, Problem):
            problems.append(record)
        elif isinstance(record, Reject):
            rejects.append(record)
        else:
            imported.setdefault(record.problem_id, []).append(record)
    manifests = []
    for start in range(0, len(problems), cfg.shard_size):
        chunk = problems[start : start + cfg.shard_size]
        records = [r for p in chunk for r in imported.get(p.problem_id, [])]
        parts = [[p.model_dump() for p in chunk]]
        if records:  # a shard of plain problems keeps the key it always had
            parts.append([(r.TABLE, r.model_dump()) for r in records])
        key = content_hash(INGEST, ingest.VERSION, *parts)
        manifest = ctx.store.manifest(ctx.run, INGEST, key)
        if manifest is None:
            tables = group(records, INGEST_TABLES)
            tables.update(problems=chunk, rejects=[])
            manifest = ctx.store.write_shard(ctx.run, INGEST, key, tables)
        manifests.append(manifest)
    reject_key = content_hash("ingest-rejects", ingest.VERSION, [r.model_dump() for r in rejects])
    reject_manifest = ctx.store.manifest(ctx.run, INGEST, reject_key) or ctx.store.write_shard(
        ctx.run, INGEST, reject_key, {"problems": [], "rejects": rejects},
        stats={"reject_reasons": dict(Counter(r.reason for r in rejects))},
    )
    return manifests, reject_manifest


def chain_keys(ctx: RunContext, problem_shard: str) -> dict[str, str]:
    """The key of every slot's shard downstream of one problem shard, under this run's config."""
    chain = ctx.chain
    keys = {ROOT: problem_shard}
    for slot in chain.stage_slots:
        stage = chain.stage(slot)
        keys[slot] = content_hash(stage.name, stage.version, keys[stage.after], *stage.key(ctx, problem_shard))
    del keys[ROOT]
    return keys


def current_chains(ctx: RunContext) -> tuple[list[dict[str, ShardManifest | None]], ShardManifest]:
    """Every problem shard's chain under the current config, None in the slots not computed yet
    (e.g. labels after a review pull brought new human evidence), and the ingest rejects shard."""
    chain = ctx.chain
    chains = []
    problem_shards, reject_shard = ingest_shards(ctx)
    for problem_shard in problem_shards:
        found: dict[str, ShardManifest | None] = {ROOT: problem_shard}
        for slot, key in chain_keys(ctx, problem_shard.shard).items():
            found[slot] = ctx.store.manifest(ctx.run, chain.stage(slot).name, key)
        chains.append(found)
    return chains, reject_shard


def completed_chains(ctx: RunContext) -> tuple[Chains, int, ShardManifest]:
    """The complete shard chains of the current config, how many are incomplete, and the ingest
    rejects shard (read from the same pass over the source).

    Shards an earlier config of the same run left behind are not part of any chain, so an export
    never mixes label policies or counts a problem twice.
    """
    chains, reject_shard = current_chains(ctx)
    complete = [c for c in chains if all(c.values())]
    return complete, len(chains) - len(complete), reject_shard


def shard_key(manifest: ShardManifest | dict) -> str:
    """A shard's key from its manifest, or from the dict form Prefect tasks pass around."""
    return manifest.shard if isinstance(manifest, ShardManifest) else manifest["shard"]


def chain_shard_keys(chains: list[dict], reject_shard: ShardManifest | dict) -> set[str]:
    """The shard keys the run's current config reads: its chains and the ingest rejects."""
    return {shard_key(m) for c in chains for m in c.values()} | {shard_key(reject_shard)}


def stored_chains(ctx: RunContext, record: dict) -> tuple[Chains, int, ShardManifest] | None:
    """The chains the run's record names, when they are what the current config computes: what an
    export or report of a stored run reads without going back to the source (which may have moved,
    or be a hub dataset out of reach). None when the record cannot say (no chains recorded, another
    config since, a shard missing): then the source is read again (``completed_chains``)."""
    recorded = record.get("chains") or {}
    reject_key = record.get("reject_shard")
    reject = ctx.store.manifest(ctx.run, INGEST, reject_key) if reject_key else None
    if not recorded or reject is None:
        return None
    chain = ctx.chain
    chains: Chains = []
    for problem_shard, slots in recorded.items():
        if slots != chain_keys(ctx, problem_shard):
            return None
        found = {ROOT: ctx.store.manifest(ctx.run, INGEST, problem_shard)}
        found.update({slot: ctx.store.manifest(ctx.run, chain.stage(slot).name, key) for slot, key in slots.items()})
        if not all(found.values()):
            return None
        chains.append(found)  # type: ignore[arg-type]
    return chains, 0, reject


def run_chains(ctx: RunContext, record: dict | None = None) -> tuple[Chains, int, ShardManifest]:
    """The complete chains of a run: as recorded when the record still holds (see ``stored_chains``),
    else from the source under the current config."""
    return (record and stored_chains(ctx, record)) or completed_chains(ctx)
