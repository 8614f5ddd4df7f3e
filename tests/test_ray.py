"""Shards on a local Ray cluster (Prefect's Ray task runner) with llama.cpp in the workers: the same
tables as a single-process run of the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli_runs import run_cli, table_rows

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
        "mc_label": {"completions_per_step": 2, "sampling": sampling},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_shards_on_a_local_ray_cluster_match_a_single_process_run(tmp_path):
    run_cli(write_config(tmp_path, "single"), tmp_path / "single", env=RAY_ENV)
    # A relative store: workers must still write where the driver reads.
    config = write_config(tmp_path, "ray")
    data = yaml.safe_load(config.read_text())
    data["store"] = "store"
    data["ray"] = {"num_cpus": 2}
    config.write_text(yaml.safe_dump(data))
    run_cli(config, tmp_path / "ray", env=RAY_ENV)

    single, on_ray = table_rows(tmp_path / "single" / "store"), table_rows(tmp_path / "ray" / "store")
    assert single["evaluations"] and single["labels"]
    assert on_ray == single
    # The shards really ran in Ray workers, side by side: more than one process wrote them.
    def writers(store: Path) -> set[str]:
        manifests = [json.loads(p.read_text()) for p in (store / "markers").rglob("*.json")]
        return {m["stats"]["worker"] for m in manifests if m["stage"] in ("rollout", "mc_label")}

    assert len(writers(tmp_path / "single" / "store")) == 1
    assert len(writers(tmp_path / "ray" / "store")) == 2
