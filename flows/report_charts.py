"""The report's charts: inline SVG drawn here from the figures of ``flows/figures.run_figures``.

Each chart is a function of the figures dict that returns its HTML (a legend and an ``<svg>``), or
``None`` when it has nothing to draw; :data:`CHARTS` gives each its heading, caption and the note
shown instead. The SVG is written by hand (no plotting library, no script), so the page that holds
it stays one self-contained file. Every text from the data is HTML-escaped (:func:`escape`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

LABEL_COLOURS = {"-1": "#d64550", "0": "#f0b429", "1": "#27a37a"}
VERDICT_COLOURS = {**LABEL_COLOURS, "none": "#9aa5b8"}
SOURCE_COLOURS = {"mc": "#3d6fe0", "mcts": "#8b5cf6", "judge": "#e8792b"}
HEAT_COLOURS = ("#e3f4f4", "#b9e4e6", "#8dd0d5", "#5fb7c1", "#3799a8", "#1d7a8c")
"""Agreement rate bins, 0 … 1 in sixths; few enough that a cell's shade can be read against the legend."""
DIAGONAL_COLOUR = "#eef1f5"
REJECT_COLOUR = "#c0467e"
TOKENS_COLOUR = "#6d5bd0"
SECONDS_COLOUR = "#2b9fd9"

SIGNATURE_COLOURS = {
    "labels-by-source": (LABEL_COLOURS["-1"], LABEL_COLOURS["1"]),
    "value-by-depth": tuple(SOURCE_COLOURS.values()),
    "agreement": HEAT_COLOURS,
    "evaluations-by-source": (VERDICT_COLOURS["none"],),
    "rejects": (REJECT_COLOUR,),
    "cost": (TOKENS_COLOUR, SECONDS_COLOUR),
}
"""The fill colours only that chart uses: a screenshot shows the chart was drawn if they show up."""

LABEL_NAMES = {"-1": "−1 wrong", "0": "0 neutral", "1": "+1 right"}
VERDICT_NAMES = {**LABEL_NAMES, "none": "no verdict"}
INK, MUTED, GRID = "#1f2937", "#6b7280", "#e5e7eb"
WIDE, HALF = 1130, 530
"""Chart widths in CSS pixels that fit a full-width and a half-width card at the page's widest; a narrower
window scales them down."""


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def format_count(value: float | int) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else format_number(value)


def format_number(value: float | int | None) -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if float(value).is_integer() and magnitude < 1e15:
        return f"{int(value):,}"
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_percent(rate: float | None) -> str:
    if rate is None:
        return "—"
    return f"{rate * 100:.1f}%" if 0 < rate < 0.1 else f"{rate * 100:.0f}%"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _shorten(text: str, limit: int) -> str:
    """Keep a long label's end: of a file path, the file name and its folder say the most."""
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


# -- SVG primitives ----------------------------------------------------------------------
def _svg(width: int, height: int, body: Sequence[str], label: str) -> str:
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{escape(label)}" '
        f'preserveAspectRatio="xMinYMin meet">{"".join(body)}</svg>'
    )


def _text(x: float, y: float, content: str, *, anchor: str = "start", size: int = 12, colour: str = INK,
          weight: str = "normal", title: str | None = None) -> str:
    tooltip = f"<title>{escape(title)}</title>" if title and title != content else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{colour}" '
        f'font-weight="{weight}">{tooltip}{escape(content)}</text>'
    )


def _rect(x: float, y: float, width: float, height: float, colour: str, title: str, radius: float = 0) -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(width, 0):.1f}" height="{height:.1f}" rx="{radius}" '
        f'fill="{colour}"><title>{escape(title)}</title></rect>'
    )


def _legend(entries: Sequence[tuple[str, str]]) -> str:
    items = "".join(
        f'<span class="key"><span class="swatch" style="background:{colour}"></span>{escape(name)}</span>'
        for name, colour in entries
    )
    return f'<div class="legend">{items}</div>'


