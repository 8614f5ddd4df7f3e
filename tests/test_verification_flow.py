"""Verification sources and consensus policies in the real flow: Prefect, Parquet shards, DuckDB, exports.

- On the synthetic world (a measuring instrument with known step truths), the tool checker
  flags exactly the steps whose calculation slipped, and the tool veto turns them into -1
  labels that reach the exported datasets with their sources.
- ``stepforge eval processbench`` on real ProcessBench rows scores methods against the
  human labels and stores one result per row and method.
- The judge runs in the flow on the real CPU model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
from typer.testing import CliRunner

from stepforge.flows.config import RunConfig
from stepforge.stages.instruments.synthetic import make_problems, step_truths
from stepforge.storage.catalog import Catalog

FIXTURES = Path(__file__).parent / "fixtures"
PROCESSBENCH = FIXTURES / "processbench_gsm8k_dev40.json"
PROCESSBENCH_GOLD = FIXTURES / "gsm8k_processbench40.jsonl"
# The world's step sentence: "<name> <phrase>: a op b = result."
CALCULATION = re.compile(r"(-?\d+) ([-+*x×]) (-?\d+) = (-?\d+)")


def world_config(tmp: Path, source: Path, **sections) -> RunConfig:
    sampling = {"temperature": 1.0, "max_tokens": 400, "seed": 1}
    return RunConfig.model_validate({
        "run": "verify-world", "store": str(tmp / "store"), "shard_size": 4, "labeller": "mc",
        "backend": {"kind": "synthetic", "world": {"slip_rate": 0.2, "wrong_op_rate": 0.1}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 4, "sampling": {**sampling, "seed": 0}},
        "mc_label": {"completions_per_step": 4, "sampling": sampling},
        "export": {"out_dir": str(tmp / "export"), "formats": ["prm_stepwise", "step_kto"]},
        **sections,
    })


def test_tool_checks_catch_exactly_the_slipped_calculations(prefect_harness, tmp_path):
    from stepforge.flows.synthesize import synthesize

    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in make_problems(8, (3, 5), seed=11)))
    cfg = world_config(tmp_path, source, verify={"sources": ["tool"]}, consensus={"policy": "mc_hard"})
    synthesize(cfg.model_dump(mode="json"))
    with Catalog(cfg.store) as catalog:
        catalog.refresh(run=cfg.run)
        q = lambda sql: catalog.query(sql).to_pylist()  # noqa: E731
        assert "verify" in {m.stage for m in catalog.store.manifests(run=cfg.run)}
        tool = {e["node_id"]: e for e in q("select * from evaluations where source = 'tool'")}
        labels = {lab["node_id"]: lab for lab in q("select * from labels")}
        nodes = {n["node_id"]: n for n in q("select node_id, text from nodes")}
        question = {p["problem_id"]: p["question"] for p in q("select problem_id, question from problems")}
        paths = q("select problem_id, node_ids from rollouts where origin = 'policy'")
    slipped = flagged = 0
    for rollout in paths:
        steps = [nodes[nid]["text"] for nid in rollout["node_ids"]]
        truths = step_truths(question[rollout["problem_id"]], steps, cfg.backend.world)
        for nid, text in zip(rollout["node_ids"], steps):
            calc = CALCULATION.search(text)
            if calc is None:
                continue
            a, op, b, stated = int(calc[1]), calc[2], int(calc[3]), int(calc[4])
            true_value = {"+": a + b, "-": a - b}.get(op, a * b)
            slip = true_value != stated
            slipped += slip
            assert nid in tool, f"every step with a calculation is checked: {text!r}"
            checks = json.loads(tool[nid]["meta"])["checks"]
            arithmetic = [c for c in checks if c["kind"] != "final_answer"]
            assert any(c["status"] == "false" for c in arithmetic) == slip, f"flagged iff the calculation is false: {text!r}"
            if slip:
                flagged += 1
                assert not truths[steps.index(text)].correct, "a flagged step is a wrong step (precision 1)"
                assert labels[nid]["label"] == -1 and labels[nid]["confidence"] == 1.0
                assert "tool" in labels[nid]["sources"].split("+"), "the check is named behind the label"
                assert f"{a} {op} {b}".replace(" ", "") in json.dumps(json.loads(tool[nid]["meta"])).replace(" ", "")
    assert slipped >= 3 and flagged == slipped, "the world's slips are all caught"
    final = [json.loads(e["meta"])["checks"] for e in tool.values()]
    final = [c for checks in final for c in checks if c["kind"] == "final_answer"]
    assert final and {c["status"] for c in final} <= {"true", "false"}, "stated final answers are checked against gold"
    prm = datasets.load_from_disk(str(tmp_path / "export" / "prm_stepwise"))
    assert all(len(row["label_sources"]) == len(row["completions"]) for row in prm)
    vetoed = [s for row in prm for s in row["label_sources"] if "tool" in s.split("+")]
    assert vetoed, "tool-vetoed labels reach the export, with their source named"


def test_eval_processbench_scores_methods_against_the_human_labels(prefect_harness, tmp_path):
    from stepforge.flows.cli import app

    store = tmp_path / "store"
    args = ["eval", "processbench", str(PROCESSBENCH), "--gold", str(PROCESSBENCH_GOLD), "--store", str(store),
            "--run", "pb", "-m", "tool", "-m", "tool+propagate"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "F1" in result.output
    reference = {row["id"]: row["label"] for row in json.loads(PROCESSBENCH.read_text())}
    with Catalog(store) as catalog:
        catalog.refresh(run="pb")
        rows = catalog.query("select * from eval_results").to_pylist()
        stats = [m.stats for m in catalog.store.manifests(run="pb", stage="eval")]
        generated = catalog.query("select count(*) n from rollouts where origin <> 'policy'").to_pylist()[0]["n"]
    assert generated == 0, "tool checks alone generate nothing"
    methods = {r["method"] for r in rows}
    assert methods == {"tool@1+human", "tool@1+propagate+human"} or len(methods) == 2
    for method in methods:
        scored = {r["item"]: r for r in rows if r["method"] == method}
        assert set(scored) == set(reference), "every imported row is scored once per method"
        assert all(scored[i]["reference"] == label for i, label in reference.items())
        assert all(r["correct"] == (r["predicted"] == r["reference"]) for r in scored.values())
    for stat in stats:
        mine = [r for r in rows if r["method"] == stat["policy"]]
        erroneous = [r for r in mine if r["reference"] >= 0]
        clean = [r for r in mine if r["reference"] < 0]
        assert stat["acc_error"] == pytest.approx(sum(r["correct"] for r in erroneous) / len(erroneous))
        assert stat["acc_correct"] == pytest.approx(sum(r["correct"] for r in clean) / len(clean))
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    with Catalog(store) as catalog:
        assert len(catalog.store.manifests(run="pb", stage="eval")) == 2, "re-running scores from the stored shards"


@pytest.mark.slow
def test_the_judge_runs_in_the_flow_on_the_real_model(prefect_harness, tmp_path):
    from stepforge.flows.synthesize import synthesize

    cfg = RunConfig.model_validate({
        "run": "judge-flow", "store": str(tmp_path / "store"), "labeller": "none",
        "backend": {"model": "smollm2-135m", "n_ctx": 2048},
        "ingest": {"source": str(PROCESSBENCH), "format": "processbench", "gold_source": str(PROCESSBENCH_GOLD),
                   "limit": 2},
        "rollout": {"samples_per_problem": 0},
        "verify": {"sources": ["tool", "judge"], "judge": {"max_tokens": 160, "max_rationale_chars": 100}},
        "consensus": {"policy": "vote", "human_override": False},  # the imported human labels stay out
        "export": {"out_dir": str(tmp_path / "export"), "formats": ["prm_stepwise"]},
    })
    synthesize(cfg.model_dump(mode="json"))
    with Catalog(cfg.store) as catalog:
        catalog.refresh(run=cfg.run)
        q = lambda sql: catalog.query(sql).to_pylist()  # noqa: E731
        judged = q("select count(distinct json_extract_string(meta, '$.rollout_id')) n from evaluations where source = 'judge'")[0]["n"]
        rejected = q("select count(*) n from rejects where stage = 'judge'")[0]["n"]
        sources = {r["sources"] for r in q("select distinct sources from labels")}
        policies = {r["policy"] for r in q("select distinct policy from labels")}
    assert judged + rejected >= 2, "each imported solution is judged, or its unreadable judgement is a reject"
    assert judged >= 1 and any("judge" in s for s in sources)
    assert policies == {"vote@1+tool_veto"}


def test_the_judge_model_can_differ_from_the_policy_model(tmp_path):
    from stepforge.flows.runtime import RunContext, chain_keys

    def verify_key(ctx, problem_shard):
        return chain_keys(ctx, problem_shard)["verification"]

    source = tmp_path / "problems.jsonl"
    source.write_text(json.dumps(make_problems(1, 2, seed=1)[0]) + "\n")
    judge_backend = {"kind": "synthetic", "world": {"slip_rate": 0.0, "wrong_op_rate": 0.0}}
    separate = RunContext(world_config(tmp_path, source, verify={"sources": ["judge"], "judge_backend": judge_backend}))
    shared = RunContext(world_config(tmp_path, source, verify={"sources": ["judge"]}))
    assert separate.judge_client() is not separate.client()
    assert separate.judge_client().model_id != separate.client().model_id
    assert shared.judge_client() is shared.client()
    assert verify_key(separate, "problem-shard") != verify_key(shared, "problem-shard"), "the judge model keys its evidence"
    tool_only = [RunContext(world_config(tmp_path, source, verify={"sources": ["tool"], **extra}))
                 for extra in ({}, {"judge_backend": judge_backend})]
    assert verify_key(tool_only[0], "problem-shard") == verify_key(tool_only[1], "problem-shard")
    assert not tool_only[1].clients, "a tool-only run never loads the judge's model (nor, for keys, the policy's)"
