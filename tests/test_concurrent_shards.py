"""Shards run concurrently in one process (``concurrent_shards``) against one shared bound on
samples in flight: the tables must not depend on how many run at once or on the bound, each
shard's stats must count exactly its own work, and the bound must hold across shards.

On the synthetic world (a measuring instrument with a seeded policy: stages/instruments/synthetic.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from cli_runs import table_rows
from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.stages.instruments.synthetic import SyntheticBackend, WorldConfig, make_problems
from stepforge.stages.llm import GenerationCache, GenerationClient
from stepforge.stages.llm.base import SharedBound


def world_config(tmp: Path, store: str, labeller: str, *, concurrent_shards: int, max_in_flight: int) -> RunConfig:
    source = tmp / "problems.jsonl"
    if not source.exists():
        source.write_text("".join(json.dumps(r) + "\n" for r in make_problems(20, (3, 7), seed=5)))
    sampling = {"temperature": 1.0, "max_tokens": 400, "seed": 1}
    return RunConfig.model_validate({
        "run": "concurrency", "store": str(tmp / store), "shard_size": 3, "labeller": labeller,
        "concurrent_shards": concurrent_shards,
        "backend": {"kind": "synthetic", "max_in_flight": max_in_flight,
                    "world": {"slip_rate": 0.15, "wrong_op_rate": 0.1, "recover_rate": 0.2}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 4, "sampling": {**sampling, "seed": 0}},
        "mc_label": {"completions_per_step": 4, "sampling": sampling},
        "binary_search": {"completions_per_prefix": 4, "sampling": sampling, "adaptive": {"enabled": True}},
        "mcts": {"iterations": 10, "breadth": 3, "sampling": sampling},
        "pairs": {"kinds": ["step_dpo"]},
    })


@pytest.mark.parametrize("labeller", ["mc", "binary_search", "mcts"])
def test_tables_do_not_depend_on_concurrent_shards_or_the_in_flight_bound(tmp_path, labeller):
    one = runtime.RunContext(world_config(tmp_path, "one", labeller, concurrent_shards=1, max_in_flight=16))
    shards = runtime.ingest_shards(one)[0]
    assert len(shards) == 7
    alone = runtime.run_shards(one, shards)

    many = runtime.RunContext(world_config(tmp_path, "many", labeller, concurrent_shards=7, max_in_flight=256))
    together = runtime.run_shards(many, runtime.ingest_shards(many)[0])

    assert table_rows(tmp_path / "one") == table_rows(tmp_path / "many")
    assert [{s: m.shard for s, m in c.items()} for c in alone] == [{s: m.shard for s, m in c.items()} for c in together]
    # Each shard's stats are its own work: summed over shards they are the client's totals,
    # however the shards interleaved.
    for ctx, chains in ((one, alone), (many, together)):
        totals = ctx.client().stats
        summed = {k: sum((m.stats.get("generation") or {}).get(k, 0) for c in chains for m in c.values())
                  for k in ("samples", "generated", "generated_tokens", "cache_hits")}
        assert summed == {"samples": totals.samples, "generated": totals.generated,
                          "generated_tokens": totals.generated_tokens, "cache_hits": totals.cache_hits}
    assert many.client().stats.generated == one.client().stats.generated


class Counting:
    """The synthetic backend with a probe on how many samples are inside it at once; with
    ``scramble`` each answer is held for a delay drawn from its seed, so answers arrive in an
    order unrelated to the order they were asked in (a fault injected on purpose)."""

    def __init__(self, inner: SyntheticBackend, scramble: bool = False):
        self.inner, self.model_id, self.max_in_flight = inner, inner.model_id, 1024
        self.supports_json_schema = False
        self.inside = self.most = 0
        self.lock = threading.Lock()
        self.scramble = scramble

    async def generate(self, request, seed):
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            # Yields, so other samples get in if the bound lets them.
            await asyncio.sleep((seed % 7) * 0.003 if self.scramble else 0.002)
            return self.inner.sample(request, seed)
        finally:
            with self.lock:
                self.inside -= 1

    def count_tokens(self, text):
        return self.inner.count_tokens(text)

    def close(self):
        pass


def test_one_bound_holds_across_concurrent_shards(tmp_path):
    config = world_config(tmp_path, "bound", "mc", concurrent_shards=7, max_in_flight=5)
    ctx = runtime.RunContext(config)
    probe = Counting(SyntheticBackend(WorldConfig(slip_rate=0.15, wrong_op_rate=0.1, recover_rate=0.2)))
    cache = GenerationCache(ctx.store.root / "cache" / "generations.sqlite")
    ctx.clients["generation"] = GenerationClient(probe, cache, max_in_flight=5)
    runtime.run_shards(ctx, runtime.ingest_shards(ctx)[0])
    assert ctx.client().stats.generated > 100
    assert probe.most <= 5  # seven shards' loops, one bound
    assert ctx.client().stats.max_in_flight_seen <= 5


def test_shared_bound_admits_at_most_its_limit_across_threads_and_loops():
    bound = SharedBound(3)
    inside, most, lock = [0], [0], threading.Lock()

    async def hold():
        async with bound:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            await asyncio.sleep(0.001)
            with lock:
                inside[0] -= 1

    async def many():
        tasks = [asyncio.ensure_future(hold()) for _ in range(40)]
        # Cancel some while they wait: their places pass on, none is lost.
        for task in tasks[5:10]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    threads = [threading.Thread(target=asyncio.run, args=(many(),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert most[0] <= 3
    assert bound._free == 3  # every slot came back


def test_a_failing_shard_is_raised_after_the_running_ones_finish(tmp_path):
    started, finished = [], []

    def work(n):
        started.append(n)
        if n == 0:
            raise ValueError("shard 0 broke")
        finished.append(n)
        return n

    with pytest.raises(ValueError, match="shard 0 broke"):
        runtime.run_concurrently(work, list(range(50)), 2)
    # Nothing is left running behind the error: every shard that started (but the failing one) finished.
    assert sorted(finished) == sorted(n for n in started if n != 0)

    assert runtime.run_concurrently(lambda n: n * n, list(range(20)), 4) == [n * n for n in range(20)]


@pytest.mark.parametrize("labeller", ["binary_search", "mcts"])
def test_search_decisions_do_not_depend_on_the_order_answers_arrive_in(tmp_path, labeller):
    """MCTS expands ``parallel_simulations`` leaves at once and binary search probes many prefixes
    at once: with answers arriving scrambled the tables are those of the in-order run."""
    world = WorldConfig(slip_rate=0.15, wrong_op_rate=0.1, recover_rate=0.2)
    tables = []
    for name, scramble in (("in_order", False), ("scrambled", True)):
        ctx = runtime.RunContext(world_config(tmp_path, name, labeller, concurrent_shards=3, max_in_flight=64))
        cache = GenerationCache(ctx.store.root / "cache" / "generations.sqlite")
        ctx.clients["generation"] = GenerationClient(Counting(SyntheticBackend(world), scramble), cache, max_in_flight=64)
        runtime.run_shards(ctx, runtime.ingest_shards(ctx)[0])
        tables.append(table_rows(tmp_path / name))
    assert tables[0] == tables[1]
    assert tables[0]["labels"]


def test_over_http_a_run_at_16_in_flight_and_at_256_makes_the_same_tables(tmp_path):
    """Through the HTTP backend against ``world serve`` as a simulated batching server: one shard at a
    time with 16 in flight, and every shard at once with 256, give identical tables."""
    from test_world_server import world_server

    latency = ("--capacity", "64", "--ttft-ms", "2", "--tpot-ms", "0.1", "--slip-rate", "0.15",
               "--wrong-op-rate", "0.1", "--recover-rate", "0.2")
    with world_server(tmp_path / "server.log", *latency) as (url, _):
        for name, shards_at_once, in_flight in (("narrow", 1, 16), ("wide", 7, 256)):
            base = world_config(tmp_path, name, "mcts", concurrent_shards=shards_at_once, max_in_flight=in_flight)
            config = RunConfig.model_validate({
                **base.model_dump(mode="json"),
                "backend": {"kind": "openai", "model": "world", "max_in_flight": in_flight,
                            "http": {"base_url": f"{url}/v1", "server": "vllm"}},
            })
            ctx = runtime.RunContext(config)
            try:
                runtime.run_shards(ctx, runtime.ingest_shards(ctx)[0])
                generated = ctx.client().stats.generated
                counters = ctx.client().backend.counters()
            finally:
                ctx.close()
            assert generated > 100 and counters["http_requests"] == generated
    assert table_rows(tmp_path / "narrow") == table_rows(tmp_path / "wide")


def test_when_a_shard_fails_the_open_ones_stop_at_their_next_stage():
    failed, running = threading.Event(), threading.Event()
    stopped = []

    def work(n):
        if n == 0:
            assert running.wait(60)  # shard 1 is open when shard 0 fails
            failed.set()
            raise ValueError("shard 0 broke")
        running.set()
        assert failed.wait(60)
        for _ in range(6000):  # the stop is set once the failure reaches run_concurrently
            try:
                runtime.stop_if_interrupted()
            except runtime.Interrupted:
                stopped.append(n)
                raise
            time.sleep(0.01)
        return n

    with pytest.raises(ValueError, match="shard 0 broke"):
        runtime.run_concurrently(work, [0, 1], 2)
    assert stopped == [1]
    runtime.stop_if_interrupted()  # outside a concurrent run nothing is stopped
