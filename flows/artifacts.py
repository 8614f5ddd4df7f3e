"""A run's key figures as Prefect artifacts, so the Prefect UI shows what a flow run produced.

``publish_artifacts(figures, run)`` creates, inside a flow or task run, one markdown artifact
(the key numbers: problems, solve rate, labels, evaluations, agreement, rejects, cost, models)
and two table artifacts (labels per problem source, rejects per stage and reason), and returns
their keys. Keys are ``<run>-summary``, ``<run>-labels-by-source`` and ``<run>-rejects`` with the
run name reduced to Prefect's key alphabet (lowercase letters, digits, dashes); a name that had
to be changed gets a short hash of the original, so two runs never share a key.

Outside a flow or task run it creates nothing and returns ``[]``: Prefect 3.8 still accepts
artifacts there but warns that this is deprecated, and without a configured API it would start
a temporary server just to store them where no flow run links to them.
"""

from __future__ import annotations

import html
import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext

from stepforge.schemas.ids import content_hash

MAX_KEY_PREFIX = 60


def artifact_key_prefix(run: str) -> str:
    """``run`` in Prefect's artifact key alphabet, unique per run name."""
    slug = re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-")[:MAX_KEY_PREFIX].strip("-") or "run"
    return slug if slug == run else f"{slug}-{content_hash('artifact-key', run)[:6]}"


def _md(value: object) -> str:
    """Text from the data inside a markdown table cell: no markup, no cell breaks."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def _rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate * 100:.1f}%"


def _figure(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if float(value).is_integer() else f"{value:.{digits}g}"


def summary_markdown(figures: dict, run: str) -> str:
    """The key numbers of a run as a markdown page."""
    counts, labels, cost, models = figures["counts"], figures["labels"], figures.get("cost") or {}, figures.get("models") or {}
    policy = next((r for r in figures.get("rollouts") or [] if r["origin"] == "policy"), None)
    labelled = sum(labels.values())
    rows = [
        ("Problems", f"{counts['problems']:,}"),
        ("Policy solve rate",
         f"{_rate(policy['solve_rate'])} ({policy['correct']:,} of {policy['rollouts']:,} rollouts)" if policy else "—"),
        ("Labelled steps", f"{labelled:,} (+1: {labels['1']:,}, 0: {labels['0']:,}, −1: {labels['-1']:,})"),
        ("Label policies", ", ".join(figures.get("label_policies") or []) or "—"),
        ("Evaluations",
         ", ".join(f"{s} {e['rows']:,}" for s, e in (figures.get("evaluations_by_source") or {}).items()) or "—"),
        ("Pairs", f"{counts['pairs']:,}"),
        ("Rejects", f"{counts['rejects']:,}"),
        ("Generated tokens", _figure(cost.get("generated_tokens"))),
        ("Tokens per labelled step", _figure(cost.get("tokens_per_labelled_step"))),
        ("Seconds per labelled step", _figure(cost.get("seconds_per_labelled_step"))),
        ("Policy model", f"{models.get('policy')} ({models.get('policy_kind')})" if models.get("policy") else "—"),
        ("Judge model", models.get("judge") or "—"),
    ]
    lines = [f"# stepforge run {_md(run)}", "", "| figure | value |", "|---|---|"]
    lines += [f"| {name} | {_md(value)} |" for name, value in rows]
    if pairs := (figures.get("agreement") or {}).get("pairs"):
        lines += ["", "## Agreement between evidence sources", "", "| sources | steps both judged | agree | rate |", "|---|---:|---:|---:|"]
        lines += [f"| {_md(p['a'])} – {_md(p['b'])} | {p['nodes']:,} | {p['agree']:,} | {_rate(p['rate'])} |" for p in pairs]
    if rejects := figures.get("rejects"):
        lines += ["", "## Most frequent rejects", "", "| stage | reason | rows |", "|---|---|---:|"]
        lines += [f"| {_md(r['stage'])} | {_md(r['reason'])} | {r['count']:,} |" for r in rejects[:10]]
    return "\n".join(lines) + "\n"


def labels_table(figures: dict) -> list[dict]:
    return [
        {"problem source": source, "+1": counts["1"], "0": counts["0"], "-1": counts["-1"], "labelled steps": sum(counts.values())}
        for source, counts in (figures.get("labels_by_source") or {}).items()
    ]


def rejects_table(figures: dict) -> list[dict]:
    return [{"stage": r["stage"], "reason": r["reason"], "rows": r["count"]} for r in figures.get("rejects") or []]


def publish_artifacts(figures: dict, run: str) -> list[str]:
    """Attach the run's key figures to the current Prefect flow run; the artifact keys, ``[]`` outside a run."""
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return []
    prefix = artifact_key_prefix(run)
    keys = [f"{prefix}-summary", f"{prefix}-labels-by-source", f"{prefix}-rejects"]
    # _sync: this function is synchronous, so inside an async flow too it must create, not return a coroutine.
    create_markdown_artifact(
        summary_markdown(figures, run), key=keys[0], description=f"Key figures of stepforge run {run}", _sync=True
    )
    create_table_artifact(
        labels_table(figures), key=keys[1], description=f"Step labels per problem source, run {run}", _sync=True
    )
    create_table_artifact(
        rejects_table(figures), key=keys[2], description=f"Rejected rows per stage and reason, run {run}", _sync=True
    )
    return keys
