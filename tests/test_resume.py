"""Kill a real run with SIGKILL part-way, resume it, and get exactly the uninterrupted output."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cli_runs import finish, start_run, table_rows
from processes import kill_all, marked, wait_until_gone
from stepforge.schemas.records import TABLES

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.slow


def write_config(tmp: Path, name: str, labeller: str = "mc") -> Path:
    sampling = {"max_tokens": 40, "temperature": 0.9, "seed": 1}
    config = {
        "run": "resume",
        "labeller": labeller,
        "store": str(tmp / name),
        "shard_size": 1,
        "backend": {"model": "smollm2-135m", "n_ctx": 2048, "max_in_flight": 8},
        "ingest": {"source": str(FIXTURES / "gsm8k_sample.jsonl"), "format": "gsm8k", "limit": 2},
        "split": {"mode": "newline"},
        "rollout": {"samples_per_problem": 2, "sampling": {"max_tokens": 48, "temperature": 0.9}},
        "mc_label": {"completions_per_step": 3, "sampling": sampling},
        "binary_search": {"completions_per_prefix": 3, "sampling": sampling},
        "mcts": {"iterations": 3, "breadth": 2, "sampling": sampling},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cached_samples(store: Path) -> int:
    path = store / "cache" / "generations.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as con:
            return con.execute("select count(*) from generations").fetchone()[0]
    except sqlite3.OperationalError:  # created but not yet initialised by the run
        return 0


def generation_record(store: Path) -> dict:
    return json.loads((store / "runs" / "resume.json").read_text())["generation"]


def complete_shards_generation(store: Path) -> Counter:
    """Sample counts summed over the store's complete shards, from their manifests: what a resumed
    run never asks for again."""
    counts: Counter = Counter()
    for marker in (store / "markers").rglob("*.json"):
        stats = (json.loads(marker.read_text()).get("stats") or {}).get("generation") or {}
        counts.update({k: stats.get(k, 0) for k in ("samples", "generated", "cache_hits")})
    return counts


@pytest.mark.parametrize("labeller", ["mc", "binary_search", "mcts"])
def test_sigkilled_run_resumes_to_identical_output_without_regenerating(tmp_path, labeller):
    finish(start_run(write_config(tmp_path, "whole", labeller), tmp_path))
    whole = tmp_path / "whole"
    total = generation_record(whole)["generated"]
    assert total == cached_samples(whole) and total > 6

    mark = os.urandom(8).hex()  # inherited by everything the run starts (tests/processes.py)
    victim = start_run(write_config(tmp_path, "killed", labeller), tmp_path, env={"STEPFORGE_TEST_RUN_MARK": mark})
    killed = tmp_path / "killed"
    deadline = time.monotonic() + 600
    while cached_samples(killed) < total // 2:
        assert victim.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    left = wait_until_gone(lambda: marked("STEPFORGE_TEST_RUN_MARK", mark), 30)
    kill_all(left)  # so that a failure here leaves nothing running either
    assert left == [], f"the killed run left processes behind: {left}"
    survived = cached_samples(killed)
    assert 0 < survived < total
    assert not (killed / "runs" / "resume.json").exists() or json.loads(
        (killed / "runs" / "resume.json").read_text())["status"] == "running"
    done = complete_shards_generation(killed)  # shards finished before the kill, skipped by the resume

    finish(start_run(write_config(tmp_path, "killed", labeller), tmp_path))
    resumed, uninterrupted = generation_record(killed), generation_record(whole)
    # Wherever the kill landed (inside a shard or between two): the resumed run asks for the samples of
    # the shards that were not complete, generates only those the cache lacks, and replays the rest:
    # the samples the killed run had committed but not yet written into a complete shard, and the
    # repeats within those shards that an uninterrupted run replays too.
    assert resumed["generated"] == total - survived, "every sample generated before the kill is replayed, not redone"
    assert resumed["samples"] == uninterrupted["samples"] - done["samples"], (resumed, uninterrupted, done)
    replayed = (survived - done["generated"]) + (uninterrupted["cache_hits"] - done["cache_hits"])
    assert resumed["cache_hits"] == replayed, (resumed, uninterrupted, done, survived)

    whole_rows, resumed_rows = table_rows(whole), table_rows(killed)
    for table in TABLES:
        assert resumed_rows[table] == whole_rows[table], f"{table} differs after resume"
        assert len(set(resumed_rows[table])) == len(resumed_rows[table]), f"duplicated rows in {table}"
    assert whole_rows["nodes"] and whole_rows["evaluations"]
