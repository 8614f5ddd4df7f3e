"""The CLI's own behaviour: progress without a terminal, SQL errors, exporting an unknown run."""

from __future__ import annotations

import io

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
    assert result.exit_code == 1
    assert "query failed" in result.output and "nope" in result.output


def test_exporting_an_unknown_run_says_so(tmp_path):
    result = CliRunner().invoke(app, ["export", "--store", str(tmp_path), "--run", "missing"])
    assert result.exit_code == 1
    assert "no run 'missing'" in result.output
