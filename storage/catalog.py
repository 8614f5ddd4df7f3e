"""The DuckDB catalog: runs, the shard manifest, and one view per table over complete shards.

The filesystem (markers) is the source of truth; the catalog is rebuilt from it by
``refresh()``, which is cheap and idempotent. That keeps workers free of a single-writer
database: they only write shards and markers, and whoever wants SQL refreshes the catalog.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from stepforge.schemas.records import RECORD_TYPES, TABLES
from stepforge.storage.shards import ShardStore

CATALOG_FILE = "catalog.duckdb"


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Catalog:
    """SQL over a store. Opens ``<root>/catalog.duckdb``; if another process holds it, an in-memory copy."""

    def __init__(self, root: str | Path, *, read_only: bool = False):
        self.store = ShardStore(root)
        self.path = self.store.root / CATALOG_FILE
        self.store.root.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only and self.path.exists())
            self.in_memory = False
        except duckdb.IOException:  # locked by a writer elsewhere: views are rebuilt in memory
            self.con = duckdb.connect(":memory:")
            self.in_memory = True
        self._writable = not (read_only and self.path.exists()) or self.in_memory

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self, run: str | None = None, shards: Collection[str] | None = None) -> None:
        """Rebuild ``runs``, ``shards`` and the table views from the completion markers.

        With ``run`` the table views show that run only; with ``shards`` only those shard keys
        (e.g. the chains of the current config, leaving out what an earlier config left behind).
        """
        if not self._writable:
            self.con.close()
            self.con = duckdb.connect(":memory:")
            self.in_memory = self._writable = True
        manifests = self.store.manifests()
        con = self.con
        con.execute("BEGIN")
        try:
            self._fill(manifests, run, shards)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def _fill(self, manifests, run: str | None, shards: Collection[str] | None) -> None:
        con = self.con
        con.execute(
            "CREATE OR REPLACE TABLE shards (run VARCHAR, stage VARCHAR, shard VARCHAR, "
            "tables JSON, inputs VARCHAR[], stats JSON, created_at DOUBLE)"
        )
        if manifests:
            con.executemany(
                "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (m.run, m.stage, m.shard, json.dumps(m.tables), m.inputs, json.dumps(m.stats), m.created_at)
                    for m in manifests
                ],
            )
        con.execute(
            "CREATE OR REPLACE TABLE runs (run VARCHAR, created_at DOUBLE, status VARCHAR, config JSON, exports JSON)"
        )
        for path in sorted((self.store.root / "runs").glob("*.json")):
            info = json.loads(path.read_text())
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                (
                    info["run"], info.get("created_at"), info.get("status"),
                    json.dumps(info.get("config", {})), json.dumps(info.get("exports", [])),
                ),
            )
        for table in TABLES:
            files = [
                str(self.store.root / m.tables[table]["path"])
                for m in manifests
                if table in m.tables and m.tables[table]["rows"] > 0
                and (run is None or m.run == run)
                and (shards is None or m.shard in shards)
            ]
            self._create_view(table, files)

    def _create_view(self, table: str, files: Sequence[str]) -> None:
        if files:
            listing = "[" + ", ".join(_sql_str(f) for f in files) + "]"
            self.con.execute(
                f'CREATE OR REPLACE VIEW "{table}" AS SELECT * EXCLUDE ("table") '
                f"FROM read_parquet({listing}, hive_partitioning = true)"
            )
            return
        # No rows yet: an empty view with the table's real columns, so queries still bind.
        empty = RECORD_TYPES[table].ARROW_SCHEMA.empty_table()
        empty = empty.append_column("run", pa.array([], pa.string())).append_column("stage", pa.array([], pa.string()))
        self.con.register("_stepforge_empty", empty)
        self.con.execute(f'CREATE OR REPLACE TABLE "_empty_{table}" AS SELECT * FROM _stepforge_empty')
        self.con.unregister("_stepforge_empty")
        self.con.execute(f'CREATE OR REPLACE VIEW "{table}" AS SELECT * FROM "_empty_{table}"')

    def query(self, sql: str, params: Sequence | None = None) -> pa.Table:
        return self.con.sql(sql, params=params).to_arrow_table()
