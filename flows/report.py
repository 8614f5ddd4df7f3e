"""The run report: one self-contained static HTML page drawn from a run's key figures.

``render_report(figures, title)`` turns the dict of ``flows/figures.run_figures`` into a page
with the key numbers as tiles on top and inline SVG charts below: labels per problem source,
the mean Monte Carlo / judge value along the solution, how often the evidence sources agree,
evaluations per source, rejects by reason, and what a labelled step cost. Everything is inline
(CSS here, SVG drawn in ``flows/report_charts.py``, system fonts), so the file opens offline, from
an archive or an email, and never fetches anything. Every text from the data is HTML-escaped. A
chart with nothing to draw says so instead of leaving a blank box.

``write_report(store, run)`` computes the figures and writes ``<store>/reports/<run>.html``.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from stepforge.flows.figures import run_figures
from stepforge.flows.report_charts import (
    CHARTS,
    escape,
    format_count,
    format_duration,
    format_number,
    format_percent,
)
from stepforge.storage.shards import ShardStore

PLOTS = ("labels-by-source", "value-by-depth", "agreement", "cost", "evaluations-by-source", "rejects")
"""Each chart's name: its element is ``id="plot-<name>"`` with ``data-plot="<name>"``."""


# -- the page ----------------------------------------------------------------------------
def _tiles(figures: dict) -> str:
    counts = figures.get("counts") or {}
    labels = figures.get("labels") or {}
    cost = figures.get("cost") or {}
    policy = next((r for r in figures.get("rollouts") or [] if r["origin"] == "policy"), None)
    labelled = sum(labels.values())
    tiles = [
        ("Problems", format_number(counts.get("problems", 0)), f"{policy['rollouts']:,} policy rollouts" if policy else ""),
        ("Policy solve rate", format_percent(policy["solve_rate"]) if policy else "—",
         f"{policy['correct']:,} of {policy['rollouts']:,} rollouts" if policy else "no policy rollouts"),
        ("Labelled steps", format_number(labelled), f"of {counts.get('nodes', 0):,} steps; {counts.get('evaluations', 0):,} evaluations"),
        ("Labelled +1", format_percent(labels.get("1", 0) / labelled if labelled else None),
         f"{labels.get('-1', 0):,} labelled −1"),
        ("Pairs", format_number(counts.get("pairs", 0)), ""),
        ("Rejects", format_number(counts.get("rejects", 0)), f"{len(figures.get('rejects') or [])} reasons"),
        ("Tokens / labelled step", format_number(cost.get("tokens_per_labelled_step")),
         f"{format_count(cost['generated_tokens'])} tokens" if cost else "no run record"),
        ("Time / labelled step", format_duration(cost.get("seconds_per_labelled_step")),
         f"{format_duration(cost['seconds'])} in shards" if cost else "no run record"),
    ]
    return "".join(
        f'<div class="tile"><div class="tile-name">{escape(name)}</div><div class="tile-value">{escape(value)}</div>'
        f'<div class="tile-note">{escape(note)}</div></div>'
        for name, value, note in tiles
    )


def _subtitle(figures: dict) -> str:
    models = figures.get("models") or {}
    parts = [f'run <b>{escape(figures.get("run", ""))}</b>']
    if models.get("policy_kind") == "synthetic":
        parts.append("policy <b>synthetic world</b>")
    elif models.get("policy"):
        parts.append(f'policy <b>{escape(models["policy"])}</b> ({escape(models.get("policy_kind") or "?")})')
    if models.get("judge"):
        parts.append(f'judge <b>{escape(models["judge"])}</b>')
    chips = "".join(f'<span class="chip">{escape(p)}</span>' for p in figures.get("label_policies") or [])
    return " · ".join(parts) + (f' · label policy {chips}' if chips else "")


def _card(name: str, figures: dict) -> str:
    heading, caption, draw, empty = CHARTS[name]
    content = draw(figures)
    wide = " wide" if name in ("value-by-depth", "labels-by-source") else ""
    inner = content if content is not None else f'<p class="no-data">{escape(empty)}</p>'
    return (
        f'<section class="card{wide}" id="plot-{name}" data-plot="{name}" data-empty="{str(content is None).lower()}">'
        f'<h2>{escape(heading)}</h2><p class="caption">{escape(caption)}</p>{inner}</section>'
    )


STYLE = """
*{box-sizing:border-box}
body{margin:0;background:#f4f6f9;color:#1f2937;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,"DejaVu Sans",sans-serif;-webkit-font-smoothing:antialiased}
main{max-width:1240px;margin:0 auto;padding:32px 28px 48px}
header h1{margin:0 0 4px;font-size:28px;letter-spacing:-.02em}
header p{margin:0;color:#4b5563}
.chip{display:inline-block;padding:1px 8px;margin:0 2px;border-radius:999px;background:#e8edf5;font-size:13px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px;margin:26px 0 30px}
.tile{background:#fff;border-radius:12px;padding:14px 16px;box-shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.1)}
.tile-name{font-size:12px;text-transform:uppercase;letter-spacing:.06em;color:#6b7280}
.tile-value{font-size:30px;font-weight:700;letter-spacing:-.02em;font-variant-numeric:tabular-nums}
.tile-note{font-size:12px;color:#6b7280;min-height:18px}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:20px}
.card{background:#fff;border-radius:14px;padding:20px 22px;box-shadow:0 1px 2px rgba(16,24,40,.06),0 1px 3px rgba(16,24,40,.1)}
.card.wide{grid-column:1/-1}
.card h2{margin:0;font-size:18px}
.card h3{margin:16px 0 4px;font-size:13px;color:#4b5563;font-weight:600}
.caption{margin:2px 0 12px;color:#6b7280;font-size:13px}
.card svg{display:block;max-width:100%;height:auto;overflow:visible;font-variant-numeric:tabular-nums}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin:4px 0 10px;font-size:13px;color:#374151}
.key{display:inline-flex;align-items:center;gap:6px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px}
.no-data{margin:18px 0 6px;padding:22px;border:1px dashed #cbd2dc;border-radius:10px;text-align:center;color:#6b7280}
.numbers{display:flex;flex-wrap:wrap;gap:14px 34px;margin:6px 0 4px}
.numbers div{display:flex;flex-direction:column}
.big{font-size:28px;font-weight:700;font-variant-numeric:tabular-nums;letter-spacing:-.02em}
.unit{font-size:12px;color:#6b7280}
footer{margin-top:28px;color:#9ca3af;font-size:12px}
@media (max-width:860px){.grid{grid-template-columns:1fr}}
"""


def render_report(figures: dict, title: str) -> str:
    """One self-contained HTML page: key numbers as tiles, then every chart in ``PLOTS``."""
    cards = "".join(_card(name, figures) for name in PLOTS)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>"
        f"<header><h1>{escape(title)}</h1><p>{_subtitle(figures)}</p></header>"
        f'<div class="tiles">{_tiles(figures)}</div><div class="grid">{cards}</div>'
        "<footer>Drawn by stepforge from the run's DuckDB catalog and run record; "
        "query the numbers with <code>stepforge query</code>.</footer>"
        "</main></body></html>\n"
    )


def write_report(store: str | Path, run: str, out: Path | None = None, shards: Collection[str] | None = None) -> Path:
    """Compute ``run``'s figures and write its report (default ``<store>/reports/<run>.html``)."""
    figures = run_figures(store, run, shards)
    path = Path(out) if out is not None else ShardStore(store).root / "reports" / f"{run}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(render_report(figures, f"stepforge · {run}"), encoding="utf-8")
    os.replace(partial, path)  # a browser that has the report open never sees half a page
    return path
