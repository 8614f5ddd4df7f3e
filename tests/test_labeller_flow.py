"""The labeller is a config choice of the real flow: Prefect, Parquet shards, DuckDB, exports.

Runs on the synthetic world (a measuring instrument with known answers; stages/instruments/synthetic.py)
so the flow's labels can be checked against ground truth in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from stepforge.flows.config import RunConfig
from stepforge.stages.instruments.synthetic import first_error, make_problems
from stepforge.storage.catalog import Catalog


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("world") / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_problems(6, (3, 5), seed=3)))
    return path


def config(tmp: Path, source: Path, labeller: str) -> RunConfig:
    sampling = {"temperature": 1.0, "max_tokens": 400, "seed": 1}
    return RunConfig.model_validate({
        "run": f"flow-{labeller}", "store": str(tmp / "store"), "shard_size": 3, "labeller": labeller,
        "backend": {"kind": "synthetic", "world": {"slip_rate": 0.15, "wrong_op_rate": 0.1}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 4, "sampling": {**sampling, "seed": 0}},
        "mc_label": {"completions_per_step": 8, "sampling": sampling},
        "binary_search": {"completions_per_prefix": 8, "sampling": sampling},
        "mcts": {"iterations": 16, "breadth": 4, "sampling": sampling},
        "pairs": {"kinds": ["step_dpo", "sibling", "trajectory"]},
    })


@pytest.mark.parametrize("labeller", ["mc", "binary_search", "mcts"])
def test_synthesize_runs_the_configured_labeller(prefect_harness, problems_file, tmp_path, labeller):
    from stepforge.flows.synthesize import synthesize

    cfg = config(tmp_path, problems_file, labeller)
    stage = {"mc": "mc_label", "binary_search": "binary_search", "mcts": "mcts"}[labeller]
    result = synthesize(cfg.model_dump(mode="json"))
    with Catalog(cfg.store) as catalog:
        catalog.refresh(run=cfg.run)
        q = lambda sql: catalog.query(sql).to_pylist()  # noqa: E731
        assert {m.stage for m in catalog.store.manifests(run=cfg.run)} == {"ingest", "rollout", stage, "verify", "consensus", "pairs", "filter"}
        sources = {r["source"] for r in q("select distinct source from evaluations")} - {"tool"}  # verify's default
        assert sources == ({"mcts"} if labeller == "mcts" else {"mc"} | ({"outcome"} if labeller == "mc" else set()))
        nodes = {n["node_id"]: n["text"] for n in q("select node_id, text from nodes")}
        question = {p["problem_id"]: p["question"] for p in q("select problem_id, question from problems")}
        labels = {lab["node_id"]: lab["label"] for lab in q("select node_id, label from labels")}
        policy = q("select problem_id, node_ids from rollouts where origin = 'policy'")
    right = 0
    for rollout in policy:
        ids = rollout["node_ids"]
        truth = first_error(question[rollout["problem_id"]], [nodes[n] for n in ids])
        right += next((j for j, n in enumerate(ids) if labels[n] < 0), -1) == truth
    assert right >= 0.8 * len(policy), f"{right}/{len(policy)} first errors found"
    exports = {e["dataset"]: e for e in result["exports"]}
    prm = datasets.load_from_disk(exports["prm_stepwise"]["path"])
    assert len(prm) == len(policy), "every policy rollout is fully labelled and exported"
    assert exports["step_kto"]["rows"] > 0
