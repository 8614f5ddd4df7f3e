"""A labelling run against a real OpenAI-compatible server (llama.cpp's), from the command line, clean and
through the fault-injection proxy at 20% faults: same output, the faults in the run's stats, the key nowhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli_runs import run_cli, table_rows
from conftest import LLAMA_KEY_ENV as KEY_ENV
from conftest import LLAMA_SERVER_KEY
from fault_accounting import assert_retries_accounted_for, retries_by_reason
from stepforge.stages.instruments.fault_proxy import FaultConfig, running_proxy

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.slow


def write_config(tmp: Path, name: str, model: str) -> Path:
    sampling = {"max_tokens": 32, "temperature": 0.9, "seed": 1}
    config = {
        "run": "http",
        "store": str(tmp / name / "store"),
        "shard_size": 1,
        "backend": {
            "kind": "openai", "model": model, "max_in_flight": 2,
            "http": {
                "server": "llamacpp", "tokenizer": "smollm2-135m", "api_key_env": KEY_ENV,
                # Two in flight at a one-at-a-time server: a request waits for at most one other
                # (a few seconds on a busy machine), so a 20 s timeout mostly catches the proxy's hangs;
                # a slower answer is retried too, and counted as a timeout (tests/fault_accounting.py).
                "timeout_seconds": 20, "max_retries": 6, "backoff_seconds": 0.05, "backoff_max_seconds": 0.5,
            },
        },
        "ingest": {"source": str(FIXTURES / "gsm8k_sample.jsonl"), "format": "gsm8k", "limit": 3},
        "split": {"mode": "newline"},
        "rollout": {"samples_per_problem": 3, "sampling": {"max_tokens": 64, "temperature": 0.9}},
        "labeller": "mc",
        "mc_label": {"completions_per_step": 3, "sampling": sampling},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_through(config: Path, base_url: str, tmp: Path) -> str:
    return run_cli(config, tmp, "--backend", "openai", "--base-url", base_url, env={KEY_ENV: LLAMA_SERVER_KEY})


def files_containing(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_a_run_through_twenty_percent_faults_matches_a_clean_run(llama_server, tmp_path):
    clean_dir, flaky_dir = tmp_path / "clean", tmp_path / "flaky"
    clean_out = run_through(write_config(tmp_path, "clean", llama_server.model), llama_server.base_url, clean_dir)
    faults = FaultConfig(rate=0.2, seed=7, hang_seconds=30, retry_after_seconds=0.5, max_faults_per_request=3)
    with running_proxy(llama_server.base_url.removesuffix("/v1"), faults) as proxy:
        flaky_out = run_through(write_config(tmp_path, "flaky", llama_server.model), proxy.base_url + "/v1", flaky_dir)
        injected = {kind: n for kind, n in proxy.counts.items() if kind != "forwarded"}

    clean, flaky = table_rows(tmp_path / "clean" / "store"), table_rows(tmp_path / "flaky" / "store")
    assert clean["evaluations"] and clean["rollouts"]  # the run labelled something
    assert flaky == clean

    record = json.loads((tmp_path / "flaky" / "store" / "runs" / "http.json").read_text())
    traffic = record["traffic"]["generation"]
    assert sum(injected.values()) > 0, (proxy.counts, traffic)
    # Every fault cost one retry and every other retry is a slow answer timed out (a busy machine):
    # the counts by reason say which. Counters that stayed zero are left out of the stats.
    assert_retries_accounted_for(injected, traffic)
    assert traffic["http_requests"] == traffic["generated"] + traffic["retries"]
    clean_traffic = json.loads((tmp_path / "clean" / "store" / "runs" / "http.json").read_text())["traffic"]["generation"]
    # Without the proxy nothing fails but a slow answer.
    assert set(retries_by_reason(clean_traffic)) <= {"timeout"} and clean_traffic.get("gave_up", 0) == 0, clean_traffic
    assert clean_traffic["generated"] == traffic["generated"], clean_traffic
    assert "server traffic" in flaky_out and "retried: none" not in flaky_out

    # The key reached the server, and nothing else: not the shards, caches, run records or exports,
    # not Prefect's database (parameters, logs), not the console.
    secret = LLAMA_SERVER_KEY.encode()
    for out in (clean_out, flaky_out):
        assert LLAMA_SERVER_KEY not in out
    for root in (clean_dir, flaky_dir, tmp_path / "clean", tmp_path / "flaky"):
        assert files_containing(root, secret) == []
    assert any((flaky_dir / "prefect-home").rglob("*.db"))  # the place parameters and logs were stored was searched