def _stacked_bars(
    rows: Sequence[tuple[str, Sequence[tuple[float, str, str]], str]],
    label: str,
    *,
    wide: bool = False,
    inside: Callable[[float], str] = lambda value: format_count(value),
) -> str:
    """Horizontal bars, one per row ``(name, segments of (value, colour, tooltip), note at the end)``,
    on a common scale so rows compare by length; ``inside`` writes a segment's value into it."""
    name_width, note_width, row_height = (300, 130, 30) if wide else (215, 75, 28)
    bar_width = (WIDE if wide else HALF) - name_width - note_width
    width = name_width + bar_width + note_width
    longest = max((sum(v for v, _, _ in segments) for _, segments, _ in rows), default=0) or 1
    body = []
    for i, (name, segments, note) in enumerate(rows):
        y = 8 + i * row_height
        body.append(_text(name_width - 10, y + 15, _shorten(name, 44 if wide else 33), anchor="end", title=name))
        x = float(name_width)
        for value, colour, tooltip in segments:
            if value <= 0:
                continue
            length = value / longest * bar_width
            body.append(_rect(x, y + 2, length, row_height - 10, colour, tooltip))
            if length >= 40:  # the value inside the bar when it fits, otherwise in the tooltip only
                body.append(
                    _text(x + length / 2, y + 15, inside(value), anchor="middle", size=11, colour="#ffffff", weight="600")
                )
            x += length
        body.append(_text(x + 8, y + 16, note, size=11, colour=MUTED))
    return _svg(width, 8 + len(rows) * row_height, body, label)


# -- charts ------------------------------------------------------------------------------
def _labels_by_source(figures: dict) -> str | None:
    by_source = figures.get("labels_by_source") or {}
    if not any(sum(counts.values()) for counts in by_source.values()):
        return None
    rows = []
    for source, counts in by_source.items():
        total = sum(counts.values())
        segments = [
            (counts.get(v, 0), LABEL_COLOURS[v], f"{source}: {counts.get(v, 0):,} labelled {LABEL_NAMES[v]}")
            for v in ("1", "0", "-1")
        ]
        rows.append((source, segments, f"{total:,} · {format_percent(counts.get('1', 0) / total if total else None)} +1"))
    legend = _legend([(LABEL_NAMES[v], LABEL_COLOURS[v]) for v in ("1", "0", "-1")])
    return legend + _stacked_bars(rows, "Step labels per problem source", wide=True)


def _value_by_depth(figures: dict) -> str | None:
    points = figures.get("value_by_depth") or []
    if not points:
        return None
    width, height = WIDE, 300
    left, right, top, bottom = 52, 20, 14, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    depths = sorted({p["depth"] for p in points})
    low, high = depths[0], depths[-1]
    x_of = (lambda d: left + plot_w / 2) if low == high else (lambda d: left + (d - low) / (high - low) * plot_w)
    y_of = lambda v: top + (1 - min(max(v, 0.0), 1.0)) * plot_h  # noqa: E731
    body = []
    for tick in (0, 0.25, 0.5, 0.75, 1):
        y = y_of(tick)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{GRID}" stroke-width="1"/>')
        body.append(_text(left - 8, y + 4, f"{tick:.2g}", anchor="end", size=11, colour=MUTED))
    step = max(1, math.ceil(len(range(low, high + 1)) / 16))
    for depth in range(low, high + 1, step):
        body.append(_text(x_of(depth), height - bottom + 18, str(depth), anchor="middle", size=11, colour=MUTED))
    body.append(_text(left + plot_w / 2, height - 6, "step depth (1 = first step)", anchor="middle", size=11, colour=MUTED))
    sources = [s for s in SOURCE_COLOURS if any(p["source"] == s for p in points)]
    for source in sources:
        colour = SOURCE_COLOURS[source]
        line = [p for p in points if p["source"] == source]
        if len(line) > 1:
            path = " ".join(f"{x_of(p['depth']):.1f},{y_of(p['mean_value']):.1f}" for p in line)
            body.append(
                f'<path d="M{path}" fill="none" stroke="{colour}" stroke-width="3" '
                'stroke-linejoin="round" stroke-linecap="round"/>'
            )
        for p in line:
            tooltip = f"{source}, depth {p['depth']}: mean value {p['mean_value']:.3f} over {p['n']:,} evaluations"
            body.append(
                f'<circle cx="{x_of(p["depth"]):.1f}" cy="{y_of(p["mean_value"]):.1f}" r="5" fill="{colour}" '
                f'stroke="#ffffff" stroke-width="1.5"><title>{escape(tooltip)}</title></circle>'
            )
    legend = _legend([(source, SOURCE_COLOURS[source]) for source in sources])
    return legend + _svg(width, height, body, "Mean evaluation value per step depth")


