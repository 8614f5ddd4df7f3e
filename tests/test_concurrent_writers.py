"""Many processes writing one store at once, as Ray workers do: the generation cache and the shards."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from stepforge.schemas.records import Problem
from stepforge.stages.llm import GenerationCache
from stepforge.stages.llm.base import Generation
from stepforge.storage.shards import ShardStore

WRITERS, PER_WRITER = 4, 150


def fill_cache(path: str, writer: int) -> None:
    cache = GenerationCache(path)
    for i in range(PER_WRITER):
        # Every writer also writes the keys everyone shares: the same sample generated twice.
        for key in (f"w{writer}-{i}", f"shared-{i}"):
            cache.put(key, Generation(text=f"{key} text", num_tokens=i, finish_reason="stop", token_bytes=(1,) * i))
            assert cache.get(key) is not None


def write_same_shard(root: str, writer: int) -> None:
    store = ShardStore(root)
    problems = [Problem(problem_id=f"p{i}", question=f"q{i}", gold_answer=str(i), source="t", source_index=i) for i in range(50)]
    for _ in range(5):
        store.write_shard("r", "ingest", "same-key", {"problems": problems, "rejects": []}, stats={"writer": writer})


def run_all(target, arg: str) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=(arg, w)) for w in range(WRITERS)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
        assert p.exitcode == 0


def test_concurrent_processes_share_the_generation_cache_without_losing_a_sample(tmp_path: Path):
    path = tmp_path / "generations.sqlite"
    run_all(fill_cache, str(path))
    cache = GenerationCache(path)
    assert len(cache) == WRITERS * PER_WRITER + PER_WRITER
    assert cache.get("w3-149").token_bytes == (1,) * 149 and cache.get("shared-7").text == "shared-7 text"


def test_concurrent_writers_of_one_shard_leave_one_complete_shard(tmp_path: Path):
    run_all(write_same_shard, str(tmp_path))
    store = ShardStore(tmp_path)
    manifest = store.manifest("r", "ingest", "same-key")
    assert manifest is not None and manifest.rows("problems") == 50
    assert [r["problem_id"] for r in store.read_rows("problems", [manifest])] == [f"p{i}" for i in range(50)]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # no temporary file left behind
