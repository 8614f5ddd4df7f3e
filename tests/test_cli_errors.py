"""A user's mistake on the command line is one line on stderr and exit code 2, never a traceback;
``--debug`` (or STEPFORGE_DEBUG=1) shows the traceback instead. And a command that drops input rows
says how many, why, and how to list them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stepforge.flows.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
PROCESSBENCH = FIXTURES / "processbench_gsm8k_dev40.json"


@pytest.fixture(autouse=True)
def no_debug_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEPFORGE_DEBUG", raising=False)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def mistake(result) -> str:
    """The one line a mistake printed, after checking it is one line, on stderr, with exit code 2."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    return lines[0]


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def valid_config(tmp_path: Path, **extra: str) -> str:
    source = FIXTURES / "gsm8k_sample.jsonl"
    lines = {"run": "t", "store": str(tmp_path / "store"), "backend": "{kind: synthetic}",
             "ingest": f"{{source: {source}, format: gsm8k}}", **extra}
    return "".join(f"{key}: {value}\n" for key, value in lines.items())


def test_a_missing_config(tmp_path: Path) -> None:
    line = mistake(invoke("run", tmp_path / "missing.yaml"))
    assert "missing.yaml" in line and "no such file" in line


def test_an_unreadable_config(tmp_path: Path) -> None:
    # A directory, not chmod 000: root reads any file whatever its mode.
    (tmp_path / "configs.yaml").mkdir()
    line = mistake(invoke("run", tmp_path / "configs.yaml"))
    assert "configs.yaml" in line and "directory" in line


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = config(tmp_path, "run: t\nshard_size: 4\n  labeller: mc\n")  # the colon on line 3 is at column 11
    line = mistake(invoke("run", path))
    assert str(path) in line and "line 3, column 11" in line and "YAML" in line


def test_an_unknown_key_names_its_dotted_path_and_the_closest_valid_key(tmp_path: Path) -> None:
    path = config(tmp_path, valid_config(tmp_path, rollout="{samples_per_problm: 2}"))
    line = mistake(invoke("run", path))
    assert "rollout.samples_per_problm" in line and "did you mean rollout.samples_per_problem?" in line
    assert not (tmp_path / "store").exists(), "nothing ran"


def test_a_mistyped_value_names_its_key_and_the_problem(tmp_path: Path) -> None:
    line = mistake(invoke("run", config(tmp_path, valid_config(tmp_path, shard_size="many"))))
    assert "shard_size" in line and "valid integer" in line and "'many'" in line


def test_a_mistyped_command_line_option_is_a_config_mistake_too(tmp_path: Path) -> None:
    line = mistake(invoke("run", config(tmp_path, valid_config(tmp_path)), "--policy", "majority"))
    assert "invalid option" in line and "consensus.policy" in line


def test_a_missing_source_file_is_found_before_any_work(tmp_path: Path) -> None:
    text = valid_config(tmp_path, ingest=f"{{source: {tmp_path / 'absent.jsonl'}, format: gsm8k}}")
    line = mistake(invoke("run", config(tmp_path, text)))
    assert "ingest.source" in line and "absent.jsonl" in line and "does not exist" in line
    assert not (tmp_path / "store").exists(), "no run record, no shard: nothing started"


@pytest.mark.parametrize("command", [
    ["export", "--run", "nope"], ["report", "nope"], ["backfill", "nope"],
    ["review", "push", "nope"], ["review", "pull", "nope"], ["review", "status", "nope"], ["review", "webhook", "nope"],
])
def test_an_unknown_run(tmp_path: Path, command: list[str]) -> None:
    line = mistake(invoke(*command, "--store", tmp_path))
    assert "no run 'nope'" in line


def test_bad_sql_is_duckdbs_first_line(tmp_path: Path) -> None:
    line = mistake(invoke("query", "selec 1", "--store", tmp_path))
    assert line.startswith("error: query failed:") and "selec" in line


