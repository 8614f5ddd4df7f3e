"""Parquet shards, completion markers and the DuckDB catalog (real files, real DuckDB)."""

from __future__ import annotations

import duckdb
import pyarrow.parquet as pq
import pytest

from stepforge.schemas.ids import node_id, normalize_step_text
from stepforge.schemas.records import Label, Node, Reject
from stepforge.storage.catalog import Catalog
from stepforge.storage.shards import ShardStore


def make_node(text: str, parent: str | None = None, depth: int = 1) -> Node:
    return Node(node_id=node_id("p1", parent, text), problem_id="p1", parent_id=parent, depth=depth,
                text=text, origin="policy", num_tokens=3)


def test_node_ids_are_content_hashes_of_problem_parent_and_normalised_text():
    assert node_id("p", None, "48 / 2 = 24") == node_id("p", None, "  48 /  2 =\n24 ")
    assert node_id("p", None, "48 / 2 = 24") != node_id("p", "x", "48 / 2 = 24")
    assert node_id("p", None, "48 / 2 = 24") != node_id("q", None, "48 / 2 = 24")
    assert normalize_step_text("ﬁve\u00a0apples") == "five apples"


def test_shard_is_written_atomically_with_schema_and_marker_last(tmp_path):
    store = ShardStore(tmp_path)
    first = make_node("a")
    manifest = store.write_shard("r", "rollout", "s1", {"nodes": [first, make_node("b", first.node_id, 2)], "rejects": []})
    assert manifest.rows("nodes") == 2 and manifest.rows("rejects") == 0
    table = pq.read_table(tmp_path / manifest.tables["nodes"]["path"])
    assert table.schema.equals(Node.ARROW_SCHEMA)
    assert pq.read_table(tmp_path / manifest.tables["rejects"]["path"]).num_rows == 0
    assert store.manifest("r", "rollout", "s1") == manifest
    assert not list(tmp_path.rglob(".*tmp-*")), "no temporary files are left behind"


def test_a_shard_without_marker_is_invisible_and_redone(tmp_path):
    store = ShardStore(tmp_path)
    # A crash after the table file but before the marker: the file exists, the shard does not.
    path = store.table_path("nodes", "r", "rollout", "s1")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half-written garbage")
    assert store.manifest("r", "rollout", "s1") is None
    with Catalog(tmp_path) as catalog:
        catalog.refresh()
        assert catalog.query("select count(*) n from nodes").to_pylist() == [{"n": 0}]
    store.write_shard("r", "rollout", "s1", {"nodes": [make_node("a")]})
    with Catalog(tmp_path) as catalog:
        catalog.refresh()
        assert catalog.query("select text, run, stage from nodes").to_pylist() == [
            {"text": "a", "run": "r", "stage": "rollout"}
        ]


def test_catalog_views_runs_and_shard_manifest(tmp_path):
    store = ShardStore(tmp_path)
    store.write_shard("r1", "consensus", "a", {"labels": [
        Label(node_id="n1", problem_id="p", label=1, value=0.5, confidence=1.0, reason="x", policy="mc_hard@1")]})
    store.write_shard("r2", "consensus", "b", {"labels": [
        Label(node_id="n2", problem_id="p", label=-1, value=0.0, confidence=0.5, reason="y", policy="mc_hard@1")]})
    with Catalog(tmp_path) as catalog:
        catalog.refresh()
        assert catalog.query("select run, label from labels order by run").to_pylist() == [
            {"run": "r1", "label": 1}, {"run": "r2", "label": -1}]
        assert catalog.query("select count(*) n from shards").to_pylist() == [{"n": 2}]
        # Empty tables still have their columns, so queries bind before any data exists.
        assert catalog.query("select count(*) n, avg(value) v from evaluations").to_pylist() == [{"n": 0, "v": None}]
        catalog.refresh(run="r2")
        assert catalog.query("select node_id from labels").to_pylist() == [{"node_id": "n2"}]


def test_catalog_falls_back_to_memory_when_another_process_holds_the_file(tmp_path):
    store = ShardStore(tmp_path)
    store.write_shard("r", "ingest", "a", {"rejects": [Reject(stage="ingest", item="f#1", reason="invalid_json", detail="x")]})
    holder = duckdb.connect(str(tmp_path / "catalog.duckdb"))
    try:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            assert pool.apply(_count_rejects, (str(tmp_path),)) == (True, 1)
    finally:
        holder.close()


def _count_rejects(root: str):
    with Catalog(root) as catalog:
        catalog.refresh()
        return catalog.in_memory, catalog.query("select count(*) n from rejects").to_pylist()[0]["n"]


def test_reject_reasons_must_be_snake_case():
    with pytest.raises(ValueError):
        Reject(stage="x", item="y", reason="Not Snake", detail="")
