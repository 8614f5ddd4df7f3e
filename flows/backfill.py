"""``backfill``: re-run chosen stages of an existing run under changed settings, and say what changed.

A new consensus policy, a new judge, human labels pulled from review, a re-export: the run's
recorded config with ``overrides`` merged in gives every shard's new key; a stage whose key did
not change is reused as it is, so a second backfill with the same arguments does nothing. The
plan is made before any work: a stage outside ``stages`` whose shards the overrides change is an
error naming it, never silent model work. The selection narrows the work to some problem shards
(by key, or by a SQL query over the catalog returning ``problem_id``). Afterwards the run's
record holds the new config, so exports, reports and the next scheduled run follow it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from prefect import flow

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig, RunConfigOverrides
from stepforge.flows.progress import reporter
from stepforge.flows.runtime.registry import LABELS, RegistryError
from stepforge.storage.shards import ShardManifest

EXPORT = "export"


class BackfillError(ValueError):
    """The backfill cannot run as asked (unknown stage, selection matches nothing, a stage it would
    need is not chosen); nothing has been written."""


def merge(base: dict, overrides: dict) -> dict:
    """``overrides`` deep-merged into ``base``: a nested section changes only the keys it names."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _selected(ctx: runtime.RunContext, problem_shards: list[ShardManifest], keys: Sequence[str] | None,
              sql: str | None) -> list[ShardManifest]:
    chosen = problem_shards
    if keys:
        chosen = [m for m in chosen if any(m.shard.startswith(k) for k in keys)]
        unknown = [k for k in keys if not any(m.shard.startswith(k) for m in problem_shards)]
        if unknown:
            raise BackfillError(f"no problem shard of run {ctx.run!r} has a key starting with {', '.join(unknown)}")
    if sql:
        import duckdb

        from stepforge.storage.catalog import Catalog

        with Catalog(ctx.store.root) as catalog:
            catalog.refresh(run=ctx.run)
            try:
                result = catalog.query(sql)
            except duckdb.Error as exc:
                raise BackfillError(f"the selection query failed: {exc}") from exc
        if "problem_id" not in result.column_names:
            raise BackfillError(f"the selection query must return a problem_id column; it returned {result.column_names}")
        wanted = {str(v) for v in result.column("problem_id").to_pylist()}
        holding = set()
        for m in chosen:
            if wanted.intersection(ctx.store.read("problems", [m]).column("problem_id").to_pylist()):
                holding.add(m.shard)
        chosen = [m for m in chosen if m.shard in holding]
    if not chosen:
        raise BackfillError("the selection matches no problem shard of the run")
    return chosen


def default_stages(ctx: runtime.RunContext) -> tuple[str, ...]:
    """What a backfill re-runs unless told otherwise: every slot that needs no model (labels and
    everything derived from them: new human evidence, a new policy) and the export."""
    chain = ctx.chain
    derived = chain.downstream([LABELS])
    return (*(chain.stage(s).name for s in chain.stage_slots if s in derived), EXPORT)


def slots_of(ctx: runtime.RunContext, stages: Sequence[str]) -> list[str]:
    """The chain slots the named stages fill (a stage name, a slot name, or a pre-rename slot name)."""
    try:
        return [ctx.chain.slot_of(s) for s in stages if s != EXPORT]
    except RegistryError as exc:
        raise BackfillError(f"{exc}, {EXPORT}") from exc


def plan(ctx: runtime.RunContext, problem_shards: Iterable[ShardManifest], stages: Sequence[str]) -> dict[str, list[str]]:
    """Per problem shard, the chain slots whose shard under the new config does not exist yet."""
    chain, allowed = ctx.chain, set(slots_of(ctx, stages))
    todo = {}
    for m in problem_shards:
        keys = runtime.chain_keys(ctx, m.shard)
        todo[m.shard] = [s for s in chain.stage_slots if ctx.store.manifest(ctx.run, chain.stage(s).name, keys[s]) is None]
    needed = [s for s in chain.stage_slots if s not in allowed and any(s in slots for slots in todo.values())]
    if needed:
        names = [chain.stage(s).name for s in needed]
        raise BackfillError(
            f"these settings change the {', '.join(names)} shard(s) of "
            f"{sum(1 for slots in todo.values() if set(slots) & set(needed))} problem shard(s), but only "
            f"{', '.join(stages)} may be re-run: add {', '.join(names)} to the stages (it may need a model)"
        )
    return todo


def _labels(ctx: runtime.RunContext, manifests: Iterable[ShardManifest | None]) -> dict[str, int]:
    found = [m for m in manifests if m is not None]
    return {row["node_id"]: int(row["label"]) for row in ctx.store.read_rows("labels", found)}


