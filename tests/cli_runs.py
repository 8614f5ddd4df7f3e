"""Runs of the real command line in a subprocess, and a run's tables as comparable rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stepforge.flows.prefect_server import die_with_parent
from stepforge.schemas.records import TABLES
from stepforge.storage.catalog import Catalog


def start_run(config: Path, tmp: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``stepforge run CONFIG OPTIONS`` with its own Prefect home (its own temporary API) under ``tmp``."""
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)  # Prefect's temporary server does not start without it
    env = {**os.environ, "PREFECT_HOME": str(home), "NO_COLOR": "1", **(env or {})}
    # The run dies with the test process even when pytest-timeout ends it with os._exit (no teardown).
    return subprocess.Popen(
        [sys.executable, "-m", "stepforge.flows.cli", "run", str(config), *options],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp, preexec_fn=die_with_parent(),
    )


def finish(proc: subprocess.Popen, timeout: float = 1200) -> str:
    out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out


def run_cli(config: Path, tmp: Path, *options: str, env: dict[str, str] | None = None) -> str:
    return finish(start_run(config, tmp, *options, env=env))


def table_rows(store: Path) -> dict[str, list[str]]:
    """Every row of every table, as sorted JSON lines: two runs made the same data iff these are equal."""
    with Catalog(store) as catalog:
        catalog.refresh()
        return {
            table: sorted(json.dumps(r, sort_keys=True, default=str) for r in catalog.query(f"select * from {table}").to_pylist())
            for table in TABLES
        }
