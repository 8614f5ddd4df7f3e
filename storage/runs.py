"""Run records: ``<store>/runs/<run>.json``, what a run was last made with and what it produced.

The record holds the config, the status, the exported datasets, generation counts and the shard
key of every chain slot (what a later backfill compares with). Readers go through
``load_run_record``; slots are normalised to their current names here, once, so records written
before the slots were renamed read like new ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from stepforge.storage.shards import write_json_atomic

LEGACY_SLOTS = {"rollout": "rollouts", "label": "step_values", "verify": "verification",
                "consensus": "labels", "filter": "agent_steps"}
"""Chain slots of records written before the slots were named for what they hold."""


class UnknownRunError(FileNotFoundError):
    """No record of the run in the store."""


def run_record_path(store: str | Path, run: str) -> Path:
    return Path(store) / "runs" / f"{run}.json"


def load_run_record(store: str | Path, run: str) -> dict:
    """A run's record; ``UnknownRunError`` naming the run and the runs the store has when there is none."""
    path = run_record_path(store, run)
    if not path.exists():
        known = sorted(p.stem for p in (Path(store) / "runs").glob("*.json"))
        hint = f"; runs there: {', '.join(known)}" if known else "; it has no runs"
        raise UnknownRunError(f"no run {run!r} in store {store}{hint}")
    record = json.loads(path.read_text())
    record["chains"] = {
        shard: {LEGACY_SLOTS.get(slot, slot): key for slot, key in slots.items()}
        for shard, slots in (record.get("chains") or {}).items()
    }
    return record


def write_run_record(store: str | Path, run: str, record: dict) -> None:
    write_json_atomic(run_record_path(store, run), record)