def backfill_run(
    store: Path,
    run: str,
    stages: Sequence[str] | None = None,
    overrides: dict | None = None,
    shard_keys: Sequence[str] | None = None,
    sql: str | None = None,
) -> dict:
    """Re-run ``stages`` of ``run`` over the selected problem shards; return what changed."""
    store = Path(store)
    record = runtime.load_run_record(store, run)  # read before the backfill rewrites it
    base = runtime.load_run_config(store, run)
    config = RunConfig.model_validate(merge(base.model_dump(mode="json"), overrides or {})) if overrides else base
    ctx = runtime.RunContext(config)
    try:
        stages = tuple(stages or default_stages(ctx))
        slots_of(ctx, stages)  # unknown names fail before any work
        problem_shards, reject_shard = runtime.ingest_shards(ctx)
        selected = _selected(ctx, problem_shards, shard_keys, sql)
        todo = plan(ctx, selected, stages)
        # What the labels were: the chains the run last recorded, else the keys of its recorded config.
        recorded = record.get("chains") or {}
        base_ctx = runtime.RunContext(base)
        labels_stage = ctx.chain.stage(LABELS).name
        old_keys = [recorded.get(m.shard, {}).get(LABELS) or runtime.chain_keys(base_ctx, m.shard)[LABELS]
                    for m in selected]
        base_ctx.close()
        old_labels = _labels(ctx, (ctx.store.manifest(run, labels_stage, k) for k in old_keys))
        written: Counter = Counter()
        ctx.open_window()
        with reporter().track(f"backfill {run}", len(selected)) as advance:

            def backfill_shard(m):
                runtime.run_chain(ctx, m)
                advance(1)

            runtime.run_concurrently(backfill_shard, selected, ctx.config.concurrent_shards)
        for m in selected:
            written.update(todo[m.shard])
        chains, incomplete, reject_shard = runtime.completed_chains(ctx)
        selected_keys = {m.shard for m in selected}
        new_labels = _labels(ctx, (c[LABELS] for c in chains if c[runtime.ROOT].shard in selected_keys))
        flips = Counter(f"{old_labels[n]:+d}→{new_labels[n]:+d}" for n in set(old_labels) & set(new_labels)
                        if old_labels[n] != new_labels[n])
        exports = []
        recorded_exports = record.get("exports") or []
        old_exports = {e["dataset"]: e["rows"] for e in recorded_exports}
        if EXPORT in stages:
            exports = runtime.export_run(ctx, chains, reject_shard)
        traffic = runtime.shard_traffic([{slot: asdict(m) for slot, m in chain.items()} for chain in chains])
        # Without an export the datasets on disk are the recorded ones: the record keeps naming them.
        runtime.record_run(ctx, "completed", exports if EXPORT in stages else recorded_exports, traffic, chains=chains,
                           reject_shard=reject_shard)
        names = {slot: ctx.chain.stage(slot).name for slot in ctx.chain.stage_slots}
        return {
            "run": run, "stages": list(stages), "shards_selected": len(selected), "shards_incomplete": incomplete,
            "written": {names[slot]: written[slot] for slot in names if written[slot]},
            "reused": {names[slot]: len(selected) - written[slot] for slot in names},
            "labels": {
                "before": len(old_labels), "after": len(new_labels), "changed": sum(flips.values()),
                "flips": dict(sorted(flips.items())), "added": len(set(new_labels) - set(old_labels)),
                "removed": len(set(old_labels) - set(new_labels)),
            },
            "exports": [{**e, "rows_before": old_exports.get(e["dataset"])} for e in exports],
            "overrides": overrides or {},
        }
    finally:
        ctx.close()


@flow(name="backfill", log_prints=True)
def backfill(
    run: str,
    store: str = "stepforge-data",
    stages: list[str] | None = None,
    overrides: RunConfigOverrides | None = None,
    shards: list[str] | None = None,
    where: str | None = None,
) -> dict:
    """Re-run ``stages`` (default: the labels and what derives from them, and export) of ``run`` with
    ``overrides`` merged into its recorded config, over all its shards, the given problem-shard keys, or the
    shards holding the problems a SQL ``where`` query selects; return what changed.

    Typed: the Prefect API refuses overrides naming a key ``RunConfig`` does not have."""
    if overrides is not None:
        overrides = RunConfigOverrides.model_validate(overrides).model_dump(mode="json", exclude_unset=True)
    summary = backfill_run(Path(store), run, stages, overrides, shards, where)
    print(describe(summary))
    return summary


def describe(summary: dict) -> str:
    """The summary as the lines a person reads after a backfill."""
    lines = [f"backfill {summary['run']}: {summary['shards_selected']} problem shard(s), stages {', '.join(summary['stages'])}"]
    written = summary["written"]
    lines.append("re-ran: " + (", ".join(f"{slot} ×{n}" for slot, n in written.items()) if written
                               else "nothing (every shard was already up to date)"))
    labels = summary["labels"]
    flips = ", ".join(f"{k} ×{v}" for k, v in labels["flips"].items())
    lines.append(f"labels: {labels['before']} → {labels['after']}; changed {labels['changed']}"
                 + (f" ({flips})" if flips else "") + f", added {labels['added']}, removed {labels['removed']}")
    for e in summary["exports"]:
        lines.append(f"export {e['dataset']}: {e['rows_before'] if e['rows_before'] is not None else '-'} → {e['rows']} rows")
    if summary["shards_incomplete"]:
        lines.append(f"{summary['shards_incomplete']} problem shard(s) of the run are not complete under these "
                     "settings and are not in the export: backfill them too")
    return "\n".join(lines)
