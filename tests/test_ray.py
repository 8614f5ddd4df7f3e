"""Shards on a local Ray cluster (Prefect's Ray task runner) with llama.cpp in the workers: the same
tables as a single-process run of the same config."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from cli_runs import finish, start_run, table_rows

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.slow
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}  # a local cluster for this test only


def write_config(tmp: Path, name: str) -> Path:
    sampling = {"max_tokens": 40, "temperature": 0.9, "seed": 1}
    config = {
        "run": "ray",
        "store": str(tmp / name / "store"),
        "shard_size": 1,
        "backend": {"model": "smollm2-135m", "n_ctx": 2048, "max_in_flight": 8, "n_threads": 1},
        "ingest": {"source": str(FIXTURES / "gsm8k_sample.jsonl"), "format": "gsm8k", "limit": 3},
        "split": {"mode": "newline"},
        "rollout": {"samples_per_problem": 2, "sampling": {"max_tokens": 48, "temperature": 0.9}},
        "labeller": "mc",
        "mc_label": {"completions_per_step": 2, "sampling": sampling},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def writers(store: Path) -> list[str]:
    """The process ("host:pid") that wrote each model-heavy shard of the run."""
    manifests = [json.loads(p.read_text()) for p in (store / "markers").rglob("*.json")]
    return [m["stats"]["worker"] for m in manifests if m["stage"] in ("rollout", "mc_label")]


def run_driver(config: Path, tmp: Path) -> str:
    """Run the command line; the "host:pid" of its process, the driver."""
    process = start_run(config, tmp, env=RAY_ENV)
    finish(process)
    return f"{socket.gethostname()}:{process.pid}"


def test_shards_on_a_local_ray_cluster_match_a_single_process_run(tmp_path):
    single_driver = run_driver(write_config(tmp_path, "single"), tmp_path / "single")
    # A relative store: workers must still write where the driver reads.
    config = write_config(tmp_path, "ray")
    data = yaml.safe_load(config.read_text())
    data["store"] = "store"
    data["ray"] = {"num_cpus": 2}
    config.write_text(yaml.safe_dump(data))
    ray_driver = run_driver(config, tmp_path / "ray")

    single, on_ray = table_rows(tmp_path / "single" / "store"), table_rows(tmp_path / "ray" / "store")
    assert single["evaluations"] and single["labels"]
    assert on_ray == single
    # Without Ray the command's own process wrote every shard; on Ray none of them: they ran in Ray's
    # worker processes. How many workers Ray used is its scheduling (it starts more when one is busy
    # or slow to start), so it is not asserted.
    assert set(writers(tmp_path / "single" / "store")) == {single_driver}
    on_ray_writers = writers(tmp_path / "ray" / "store")
    assert on_ray_writers and ray_driver not in on_ray_writers, on_ray_writers