def test_an_unknown_option_is_still_clicks_usage_error() -> None:
    result = invoke("run", "--no-such-option")
    assert result.exit_code == 2 and "No such option" in result.output


def test_debug_shows_the_traceback_instead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stepforge.flows.errors import UserError

    result = invoke("--debug", "run", tmp_path / "missing.yaml")
    assert isinstance(result.exception, UserError) and result.exit_code != 2
    monkeypatch.setenv("STEPFORGE_DEBUG", "1")
    result = invoke("run", tmp_path / "missing.yaml")
    assert isinstance(result.exception, UserError)


def test_python_dash_m_answers_alike(tmp_path: Path) -> None:
    """The module entry point (and so the `stepforge` script, the same app) in a real process."""
    env = {k: v for k, v in os.environ.items() if k != "STEPFORGE_DEBUG"}
    command = [sys.executable, "-m", "stepforge.flows.cli"]
    plain = subprocess.run([*command, "run", "missing.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 2 and plain.stderr.splitlines() == ["error: config missing.yaml: no such file"]
    debug = subprocess.run([*command, "--debug", "run", "missing.yaml"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "no such file" in debug.stderr


def test_eval_processbench_says_which_rows_it_dropped_and_how_to_list_them(prefect_harness, tmp_path: Path) -> None:
    """Without --gold, a ProcessBench row is scored only if some row of its question is marked correct:
    the rest are dropped as no_gold_answer, and the command says so. `tool` needs no model."""
    rows = json.loads(PROCESSBENCH.read_text())
    chosen = rows[16:24]  # 4 rows no row of their question marks correct, then 4 rows marked correct
    assert [r["final_answer_correct"] for r in chosen] == [False] * 4 + [True] * 4
    data = tmp_path / "processbench.json"
    data.write_text(json.dumps(chosen))
    store = tmp_path / "store"
    result = invoke("eval", "processbench", data, "--method", "tool", "--store", store, "--run", "pb")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "dropped 4 row(s): no_gold_answer ×4" in said
    query = said.split("list them: stepforge query ", 1)[1].split('"')[1]
    listed = invoke("query", query, "--store", store, "--run", "pb", "--format", "json")
    assert listed.exit_code == 0, listed.output
    reasons = [json.loads(line)["reason"] for line in listed.stdout.splitlines()]
    assert reasons == ["no_gold_answer"] * 4, "the printed query lists exactly the dropped rows"
    scored = invoke("query", "select count(*) n from eval_results", "--store", store, "--run", "pb", "--format", "json")
    assert json.loads(scored.stdout) == {"n": 4}, "every row is either scored or dropped"


def test_run_says_which_rows_it_dropped(prefect_harness, tmp_path: Path) -> None:
    from stepforge.stages.instruments.synthetic import make_problems

    source = tmp_path / "world.jsonl"
    good = [json.dumps(r) for r in make_problems(2, 3, seed=1)]
    nul = json.dumps({"question": "What is 1 + 1?\x00", "answer": "#### 2"})
    source.write_text("\n".join([good[0], "{not json", nul, good[1]]) + "\n")
    path = config(tmp_path, valid_config(
        tmp_path, ingest=f"{{source: {source}, format: gsm8k}}", labeller="none", verify="{sources: []}",
        rollout="{samples_per_problem: 1}",
    ))
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "dropped 2 row(s): control_characters ×1, invalid_json ×1" in said
    assert f"stepforge query --store {tmp_path / 'store'} --run t \"select reason, item, detail from rejects" in said


def test_a_plugin_that_does_not_import_is_one_line(tmp_path):
    path = config(tmp_path, valid_config(tmp_path, plugins="{no_such_module: {}}"))
    line = mistake(invoke("run", path))
    assert "no_such_module" in line and "cannot be imported" in line
    assert not (tmp_path / "store").exists(), "refused before any work"
