"""The executor: one stage over one problem shard (read its declared inputs, run it, write the
shard), and a problem shard's whole chain in order.

Idempotent: a shard whose completion marker exists is returned as it is, so a killed run resumes
where it stopped and a generation already in the cache is replayed, not paid for again. Plain
functions, so any executor can call them: this process (``run_chain``), Prefect tasks
(``flows/synthesize.py``, locally or on Ray), backfills, review pulls, benchmarks.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from functools import cached_property

from stepforge.flows.runtime.chain import chain_keys, group
from stepforge.flows.runtime.context import RunContext
from stepforge.flows.runtime.registry import ROOT
from stepforge.schemas.records import Problem, Reject
from stepforge.stages.base import Stage, records_of
from stepforge.stages.llm import GenerationClient
from stepforge.storage.shards import ShardManifest


class ShardInputs:
    """The ``Inputs`` of one stage over one problem shard: each declared table, read on first use
    from the declared slots' shards, in the order the declaration names them."""

    def __init__(self, ctx: RunContext, stage: Stage, chain: dict[str, ShardManifest]):
        self._ctx, self._stage, self._chain = ctx, stage, chain
        self.shard = chain[ROOT].shard

    def _manifests(self, table: str) -> list[ShardManifest]:
        if table not in self._stage.reads:
            raise KeyError(f"stage {self._stage.name!r} reads {table!r} but does not declare it in reads")
        return [self._chain[slot] for slot in self._stage.reads[table]]

    def arrow(self, table: str):
        return self._ctx.store.read(table, self._manifests(table))

    def rows(self, table: str) -> list[dict]:
        return self._ctx.store.read_rows(table, self._manifests(table))

    @cached_property
    def _problems(self) -> list[Problem]:
        return [Problem(**row) for row in self.rows("problems")]

    def problems(self) -> list[Problem]:
        return self._problems


def run_stage(ctx: RunContext, slot: str, key: str, chain: dict[str, ShardManifest]) -> ShardManifest:
    """The slot's stage over one problem shard; ``chain`` holds at least the slots it needs."""
    stage = ctx.chain.stage(slot)
    if (done := ctx.store.manifest(ctx.run, stage.name, key)) is not None:
        return done
    if missing := [s for s in stage.needs if chain.get(s) is None]:
        raise RuntimeError(f"stage {stage.name!r} of shard {chain[ROOT].shard[:8]} needs slot(s) {missing} first")
    before = ctx.counters()
    started = time.perf_counter()
    tables = group(records_of(stage, stage.run(ShardInputs(ctx, stage, chain), ctx)), stage.writes)
    stats: dict = {}
    for role, after in ctx.counters().items():
        delta = {k: round(v - before.get(role, {}).get(k, 0), 6) for k, v in after.items()}
        if delta["samples"]:
            stats[role] = {k: v for k, v in delta.items() if v or k in GenerationClient.COUNTED}
    stats["reject_reasons"] = dict(Counter(r.reason for r in tables["rejects"] if isinstance(r, Reject)))
    stats["seconds"] = round(time.perf_counter() - started, 3)
    stats["worker"] = f"{socket.gethostname()}:{os.getpid()}"  # which process (Ray worker, host) made it
    upstream = chain[stage.after].shard
    return ctx.store.write_shard(ctx.run, stage.name, key, tables, inputs=[upstream], stats=stats)


def run_chain(ctx: RunContext, problem_shard: ShardManifest) -> dict[str, ShardManifest]:
    """Every stage over one problem shard, in chain order, in this process."""
    keys = chain_keys(ctx, problem_shard.shard)
    chain = {ROOT: problem_shard}
    for slot in ctx.chain.stage_slots:
        chain[slot] = run_stage(ctx, slot, keys[slot], chain)
    return chain
