"""Content-addressed generation cache in SQLite (WAL): crash-safe, shared by concurrent processes.

Each sample is committed as soon as it is generated, so a run killed at any instant loses
at most the sample being generated; the re-run replays everything before it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

from stepforge.stages.llm.base import Generation


class GenerationCache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._con() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                "num_tokens INTEGER NOT NULL, finish_reason TEXT NOT NULL, logprobs TEXT, token_bytes TEXT)"
            )

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    def get(self, key: str) -> Generation | None:
        row = self._con().execute(
            "SELECT text, num_tokens, finish_reason, logprobs, token_bytes FROM generations WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        text, num_tokens, finish_reason, logprobs, token_bytes = row
        return Generation(
            text=text, num_tokens=num_tokens, finish_reason=finish_reason,
            logprobs=tuple(json.loads(logprobs)) if logprobs else None,
            token_bytes=tuple(json.loads(token_bytes)) if token_bytes else None, key=key, cached=True,
        )

    def put(self, key: str, generation: Generation) -> None:
        self._con().execute(
            "INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?, ?, ?)",
            (
                key, generation.text, generation.num_tokens, generation.finish_reason,
                json.dumps(generation.logprobs) if generation.logprobs is not None else None,
                json.dumps(generation.token_bytes) if generation.token_bytes is not None else None,
            ),
        )

    def __len__(self) -> int:
        return self._con().execute("SELECT count(*) FROM generations").fetchone()[0]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
