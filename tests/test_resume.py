"""Kill a real run with SIGKILL part-way, resume it, and get exactly the uninterrupted output."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from cli_runs import finish, start_run, table_rows
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


@pytest.mark.parametrize("labeller", ["mc", "binary_search", "mcts"])
def test_sigkilled_run_resumes_to_identical_output_without_regenerating(tmp_path, labeller):
    finish(start_run(write_config(tmp_path, "whole", labeller), tmp_path))
    whole = tmp_path / "whole"
    total = generation_record(whole)["generated"]
    assert total == cached_samples(whole) and total > 6

    victim = start_run(write_config(tmp_path, "killed", labeller), tmp_path)
    killed = tmp_path / "killed"
    deadline = time.monotonic() + 600
    while cached_samples(killed) < total // 2:
        assert victim.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survived = cached_samples(killed)
    assert 0 < survived < total
    assert not (killed / "runs" / "resume.json").exists() or json.loads(
        (killed / "runs" / "resume.json").read_text())["status"] == "running"

    finish(start_run(write_config(tmp_path, "killed", labeller), tmp_path))
    resumed = generation_record(killed)
    assert resumed["generated"] == total - survived, "every sample generated before the kill is replayed, not redone"
    assert resumed["cache_hits"] > 0, "the interrupted shard replays its cached samples"

    whole_rows, resumed_rows = table_rows(whole), table_rows(killed)
    for table in TABLES:
        assert resumed_rows[table] == whole_rows[table], f"{table} differs after resume"
        assert len(set(resumed_rows[table])) == len(resumed_rows[table]), f"duplicated rows in {table}"
    assert whole_rows["nodes"] and whole_rows["evaluations"]
