"""The key figures of a run, computed with SQL over the DuckDB catalog.

``run_figures(store, run, shards)`` refreshes the catalog for one run (optionally only the given
shard keys, e.g. the chains of the current config) and returns a JSON-serialisable dict of plain
Python values in a fixed order, the same for the same store: label counts overall and per problem
source, evaluations per source and verdict, the mean Monte Carlo / judge value per step depth, how
often the evidence sources agree on a step, rejects per stage and reason, what the labels cost
(tokens from the run record's ``traffic``, seconds from the shard manifests) and rows per table.

A run with no rows in some table gives zeros and empty lists; a missing run record leaves
``cost`` and ``models`` empty. The report (``flows/report.py``), the Prefect artifacts
(``flows/artifacts.py``) and the dataset card all read this dict, never the catalog.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from stepforge.storage.catalog import Catalog
from stepforge.storage.shards import ShardStore

LABEL_VALUES = ("-1", "0", "1")
COUNTED_TABLES = ("problems", "rollouts", "nodes", "evaluations", "labels", "pairs", "rejects")
EVALUATION_SOURCES = ("mc", "mcts", "outcome", "tool", "judge", "human")
"""Every evaluation source the stages write, in the order figures list them."""
VALUE_SOURCES = ("mc", "mcts", "judge")
"""Sources whose ``value`` is a probability of reaching the answer (judge: the share of votes for correct)."""
AGREEMENT_SOURCES = ("mc", "mcts", "judge", "tool", "human")
"""Sources that give a step a verdict. Monte Carlo ones without a verdict vote +1 when any completion succeeded."""
CLIENTS = ("generation", "judge_generation", "writer_generation")


def _source_order(source: str) -> tuple[int, str]:
    known = EVALUATION_SOURCES.index(source) if source in EVALUATION_SOURCES else len(EVALUATION_SOURCES)
    return known, source


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 6) if denominator else None


def _number(value: float) -> int | float:
    """Counters are floats in the run record; whole ones read better as ints."""
    return int(value) if float(value).is_integer() else round(float(value), 6)


class _Figures:
    def __init__(self, catalog: Catalog, run: str, shards: Collection[str] | None):
        self.catalog = catalog
        self.run = run
        self.shards = None if shards is None else sorted(shards)

    def rows(self, sql: str, params: list | None = None) -> list[dict]:
        return self.catalog.query(sql, params).to_pylist()

    def counts(self) -> dict[str, int]:
        return {table: int(self.rows(f'SELECT count(*) AS n FROM "{table}"')[0]["n"]) for table in COUNTED_TABLES}

    def labels(self) -> dict[str, int]:
        counts = dict.fromkeys(LABEL_VALUES, 0)
        for row in self.rows("SELECT label, count(*) AS n FROM labels GROUP BY label"):
            counts[str(row["label"])] = int(row["n"])
        return counts

    def labels_by_source(self) -> dict[str, dict[str, int]]:
        # A problem is stored once per ingest shard that holds it; one source per problem_id.
        rows = self.rows(
            "SELECT coalesce(p.source, '(unknown)') AS source, l.label, count(*) AS n "
            "FROM labels l LEFT JOIN (SELECT problem_id, min(source) AS source FROM problems GROUP BY problem_id) p "
            "USING (problem_id) GROUP BY ALL ORDER BY source, l.label"
        )
        by_source: dict[str, dict[str, int]] = {}
        for row in rows:
            by_source.setdefault(row["source"], dict.fromkeys(LABEL_VALUES, 0))[str(row["label"])] = int(row["n"])
        return by_source

    def label_policies(self) -> list[str]:
        return [row["policy"] for row in self.rows("SELECT DISTINCT policy FROM labels ORDER BY policy")]

    def evaluations_by_source(self) -> dict[str, dict]:
        rows = self.rows(
            "SELECT source, coalesce(CAST(verdict AS VARCHAR), 'none') AS verdict, count(*) AS n "
            "FROM evaluations GROUP BY ALL"
        )
        by_source: dict[str, dict] = {}
        for row in sorted(rows, key=lambda r: _source_order(r["source"])):
            entry = by_source.setdefault(
                row["source"], {"rows": 0, "verdicts": dict.fromkeys((*LABEL_VALUES, "none"), 0)}
            )
            entry["rows"] += int(row["n"])
            entry["verdicts"][row["verdict"]] = entry["verdicts"].get(row["verdict"], 0) + int(row["n"])
        return by_source

    def value_by_depth(self) -> list[dict]:
        # Depth is a function of the node id (its hash covers the parent), so DISTINCT is exact.
        rows = self.rows(
            "SELECT e.source, n.depth, avg(e.value) AS mean_value, count(*) AS n "
            "FROM evaluations e JOIN (SELECT DISTINCT node_id, depth FROM nodes) n USING (node_id) "
            "WHERE list_contains(?, e.source) AND e.value IS NOT NULL GROUP BY ALL",
            [list(VALUE_SOURCES)],
        )
        rows.sort(key=lambda r: (VALUE_SOURCES.index(r["source"]), r["depth"]))
        return [
            {"source": r["source"], "depth": int(r["depth"]), "mean_value": round(float(r["mean_value"]), 6),
             "n": int(r["n"])}
            for r in rows
        ]

    def agreement(self) -> dict:
        """Per pair of sources, over the steps both judged: how often their verdicts have the same sign.

        A source's verdict on a step is the sign of the sum of its evaluations' verdicts (0 on a tie).
        """
        votes = (
            "SELECT node_id, source, CASE WHEN verdict IS NOT NULL THEN verdict "
            "WHEN source IN ('mc', 'mcts') AND value IS NOT NULL THEN CASE WHEN value > 0 THEN 1 ELSE -1 END END AS vote "
            "FROM evaluations WHERE list_contains(?, source)"
        )
        per_node = f"SELECT node_id, source, sign(sum(vote)) AS verdict FROM ({votes}) WHERE vote IS NOT NULL GROUP BY ALL"
        rows = self.rows(
            f"WITH per_node AS ({per_node}) "
            "SELECT a.source AS a, b.source AS b, count(*) AS nodes, count(*) FILTER (WHERE a.verdict = b.verdict) AS agree "
            "FROM per_node a JOIN per_node b ON a.node_id = b.node_id AND a.source <> b.source GROUP BY ALL",
            [list(AGREEMENT_SOURCES)],
        )
        judged = {
            r["source"]: int(r["nodes"])
            for r in self.rows(
                f"SELECT source, count(*) AS nodes FROM ({per_node}) GROUP BY source", [list(AGREEMENT_SOURCES)]
            )
        }
        sources = sorted(judged, key=AGREEMENT_SOURCES.index)
        both = {(r["a"], r["b"]): (int(r["nodes"]), int(r["agree"])) for r in rows}
        shared = lambda a, b: both.get((a, b), (0, 0))  # noqa: E731  (steps both judged, of which agreed)
        pairs = [
            {"a": a, "b": b, "nodes": shared(a, b)[0], "agree": shared(a, b)[1], "rate": _ratio(shared(a, b)[1], shared(a, b)[0])}
            for i, a in enumerate(sources) for b in sources[i + 1 :]
        ]
        # Symmetric; the diagonal holds how many steps each source judged, with no rate.
        rates = [[None if a == b else _ratio(shared(a, b)[1], shared(a, b)[0]) for b in sources] for a in sources]
        nodes = [[judged[a] if a == b else shared(a, b)[0] for b in sources] for a in sources]
        return {"pairs": pairs, "matrix": {"sources": sources, "rates": rates, "nodes": nodes}}

    def rejects(self) -> list[dict]:
        rows = self.rows("SELECT stage, reason, count(*) AS n FROM rejects GROUP BY ALL")
        rows.sort(key=lambda r: (-r["n"], r["stage"], r["reason"]))
        return [{"stage": r["stage"], "reason": r["reason"], "count": int(r["n"])} for r in rows]

    def rollouts(self) -> list[dict]:
        rows = self.rows(
            "SELECT origin, count(*) AS n, count(*) FILTER (WHERE outcome) AS correct FROM rollouts GROUP BY origin"
        )
        rows.sort(key=lambda r: (r["origin"] != "policy", r["origin"]))
        return [
            {"origin": r["origin"], "rollouts": int(r["n"]), "correct": int(r["correct"]),
             "solve_rate": _ratio(r["correct"], r["n"])}
            for r in rows
        ]

    def shard_seconds(self) -> dict[str, float]:
        selected = "" if self.shards is None else " AND list_contains(?, shard)"
        params = [self.run] + ([] if self.shards is None else [self.shards])
        rows = self.rows(
            "SELECT stage, sum(coalesce(TRY_CAST(json_extract(stats, '$.seconds') AS DOUBLE), 0)) AS seconds "
            f"FROM shards WHERE run = ?{selected} GROUP BY stage ORDER BY stage",
            params,
        )
        return {r["stage"]: round(float(r["seconds"]), 3) for r in rows}


def _run_record(store: str | Path, run: str) -> dict:
    path = ShardStore(store).root / "runs" / f"{run}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _cost(record: dict, seconds_by_stage: dict[str, float], labelled_steps: int) -> dict:
    if not record:
        return {}
    return traffic_cost(record.get("traffic") or {}, seconds_by_stage, labelled_steps)


def traffic_cost(traffic: dict, seconds_by_stage: dict[str, float], labelled_steps: int) -> dict:
    """Token, sample and time cost from a run's generation traffic (``flows.runtime.shard_traffic``)."""
    clients = {name: {k: _number(v) for k, v in sorted(traffic[name].items())} for name in CLIENTS if traffic.get(name)}
    total = lambda counter: _number(sum(c.get(counter, 0) for c in clients.values()))  # noqa: E731
    tokens, seconds = total("generated_tokens"), round(sum(seconds_by_stage.values()), 3)
    return {
        "traffic": clients,
        "generated_tokens": tokens,
        "samples": total("samples"),
        "generated": total("generated"),
        "cache_hits": total("cache_hits"),
        "cost_usd": total("cost_usd"),
        "seconds": seconds,
        "seconds_by_stage": seconds_by_stage,
        "labelled_steps": labelled_steps,
        "tokens_per_labelled_step": _ratio(tokens, labelled_steps),
        "seconds_per_labelled_step": _ratio(seconds, labelled_steps),
    }