def _heat_colour(rate: float) -> str:
    return HEAT_COLOURS[min(len(HEAT_COLOURS) - 1, int(rate * len(HEAT_COLOURS)))]


def _agreement(figures: dict) -> str | None:
    matrix = (figures.get("agreement") or {}).get("matrix") or {}
    sources, rates, nodes = matrix.get("sources") or [], matrix.get("rates") or [], matrix.get("nodes") or []
    if not any(n for i, row in enumerate(nodes) for j, n in enumerate(row) if i != j):
        return None
    cell, left, top = 96, 80, 30
    size = len(sources)
    body = []
    for j, source in enumerate(sources):
        body.append(_text(left + j * cell + cell / 2, top - 10, source, anchor="middle", weight="600"))
    for i, source in enumerate(sources):
        y = top + i * cell
        body.append(_text(left - 10, y + cell / 2 + 4, source, anchor="end", weight="600"))
        for j, other in enumerate(sources):
            x = left + j * cell
            if i == j:
                body.append(_rect(x + 2, y + 2, cell - 4, cell - 4, DIAGONAL_COLOUR, f"{source} judged {nodes[i][j]:,} steps", 6))
                body.append(_text(x + cell / 2, y + cell / 2 - 2, f"{nodes[i][j]:,}", anchor="middle", size=13, colour=MUTED))
                body.append(_text(x + cell / 2, y + cell / 2 + 15, "steps", anchor="middle", size=10, colour=MUTED))
                continue
            rate, shared = rates[i][j], nodes[i][j]
            if rate is None:
                body.append(_rect(x + 2, y + 2, cell - 4, cell - 4, "#ffffff", f"{source} and {other} share no step", 6))
                body.append(_text(x + cell / 2, y + cell / 2 + 4, "no shared steps", anchor="middle", size=10, colour=MUTED))
                continue
            colour = _heat_colour(rate)
            ink = "#ffffff" if HEAT_COLOURS.index(colour) >= 3 else INK
            tooltip = f"{source} and {other} agree on {format_percent(rate)} of the {shared:,} steps both judged"
            body.append(_rect(x + 2, y + 2, cell - 4, cell - 4, colour, tooltip, 6))
            body.append(_text(x + cell / 2, y + cell / 2 + 2, format_percent(rate), anchor="middle", size=20, colour=ink, weight="700"))
            body.append(_text(x + cell / 2, y + cell / 2 + 22, f"n = {shared:,}", anchor="middle", size=11, colour=ink))
    scale = [(f"{k * 100 // len(HEAT_COLOURS)}–{(k + 1) * 100 // len(HEAT_COLOURS)}%", c) for k, c in enumerate(HEAT_COLOURS)]
    width = left + size * cell + 10
    return _svg(width, top + size * cell + 6, body, "Agreement between evidence sources") + _legend(scale)


def _evaluations_by_source(figures: dict) -> str | None:
    by_source = figures.get("evaluations_by_source") or {}
    if not by_source:
        return None
    rows = []
    for source, entry in by_source.items():
        verdicts = entry["verdicts"]
        segments = [
            (verdicts.get(v, 0), VERDICT_COLOURS[v], f"{source}: {verdicts.get(v, 0):,} with verdict {VERDICT_NAMES[v]}")
            for v in ("1", "0", "-1", "none")
        ]
        rows.append((source, segments, f"{entry['rows']:,} rows"))
    legend = _legend([(VERDICT_NAMES[v], VERDICT_COLOURS[v]) for v in ("1", "0", "-1", "none")])
    return legend + _stacked_bars(rows, "Evaluations per source and verdict")


