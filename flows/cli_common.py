"""What the CLI's command modules share: the console, Prefect's quiet settings, the common options,
and the one line that says how many input rows a command dropped."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

console = Console()
STORE_OPTION = typer.Option(Path("stepforge-data"), help="Store root.")
RUN_ARGUMENT = typer.Argument(..., metavar="RUN", help="The run under review.")


def quiet_prefect(verbose: bool) -> None:
    # Prefect reads its settings at import: set before the flow module is imported.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network to send it to
    # The ephemeral API's default 20 s start-up limit is too short for a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def say_dropped(reasons: dict[str, int], store: Path, run_name: str, stage: str = "ingest") -> None:
    """How many input rows a command dropped and why, and the query that lists them: a count that
    silently shrinks (16 rows read, 4 scored) reads as a result, not as a warning."""
    total = sum(reasons.values())
    if not total:
        return
    counts = ", ".join(f"{reason} ×{n}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    sql = f"select reason, item, detail from rejects where stage = '{stage}' order by reason, item"
    console.print(
        f"dropped {total} row(s): {counts}; list them: stepforge query --store {store} --run {run_name} \"{sql}\"",
        style="yellow", markup=False, highlight=False, soft_wrap=True,  # soft_wrap: the query stays copyable
    )
