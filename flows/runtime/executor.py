"""The executor: one stage over one problem shard (read its declared inputs, run it, write the
shard), a problem shard's whole chain in order, and many shards' chains at once.

Idempotent: a shard whose completion marker exists is returned as it is, so a killed run resumes
where it stopped and a generation already in the cache is replayed, not paid for again. Plain
functions, so any executor can call them: this process (``run_chain``, ``run_shards``), Prefect
tasks (``flows/synthesize.py``, locally or on Ray), backfills, review pulls, benchmarks.

Why shards run concurrently: a stage cannot start before the stage it follows has finished its
shard, so one shard alone leaves the engine idle at every stage boundary and in every stage's
tail. With several shards open at once (``RunConfig.concurrent_shards``, on threads of this
process) the others fill those gaps; all share each client's one bound on samples in flight
(``SharedBound``), so the engine sees a steady queue, and memory stays bounded by the shards
open. A shard's tables depend only on its inputs and the (seeded, cached) generations, never on
what ran beside it, and its stats are charged to it by a ``Meter``, not read off process-wide
counters.
"""

from __future__ import annotations

import contextvars
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import cached_property
from typing import TypeVar

from stepforge.flows.runtime.chain import chain_keys, group
from stepforge.flows.runtime.context import RunContext
from stepforge.flows.runtime.registry import ROOT
from stepforge.schemas.records import Problem, Reject
from stepforge.stages.base import Stage, records_of
from stepforge.stages.llm import GenerationClient
from stepforge.stages.llm.base import metered
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
    started = time.perf_counter()
    with metered() as meter:
        tables = group(records_of(stage, stage.run(ShardInputs(ctx, stage, chain), ctx)), stage.writes)
    stats: dict = {}
    for role, client in list(ctx.clients.items()):
        counts = client.counters(meter)
        if counts["samples"]:
            stats[role] = {k: round(v, 6) for k, v in counts.items() if v or k in GenerationClient.COUNTED}
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
        stop_if_interrupted()
        chain[slot] = run_stage(ctx, slot, keys[slot], chain)
    return chain


class Interrupted(Exception):
    """A concurrent run was interrupted: this shard stopped between two stages."""


# Set for the shards of one ``run_concurrently`` call when it is interrupted (Ctrl-C, a failure).
_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("stepforge_stop", default=None)


def stop_if_interrupted() -> None:
    """Raise ``Interrupted`` if the concurrent run this shard belongs to was interrupted: a shard
    stops between stages (each stage's shard is written whole or not at all)."""
    if (stop := _STOP.get()) is not None and stop.is_set():
        raise Interrupted("the run was interrupted")


S = TypeVar("S")
R = TypeVar("R")


def run_concurrently(work: Callable[[S], R], shards: Sequence[S], at_once: int) -> list[R]:
    """``work(shard)`` for every shard, at most ``at_once`` at a time on threads of this process,
    results in input order. Each call runs in a copy of the caller's context (a Prefect flow
    run's, a meter's). On the first failure, or Ctrl-C, no new shard starts and the open ones stop
    at their next stage boundary (``stop_if_interrupted``); then it is raised."""
    if at_once <= 1 or len(shards) <= 1:
        return [work(shard) for shard in shards]
    stop = threading.Event()
    token = _STOP.set(stop)
    pool = ThreadPoolExecutor(max_workers=min(at_once, len(shards)), thread_name_prefix="shard")
    try:
        futures = [pool.submit(contextvars.copy_context().run, work, shard) for shard in shards]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if failed := [f for f in futures if f in done and f.exception() is not None]:
            raise failed[0].exception()
        return [future.result() for future in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        _STOP.reset(token)
        pool.shutdown(wait=True, cancel_futures=True)


def run_shards(ctx: RunContext, problem_shards: Sequence[ShardManifest]) -> list[dict[str, ShardManifest]]:
    """Every problem shard's chain, ``ctx.config.concurrent_shards`` of them at once."""
    return run_concurrently(lambda shard: run_chain(ctx, shard), problem_shards, ctx.config.concurrent_shards)