def _rejects(figures: dict) -> str | None:
    rejects = figures.get("rejects") or []
    if not rejects:
        return None
    rows = [
        (f"{r['stage']} · {r['reason']}",
         [(r["count"], REJECT_COLOUR, f"{r['stage']}: {r['count']:,} × {r['reason']}")], f"{r['count']:,}")
        for r in rejects
    ]
    return _stacked_bars(rows, "Rejected rows per stage and reason")


def _cost(figures: dict) -> str | None:
    cost = figures.get("cost") or {}
    if not cost:
        return None
    numbers = (
        f'<div class="numbers">'
        f'<div><span class="big" style="color:{TOKENS_COLOUR}">{escape(format_number(cost.get("tokens_per_labelled_step")))}</span>'
        f'<span class="unit">generated tokens per labelled step</span></div>'
        f'<div><span class="big" style="color:{SECONDS_COLOUR}">{escape(format_duration(cost.get("seconds_per_labelled_step")))}</span>'
        f'<span class="unit">shard time per labelled step</span></div>'
        f'<div><span class="big">{escape(format_number(cost.get("labelled_steps")))}</span><span class="unit">labelled steps</span></div>'
        + (f'<div><span class="big">${escape(format_number(cost["cost_usd"]))}</span><span class="unit">API cost</span></div>'
           if cost.get("cost_usd") else "")
        + "</div>"
    )
    rows = [
        (client.replace("_", " "), [(counts.get("generated_tokens", 0), TOKENS_COLOUR,
                                      f"{client}: {counts.get('generated_tokens', 0):,} generated tokens")],
         f"{format_count(counts.get('generated_tokens', 0))} tokens")
        for client, counts in (cost.get("traffic") or {}).items()
    ]
    charts = ""
    if any(segments[0][0] for _, segments, _ in rows):
        charts += '<h3>Generated tokens by client</h3>' + _stacked_bars(rows, "Generated tokens per client")
    stages = [(stage, s) for stage, s in (cost.get("seconds_by_stage") or {}).items() if s > 0]
    if stages:
        charts += '<h3>Shard time by stage</h3>' + _stacked_bars(
            [(stage, [(s, SECONDS_COLOUR, f"{stage}: {format_duration(s)} in its shards")], format_duration(s))
             for stage, s in sorted(stages, key=lambda item: -item[1])],
            "Seconds per stage",
            inside=format_duration,
        )
    return numbers + charts


CHARTS = {
    "labels-by-source": (
        "Labels per problem source",
        "How many labelled steps each source produced, split by label; the note gives the share labelled +1.",
        _labels_by_source, "No labels in this run yet.",
    ),
    "value-by-depth": (
        "Value along the solution",
        "Mean Monte Carlo (mc, mcts) and judge value of the steps at each depth: how the chance of reaching the "
        "right answer falls as a solution goes on.",
        _value_by_depth, "No Monte Carlo or judge values to plot.",
    ),
    "agreement": (
        "Do the evidence sources agree?",
        "Share of the steps judged by both sources on which their verdicts have the same sign (mc without a "
        "verdict: +1 if any completion reached the answer). The diagonal counts the steps each source judged.",
        _agreement, "Agreement needs two evidence sources judging the same steps.",
    ),
    "evaluations-by-source": (
        "Evaluations per source",
        "Rows of evidence each source wrote, split by verdict.",
        _evaluations_by_source, "No evaluations in this run yet.",
    ),
    "rejects": (
        "Rejects by reason",
        "Rows a stage could not use, most frequent first.",
        _rejects, "No rejects: every row was usable.",
    ),
    "cost": (
        "Cost per labelled step",
        "Generated tokens (policy and judge) and shard time, divided by the number of labelled steps.",
        _cost, "No run record, so the cost is unknown.",
    ),
}
