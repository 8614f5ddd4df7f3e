"""The synthesize flow end to end: real SmolLM2 on llama.cpp, real Prefect, real Parquet + DuckDB."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from stepforge.flows.config import RunConfig
from stepforge.schemas import formats
from stepforge.storage.catalog import Catalog

FIXTURES = Path(__file__).parent / "fixtures"
K = 2

BAD_ROWS = [
    b'{"question": "What is 2 + 2?"}',  # missing_field (answer)
    b'{"question": 123, "answer": "x #### 4"}',  # wrong_type
    b'{"question": "   ", "answer": "x #### 4"}',  # empty_text
    b'{"question": "' + b"a" * 30000 + b'", "answer": "x #### 4"}',  # text_too_long
    b'{"question": "caf\xff\xfe?", "answer": "x #### 4"}',  # invalid_utf8
    b"{not json",  # invalid_json
    b"[1, 2, 3]",  # not_an_object
    b'{"question": "How many legs do 3 cats have?", "answer": "3 cats have 12 legs."}',  # no_gold_answer
]
EXPECTED_INGEST_REJECTS = Counter(
    ["missing_field", "wrong_type", "empty_text", "text_too_long", "invalid_utf8", "invalid_json",
     "not_an_object", "no_gold_answer"]
)


def small_config(tmp: Path, source: Path, **overrides) -> RunConfig:
    data = {
        "run": "t",
        "store": str(tmp / "store"),
        "shard_size": 1,
        "backend": {"model": "smollm2-135m", "n_ctx": 2048, "max_in_flight": 16},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "split": {"mode": "newline"},
        "rollout": {"samples_per_problem": 2, "sampling": {"max_tokens": 48, "temperature": 0.9}},
        "labeller": "mc",
        "mc_label": {"completions_per_step": K, "sampling": {"max_tokens": 40, "temperature": 0.9, "seed": 1}},
    }
    data.update(overrides)
    return RunConfig.model_validate(data)


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory) -> Path:
    """Two real GSM8K rows (MIT) among every kind of bad row."""
    good = (FIXTURES / "gsm8k_sample.jsonl").read_bytes().splitlines()[:2]
    path = tmp_path_factory.mktemp("input") / "mixed.jsonl"
    path.write_bytes(b"\n".join([good[0], *BAD_ROWS[:4], good[1], *BAD_ROWS[4:]]) + b"\n")
    return path


@pytest.fixture(scope="module")
def finished_run(prefect_harness, mixed_input, tmp_path_factory):
    from stepforge.flows.synthesize import synthesize

    cfg = small_config(tmp_path_factory.mktemp("run"), mixed_input)
    result = synthesize(cfg.model_dump(mode="json"))
    catalog = Catalog(cfg.store)
    catalog.refresh()
    yield cfg, result, catalog
    catalog.close()


def rows(catalog: Catalog, sql: str) -> list[dict]:
    return catalog.query(sql).to_pylist()


def test_bad_rows_are_rejected_with_reasons_and_good_rows_go_through(finished_run):
    _, _, catalog = finished_run
    rejected = Counter(r["reason"] for r in rows(catalog, "select reason from rejects where stage = 'ingest'"))
    assert rejected == EXPECTED_INGEST_REJECTS
    assert rows(catalog, "select count(*) n from problems")[0]["n"] == 2
    assert rows(catalog, "select count(distinct problem_id) n from rollouts where origin = 'policy'")[0]["n"] == 2


def test_tree_is_consistent(finished_run):
    _, _, catalog = finished_run
    nodes = {n["node_id"]: n for n in rows(catalog, "select * from nodes")}
    assert len(nodes) == rows(catalog, "select count(*) n from nodes")[0]["n"], "a node is stored once"
    for node in nodes.values():
        if node["parent_id"] is None:
            assert node["depth"] == 1
        else:
            assert nodes[node["parent_id"]]["depth"] == node["depth"] - 1
    for rollout in rows(catalog, "select * from rollouts"):
        path = rollout["node_ids"]
        assert all(nid in nodes for nid in path)
        assert [nodes[nid]["parent_id"] for nid in path] == [None, *path[:-1]]
        if rollout["origin"] == "mc":
            assert rollout["prefix_node_id"] in path[:-1] or rollout["prefix_node_id"] == path[-1]


def test_every_internal_step_has_k_completions_and_every_leaf_an_outcome(finished_run):
    _, _, catalog = finished_run
    policy = rows(catalog, "select node_ids, outcome from rollouts where origin = 'policy'")
    internal = {nid for r in policy for nid in r["node_ids"][:-1]}
    leaves = {r["node_ids"][-1] for r in policy}
    assert internal, "the test needs multi-step rollouts to label"
    mc = {e["node_id"]: e for e in rows(catalog, "select * from evaluations where source = 'mc'")}
    assert set(mc) == internal
    assert all(e["n"] == K and e["value"] == e["successes"] / K for e in mc.values())
    completions = Counter(
        r["prefix_node_id"] for r in rows(catalog, "select prefix_node_id from rollouts where origin = 'mc'")
    )
    rejected_completions = rows(catalog, "select count(*) n from rejects where stage = 'mc_label'")[0]["n"]
    assert sum(completions.values()) + rejected_completions == K * len(internal)
    outcome = {e["node_id"] for e in rows(catalog, "select node_id from evaluations where source = 'outcome'")}
    assert outcome == leaves


def test_labels_follow_the_mc_hard_policy(finished_run):
    _, _, catalog = finished_run
    labels = {lab["node_id"]: lab for lab in rows(catalog, "select * from labels")}
    mc = {r["node_id"] for r in rows(catalog, "select node_id from evaluations where source in ('mc', 'outcome')")}
    vetoed = {r["node_id"] for r in rows(catalog, "select node_id from evaluations where source = 'tool' and verdict = -1")}
    assert set(labels) == mc | vetoed, "every step with MC evidence, and every step a tool check found false"
    for nid, label in labels.items():
        assert label["policy"] == "mc_hard@2+tool_veto+human"
        if nid in vetoed:
            assert label["label"] == -1 and label["confidence"] == 1.0 and "tool" in label["sources"]
        else:
            assert label["label"] == (1 if label["value"] > 0 else -1) and label["sources"] in ("mc", "outcome", "mc+outcome")


def test_exports_load_with_datasets_and_pass_the_format_validators(finished_run):
    cfg, result, catalog = finished_run
    by_name = {e["dataset"]: e for e in result["exports"]}
    prm = datasets.load_from_disk(by_name["prm_stepwise"]["path"])
    formats.validate_stepwise_supervision(prm)
    assert len(prm) == rows(catalog, "select count(*) n from rollouts where origin = 'policy'")[0]["n"]
    formats.validate_math_shepherd(datasets.load_from_disk(by_name["math_shepherd"]["path"]))
    dpo = datasets.load_from_disk(by_name["dpo"]["path"])
    assert len(dpo) == rows(catalog, "select count(*) n from pairs")[0]["n"]
    assert pq.read_table(by_name["dpo"]["parquet_path"]).num_rows == len(dpo)
    if len(dpo):
        formats.validate_preference(dpo)


def test_rerun_skips_complete_shards_and_generates_nothing(finished_run):
    from stepforge.flows.synthesize import synthesize

    cfg, first, catalog = finished_run
    before = {m.shard: m.created_at for m in catalog.store.manifests()}
    again = synthesize(cfg.model_dump(mode="json"))
    assert again["generation"]["generated"] == first["generation"]["generated"], "nothing new was generated"
    after = {m.shard: m.created_at for m in catalog.store.manifests()}
    assert after == before, "no shard was rewritten"


def test_query_command_prints_sql_results(finished_run):
    from stepforge.flows.cli import app

    cfg, _, _ = finished_run
    out = CliRunner().invoke(
        app, ["query", "select reason, count(*) n from rejects group by 1 order by 1", "--store", str(cfg.store),
              "--format", "json"],
    )
    assert out.exit_code == 0, out.output
    printed = {json.loads(line)["reason"]: json.loads(line)["n"] for line in out.output.splitlines()}
    for reason, n in EXPECTED_INGEST_REJECTS.items():
        assert printed[reason] >= n


def test_another_run_name_on_the_same_store_gets_its_own_shards_from_the_cache(finished_run):
    from stepforge.flows.synthesize import synthesize

    cfg, first, catalog = finished_run
    other = cfg.model_copy(update={"run": "t-copy"})
    result = synthesize(RunConfig.model_validate(other.model_dump()).model_dump(mode="json"))
    assert result["generation"]["generated"] == 0 and result["generation"]["cache_hits"] > 0, "replayed, not regenerated"
    stages = {m.stage for m in catalog.store.manifests(run="t-copy")}
    assert stages == {"ingest", "rollout", "mc_label", "verify", "consensus", "pairs", "filter"}
    assert {e["dataset"]: e["rows"] for e in result["exports"]} == {e["dataset"]: e["rows"] for e in first["exports"]}


def test_changing_the_label_policy_relabels_without_generating(finished_run):
    from stepforge.flows.synthesize import synthesize

    cfg, first, catalog = finished_run
    soft = RunConfig.model_validate({**cfg.model_dump(), "consensus": {"policy": "mc_soft"}})
    result = synthesize(soft.model_dump(mode="json"))
    assert result["generation"].get("samples", 0) == 0, "rollout and mc_label shards are reused as they are"
    prm = datasets.load_from_disk({e["dataset"]: e for e in result["exports"]}["prm_stepwise"]["path"])
    assert set(prm["label_policy"]) == {"mc_soft@2+tool_veto+human"}, "the export holds only the current policy's labels"


def test_prefect_serves_complete_shards_from_its_cache(finished_run):
    from prefect.client.orchestration import get_client

    from stepforge.flows.synthesize import synthesize

    cfg, _, _ = finished_run
    synthesize(cfg.model_dump(mode="json"))  # the first re-run stores keyed results ...
    synthesize(cfg.model_dump(mode="json"))  # ... which this one is served from
    with get_client(sync_client=True) as client:
        states = [(run.name.split("-")[0], run.state.name) for run in client.read_task_runs(limit=200)]
    cached_stages = {name for name, state in states if state == "Cached"}
    assert {"rollout", "mc_label", "verify", "consensus", "pairs", "filter"} <= cached_stages, states