def _models(record: dict) -> dict:
    config = record.get("config") or {}
    if not config:
        return {}
    policy = config.get("backend") or {}
    verify = config.get("verify") or {}
    # No judge backend of its own means the judge, if it runs, is the policy's model.
    judge = verify.get("judge_backend") or (policy if "judge" in (verify.get("sources") or []) else {})
    return {
        "policy": policy.get("model"), "policy_kind": policy.get("kind"),
        "judge": judge.get("model"), "judge_kind": judge.get("kind"),
    }


def run_figures(
    store: str | Path, run: str, shards: Collection[str] | None = None, traffic: dict | None = None
) -> dict:
    """The key figures of ``run`` in ``store``; ``shards`` limits them to those shard keys (None: all of the run's).

    ``traffic`` (``flows.runtime.shard_traffic``) prices the cost instead of the run record's, for a
    caller (the export's card) that runs before the record is written."""
    with Catalog(store) as catalog:
        catalog.refresh(run=run, shards=shards)
        figures = _Figures(catalog, run, shards)
        counts = figures.counts()
        result = {
            "run": run,
            "counts": counts,
            "labels": figures.labels(),
            "labels_by_source": figures.labels_by_source(),
            "label_policies": figures.label_policies(),
            "evaluations_by_source": figures.evaluations_by_source(),
            "value_by_depth": figures.value_by_depth(),
            "agreement": figures.agreement(),
            "rejects": figures.rejects(),
            "rollouts": figures.rollouts(),
        }
        seconds_by_stage = figures.shard_seconds()
    record = _run_record(store, run)
    if traffic is not None:
        result["cost"] = traffic_cost(traffic, seconds_by_stage, counts["labels"])
    else:
        result["cost"] = _cost(record, seconds_by_stage, counts["labels"])
    result["models"] = _models(record)
    return result
