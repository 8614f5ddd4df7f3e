"""A new stage is one module plus one config entry: it runs in the chain, resumes after a SIGKILL,
shows in the catalog and is re-run by a backfill — with nothing in the runtime, flows or CLI changed.

The stage is tests/plugins/step_lengths.py, imported by name from PYTHONPATH as a user's would be."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from cli_runs import finish, start_run, table_rows
from stepforge.flows.backfill import backfill_run
from stepforge.stages.instruments.synthetic import make_problems
from stepforge.storage.catalog import Catalog

PLUGINS = Path(__file__).parent / "plugins"
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))}
pytestmark = pytest.mark.slow  # three real runs of the command line (the synthetic world: no model)


def write_config(tmp: Path, name: str, source: Path) -> Path:
    sampling = {"temperature": 1.0, "max_tokens": 200, "seed": 1}
    config = {
        "run": "plugin", "store": str(tmp / name), "shard_size": 2,
        "backend": {"kind": "synthetic", "world": {"slip_rate": 0.2, "wrong_op_rate": 0.1}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 2, "sampling": {**sampling, "seed": 0}},
        "labeller": "mc",
        "mc_label": {"completions_per_step": 2, "sampling": sampling},
        "plugins": {"step_lengths": {"min_chars": 20}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def markers(store: Path, stage: str) -> list[Path]:
    return sorted((store / "markers" / "run=plugin" / f"stage={stage}").glob("*.json"))


def test_a_plugin_stage_runs_resumes_shows_in_the_catalog_and_is_backfilled(tmp_path, monkeypatch):
    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in make_problems(16, (3, 5), seed=3)))
    whole = tmp_path / "whole"
    finish(start_run(write_config(tmp_path, "whole", source), tmp_path, env=ENV))
    shards = len(markers(whole, "ingest")) - 1  # one of them holds the ingest rejects
    assert shards == 8 and len(markers(whole, "step_lengths")) == shards

    with Catalog(whole) as catalog:
        catalog.refresh(run="plugin")
        assert catalog.query("select count(*) n from shards where stage = 'step_lengths'").to_pylist() == [{"n": shards}]
        checked = catalog.query("select count(*) n from evaluations where model = 'step-length'").to_pylist()[0]["n"]
        policy_steps = catalog.query("select count(*) n from nodes where origin = 'policy'").to_pylist()[0]["n"]
    assert checked > 0 and checked <= policy_steps, "one check per step of the sampled solutions (none of the completions)"

    # SIGKILL part-way through, then resume: the same tables as the uninterrupted run.
    victim = start_run(write_config(tmp_path, "killed", source), tmp_path, env=ENV)
    killed = tmp_path / "killed"
    deadline = time.monotonic() + 600
    while not markers(killed, "step_lengths"):
        assert victim.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finish(start_run(write_config(tmp_path, "killed", source), tmp_path, env=ENV))
    assert table_rows(killed) == table_rows(whole)

    # A backfill with new settings re-runs exactly the plugin's shards, and then nothing.
    monkeypatch.syspath_prepend(str(PLUGINS))
    summary = backfill_run(whole, "plugin", stages=["step_lengths"], overrides={"plugins": {"step_lengths": {"min_chars": 80}}})
    assert summary["written"] == {"step_lengths": shards}
    with Catalog(whole) as catalog:
        catalog.refresh(run="plugin")
        verdicts = catalog.query("select verdict, count(*) n from evaluations where model = 'step-length' "
                                 "group by 1 order by 1").to_pylist()
    assert sum(v["n"] for v in verdicts) == 2 * checked, "the old shards stay; the new ones join them"
    again = backfill_run(whole, "plugin", stages=["step_lengths"], overrides={"plugins": {"step_lengths": {"min_chars": 80}}})
    assert again["written"] == {}, "idempotent"
    with pytest.raises(Exception, match="step_lengths"):
        backfill_run(whole, "plugin", stages=["consensus"], overrides={"plugins": {"step_lengths": {"min_chars": 5}}})
