"""``stepforge backfill``: chosen stages re-run over a stored run under new settings, idempotently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stored_runs import processbench_config, store_run
from stepforge.flows import runtime
from stepforge.flows.backfill import BackfillError, backfill_run, merge
from stepforge.flows.cli import app
from stepforge.flows.config import RunConfig



def make_run(store: Path, run: str = "bf") -> RunConfig:
    """Eight ProcessBench trajectories in two shards, labelled by the tool checks."""
    cfg = processbench_config(store, run, limit=8)
    store_run(cfg).close()
    return cfg


def markers(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in (store / "markers").rglob("*.json")}


def labels_now(store: Path, run: str) -> dict[str, dict]:
    ctx = runtime.RunContext(runtime.load_run_config(store, run))
    chains, incomplete, _ = runtime.completed_chains(ctx)
    assert incomplete == 0
    return {r["node_id"]: r for r in ctx.store.read_rows("labels", [c["labels"] for c in chains])}


def test_backfill_relabels_reexports_and_says_what_changed(tmp_path):
    make_run(tmp_path)
    before = labels_now(tmp_path, "bf")
    result = CliRunner().invoke(app, ["backfill", "bf", "--store", str(tmp_path), "--set", "consensus.human_override=true"])
    assert result.exit_code == 0, result.output
    after = labels_now(tmp_path, "bf")
    flipped = sum(1 for n in set(before) & set(after) if before[n]["label"] != after[n]["label"])
    added = len(set(after) - set(before))
    assert flipped + added > 0, "ProcessBench's human labels now decide"
    assert f"changed {flipped}" in result.output and f"added {added}" in result.output
    assert "re-ran: consensus ×2, pairs ×2, filter ×2" in result.output
    exported = json.loads((tmp_path / "runs" / "bf.json").read_text())
    assert exported["config"]["consensus"]["human_override"] is True, "the run now follows the new settings"
    rows = exported["exports"][0]["rows"]
    assert f"export prm_stepwise: 3 → {rows} rows" in result.output and rows > 3, "fully labelled paths now export"
    assert set(exported["chains"]) and all(c["labels"] for c in exported["chains"].values())

    seen = markers(tmp_path)
    again = CliRunner().invoke(app, ["backfill", "bf", "--store", str(tmp_path), "--set", "consensus.human_override=true"])
    assert again.exit_code == 0 and "re-ran: nothing" in again.output and "changed 0, added 0, removed 0" in again.output
    assert markers(tmp_path) == seen, "idempotent: nothing written"
    no_export = backfill_run(tmp_path, "bf", stages=["consensus", "pairs", "filter"])
    assert no_export["exports"] == []
    kept = json.loads((tmp_path / "runs" / "bf.json").read_text())["exports"]
    assert kept == exported["exports"], "without an export stage the record still names the datasets on disk"


def test_a_stage_the_settings_change_but_not_chosen_is_an_error_before_any_work(tmp_path):
    make_run(tmp_path)
    seen = markers(tmp_path)
    record = (tmp_path / "runs" / "bf.json").read_text()
    result = CliRunner().invoke(app, ["backfill", "bf", "--store", str(tmp_path), "--stages", "consensus,export",
                                      "--set", "verify.sources=[]"])
    assert result.exit_code == 1
    assert "change the verify, pairs, filter shard(s) of 2 problem shard(s)" in " ".join(result.output.split())
    assert markers(tmp_path) == seen and (tmp_path / "runs" / "bf.json").read_text() == record
    bad = CliRunner().invoke(app, ["backfill", "bf", "--store", str(tmp_path), "--set", "consensus.policy=oracle"])
    assert bad.exit_code == 2 and "valid config" in bad.output
    with pytest.raises(BackfillError, match="unknown stage"):
        backfill_run(tmp_path, "bf", stages=["consensus", "judge"])


def test_selection_by_sql_and_by_shard_touches_only_those_shards(tmp_path):
    make_run(tmp_path)
    ctx = runtime.RunContext(runtime.load_run_config(tmp_path, "bf"))
    problem_shards, _ = runtime.ingest_shards(ctx)
    first = problem_shards[0]
    problem = ctx.store.read_rows("problems", [first])[0]["problem_id"]
    summary = backfill_run(tmp_path, "bf", overrides={"consensus": {"propagate_errors": True}},
                           sql=f"select problem_id from problems where problem_id = '{problem}'")
    assert summary["shards_selected"] == 1 and summary["written"] == {"consensus": 1, "pairs": 1, "filter": 1}
    assert summary["shards_incomplete"] == 1, "the other shard is not done under the new settings yet (and said so)"
    rest = backfill_run(tmp_path, "bf", overrides={"consensus": {"propagate_errors": True}},
                        shard_keys=[problem_shards[1].shard[:10]])
    assert rest["shards_selected"] == 1 and rest["shards_incomplete"] == 0
    with pytest.raises(BackfillError, match="no problem shard"):
        backfill_run(tmp_path, "bf", shard_keys=["ffffffffffff"])
    with pytest.raises(BackfillError, match="problem_id column"):
        backfill_run(tmp_path, "bf", sql="select 1 as x")


def test_merge_changes_only_the_named_keys():
    base = {"consensus": {"policy": "mc_hard", "tool_veto": True}, "run": "a"}
    assert merge(base, {"consensus": {"policy": "vote"}}) == {"consensus": {"policy": "vote", "tool_veto": True}, "run": "a"}
    assert base["consensus"]["policy"] == "mc_hard"


def test_backfill_flow_runs_under_prefect(prefect_harness, tmp_path):
    from stepforge.flows.backfill import backfill

    make_run(tmp_path)
    summary = backfill(run="bf", store=str(tmp_path), overrides={"consensus": {"human_override": True}})
    assert summary["written"]["consensus"] == 2 and summary["labels"]["changed"] + summary["labels"]["added"] > 0
