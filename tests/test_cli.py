"""The CLI's own behaviour: progress without a terminal, SQL errors, exporting an unknown run."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from stepforge.flows.cli import app
from stepforge.flows.progress import RichReporter


def test_progress_is_logged_line_by_line_without_a_terminal():
    out = io.StringIO()
    with RichReporter(Console(file=out)) as reporter:
        with reporter.track("mc labels abc", 3) as advance:
            advance()
            advance(2)
    assert "mc labels abc: 3/3 in 0 s" in out.getvalue()


def test_a_bad_query_is_a_clear_error_not_a_traceback(tmp_path):
    result = CliRunner().invoke(app, ["query", "select nope from nodes", "--store", str(tmp_path)])
    assert result.exit_code == 2  # a mistake in the command, like every other (tests/test_cli_errors.py)
    assert "query failed" in result.stderr and "nope" in result.stderr


def test_exporting_an_unknown_run_says_so(tmp_path):
    result = CliRunner().invoke(app, ["export", "--store", str(tmp_path), "--run", "missing"])
    assert result.exit_code == 2
    assert "no run 'missing'" in result.stderr


def test_world_command_writes_problems_the_ingest_reads(tmp_path):
    import json

    result = CliRunner().invoke(app, ["world", "problems", "--n", "3", "--steps", "2-4", "--seed", "5"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 3 and all("####" in r["answer"] for r in rows)


def test_run_takes_the_labeller_from_the_command_line(prefect_harness, tmp_path):
    """`stepforge run CONFIG --labeller mcts` overrides the config's labeller; the summary names it."""
    import json

    import yaml

    from stepforge.stages.instruments.synthetic import make_problems
    from stepforge.storage.catalog import Catalog

    source = tmp_path / "world.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in make_problems(2, 3, seed=1)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run": "cli", "store": str(tmp_path / "store"), "labeller": "mc",
        "backend": {"kind": "synthetic"}, "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 2}, "mcts": {"iterations": 4, "breadth": 2},
    }))
    result = CliRunner().invoke(app, ["run", str(config), "--labeller", "mcts"])
    assert result.exit_code == 0, result.output
    assert "labeller mcts" in result.output and "synthetic-world" in result.output
    assert "evidence" in result.output and "tool:" in result.output
    with Catalog(tmp_path / "store") as catalog:
        catalog.refresh(run="cli")
        assert {r["source"] for r in catalog.query("select distinct source from evaluations").to_pylist()} == {"mcts", "tool"}

    # --verify '' and --policy override the config's sections: no tool evidence, soft labels.
    result = CliRunner().invoke(app, ["run", str(config), "--run", "cli2", "--verify", "", "--policy", "mc_soft"])
    assert result.exit_code == 0, result.output
    with Catalog(tmp_path / "store") as catalog:
        catalog.refresh(run="cli2")
        sources = {r["source"] for r in catalog.query("select distinct source from evaluations").to_pylist()}
        policies = {r["policy"] for r in catalog.query("select distinct policy from labels").to_pylist()}
    assert "tool" not in sources and policies == {"mc_soft@2+tool_veto+human"}
    bad = CliRunner().invoke(app, ["run", str(config), "--policy", "majority"])
    assert bad.exit_code == 2 and "invalid option" in bad.output


def test_every_shipped_config_validates():
    """configs/*.yaml are documentation users copy: each must load as a RunConfig."""
    from pathlib import Path

    from stepforge.flows.config import RunConfig

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        RunConfig.from_yaml(path)


def test_an_engine_that_is_not_installed_is_named_before_any_work(tmp_path):
    source = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(f"run: v\nstore: {tmp_path / 'store'}\ningest: {{source: {source}, format: gsm8k}}\n")
    result = CliRunner().invoke(app, ["run", str(config), "--backend", "vllm", "--model", "Qwen/Qwen2.5-0.5B-Instruct"])
    assert result.exit_code == 2
    assert "pip install 'stepforge[vllm]'" in result.output
    assert not (tmp_path / "store").exists()  # nothing ran
