"""Stores outlive the code that wrote them: a store made before the stage registry resumes with zero
new generations, and a store copied or moved elsewhere exports exactly what it exported before."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from typer.testing import CliRunner

from cli_runs import table_rows
from stepforge.flows import runtime, service
from stepforge.flows.cli import app
from stepforge.flows.config import RunConfig

OLD_STORE = Path(__file__).parent / "fixtures" / "store_5d33dad"
RUNS = ("world-mc", "world-bs", "world-mcts", "agents")


def markers(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in (store / "markers").rglob("*.json")}


@pytest.fixture
def old_store(tmp_path, monkeypatch) -> Path:
    """A copy of the old store, run from where it was made: its paths (store, sources) are relative, and a
    problem records its source path, so the copy keeps the same layout and the test works beside it."""
    root = tmp_path / "old"
    shutil.copytree(OLD_STORE, root, ignore=shutil.ignore_patterns("make_store.py"))
    monkeypatch.chdir(root)
    return root


def resumed_config(root: Path, run: str) -> RunConfig:
    return runtime.load_run_config(Path("store"), run)


@pytest.mark.parametrize("run", RUNS)
def test_a_store_written_before_the_registry_resumes_with_zero_new_generations(old_store, run):
    root = old_store
    store = root / "store"
    before = markers(store)
    record = runtime.load_run_record(store, run)
    ctx = runtime.RunContext(resumed_config(root, run))
    try:
        problem_shards, reject_shard = runtime.ingest_shards(ctx)
        chains = [runtime.run_chain(ctx, m) for m in problem_shards]
        assert not ctx.clients, "no model was loaded: every shard was found under its old key"
        assert markers(store) == before, "no shard was recomputed"
        # The recorded chains (old slot names, read through the record's normaliser) are today's chains.
        assert {c[runtime.ROOT].shard: {s: m.shard for s, m in c.items() if s != runtime.ROOT} for c in chains} == record["chains"]
        exported = {e["dataset"]: e["rows"] for e in runtime.export_run(ctx, chains, reject_shard)}
        assert exported == {e["dataset"]: e["rows"] for e in record["exports"]}
    finally:
        ctx.close()


def test_the_synthesize_flow_resumes_an_old_store_without_generating(prefect_harness, old_store):
    from stepforge.flows.synthesize import synthesize

    root = old_store
    before = markers(root / "store")
    summary = synthesize(resumed_config(root, "world-mc"))
    assert summary["generation"] == {}, "the policy was never asked for a sample"
    assert markers(root / "store") == before


def test_a_moved_store_exports_and_reports_what_it_exported_before(old_store, tmp_path):
    root = old_store
    # Resume once with today's code: its record then names the chains and the rejects shard.
    ctx = runtime.RunContext(resumed_config(root, "world-mc"))
    problem_shards, reject_shard = runtime.ingest_shards(ctx)
    chains = [runtime.run_chain(ctx, m) for m in problem_shards]
    exports = runtime.export_run(ctx, chains, reject_shard)
    runtime.record_run(ctx, "completed", exports, chains=chains, reject_shard=reject_shard)
    ctx.close()
    tables = table_rows(root / "store")

    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(str(root / "store"), moved)
    shutil.rmtree(root / "sources")  # the source is gone too: the record's chains are what is read
    again, incomplete, out_dir = service.export_stored_run(moved, "world-mc")
    assert incomplete == 0 and Path(out_dir).is_relative_to(moved), "exports land in the store where it is now"
    assert {e["dataset"]: e["rows"] for e in again} == {e["dataset"]: e["rows"] for e in exports}
    assert sum(e["rows"] for e in again) > 0
    assert table_rows(moved) == tables
    path, _ = service.report_stored_run(moved, "world-mc")
    assert path.is_relative_to(moved) and "world-mc" in path.read_text()


def test_an_export_without_a_complete_chain_says_so(old_store):
    root = old_store
    store = root / "store"
    for marker in (store / "markers" / "run=world-bs" / "stage=consensus").glob("*.json"):
        marker.unlink()  # no labels: no chain is complete
    config = resumed_config(root, "world-bs")
    runtime.record_run(runtime.RunContext(config), "failed")  # its record now points at the copied source
    with pytest.raises(service.NothingToExport, match="no complete shard chain"):
        service.export_stored_run(store, "world-bs")
    with pytest.raises(service.UserError, match="no run 'nope'"):
        service.export_stored_run(store, "nope")
    # On the command line: one line on stderr, a non-zero exit, and no dataset written.
    result = CliRunner().invoke(app, ["export", "--store", str(store), "--run", "world-bs"])
    assert result.exit_code == 2 and "no complete shard chain" in result.stderr, result.output
    assert not (store / "exports" / "world-bs").exists()
