"""The run report: key figures over the DuckDB catalog, the static HTML page, and Prefect artifacts.

A small real run on the synthetic world (seconds, no model): 6 problems in two shards, Monte Carlo
labels, tool checks, a few ingest rejects, and a second consensus policy over the same evidence, so
the figures can be checked against direct queries, the shard restriction against a second chain,
and the page against a real headless Chromium.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from stepforge.flows import runtime
from stepforge.flows.artifacts import artifact_key_prefix, publish_artifacts
from stepforge.flows.config import RunConfig
from stepforge.flows.figures import run_figures
from stepforge.flows.report import PLOTS, render_report, write_report
from stepforge.flows.report_charts import SIGNATURE_COLOURS
from stepforge.stages.instruments.synthetic import make_problems
from stepforge.storage.catalog import Catalog

REPO = Path(__file__).resolve().parents[1]
RUN = "report-run"
HOSTILE_FOLDER = "<script>alert(1)"  # part of every problem's `source`, which the page must escape


@dataclass(frozen=True)
class BuiltRun:
    store: Path
    source: str
    hard_shards: frozenset[str]  # the mc_hard chains (and the ingest rejects shard)
    soft_shards: frozenset[str]  # the mc_soft chains over the same rollouts and evidence
    hard_policy: str
    soft_policy: str


def run_config(tmp: Path, source: Path, policy: str) -> RunConfig:
    sampling = {"temperature": 1.0, "max_tokens": 400, "seed": 1}
    return RunConfig.model_validate({
        "run": RUN, "store": str(tmp / "store"), "shard_size": 3, "labeller": "mc",
        "backend": {"kind": "synthetic", "world": {"slip_rate": 0.1, "wrong_op_rate": 0.1}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 4, "sampling": {**sampling, "seed": 0}},
        "mc_label": {"completions_per_step": 4, "sampling": sampling},
        "verify": {"sources": ["tool"]},
        "consensus": {"policy": policy},
        "pairs": {"kinds": ["step_dpo"]},
    })


def run_chains(config: RunConfig, record: bool) -> frozenset[str]:
    """Every chain of ``config`` without Prefect; their shard keys and the ingest rejects shard's."""
    ctx = runtime.RunContext(config)
    try:
        problem_shards, reject_shard = runtime.ingest_shards(ctx)
        chains = [runtime.run_chain(ctx, shard) for shard in problem_shards]
        if record:
            as_dicts = [{slot: dataclasses.asdict(m) for slot, m in chain.items()} for chain in chains]
            runtime.record_run(ctx, "completed", traffic=runtime.shard_traffic(as_dicts))
        return frozenset({m.shard for chain in chains for m in chain.values()} | {reject_shard.shard})
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> BuiltRun:
    tmp = tmp_path_factory.mktemp("report")
    folder = tmp / HOSTILE_FOLDER
    folder.mkdir()
    source = folder / "problems.jsonl"
    rows = make_problems(6, (3, 5), seed=3)
    # Three rows ingest must reject: unparseable, a missing field, a duplicate.
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"question": "no answer"}), json.dumps(rows[0])]
    source.write_text("\n".join(lines) + "\n")
    hard = run_chains(run_config(tmp, source, "mc_hard"), record=True)
    soft = run_chains(run_config(tmp, source, "mc_soft"), record=False)
    with Catalog(tmp / "store") as catalog:
        catalog.refresh(run=RUN)
        policies = {r["policy"] for r in catalog.query("select distinct policy from labels").to_pylist()}
    hard_policy = next(p for p in policies if p.startswith("mc_hard"))
    soft_policy = next(p for p in policies if p.startswith("mc_soft"))
    return BuiltRun(tmp / "store", str(source), hard, soft, hard_policy, soft_policy)


@pytest.fixture(scope="module")
def figures(built) -> dict:
    return run_figures(built.store, RUN, built.hard_shards)


def catalog_rows(built: BuiltRun, sql: str, shard_keys=None) -> list[dict]:
    with Catalog(built.store) as catalog:
        catalog.refresh(run=RUN, shards=shard_keys)
        return catalog.query(sql).to_pylist()


# -- figures -----------------------------------------------------------------------------
def test_the_run_has_the_evidence_the_report_is_about(figures):
    assert set(figures["evaluations_by_source"]) == {"mc", "outcome", "tool"}
    assert figures["labels"]["1"] > 0 and figures["labels"]["-1"] > 0
    assert {r["stage"] for r in figures["rejects"]} >= {"ingest"}


def test_label_counts_match_the_catalog(built, figures):
    direct = catalog_rows(built, "select label, count(*) n from labels group by label", built.hard_shards)
    assert figures["labels"] == {"-1": 0, "0": 0, "1": 0} | {str(r["label"]): r["n"] for r in direct}
    per_source = catalog_rows(
        built,
        "select p.source, l.label, count(*) n from labels l join (select distinct problem_id, source from problems) p "
        "on l.problem_id = p.problem_id group by all",
        built.hard_shards,
    )
    expected: dict[str, dict[str, int]] = defaultdict(lambda: {"-1": 0, "0": 0, "1": 0})
    for r in per_source:
        expected[r["source"]][str(r["label"])] = r["n"]
    assert figures["labels_by_source"] == dict(expected)
    assert list(figures["labels_by_source"]) == [built.source]
    assert figures["label_policies"] == [built.hard_policy]


def test_reject_and_evaluation_counts_match_the_catalog(built, figures):
    rejects = catalog_rows(built, "select stage, reason, count(*) n from rejects group by all", built.hard_shards)
    assert {(r["stage"], r["reason"]): r["count"] for r in figures["rejects"]} == {
        (r["stage"], r["reason"]): r["n"] for r in rejects
    }
    counts = [r["count"] for r in figures["rejects"]]
    assert counts == sorted(counts, reverse=True)
    assert {r["reason"] for r in figures["rejects"] if r["stage"] == "ingest"} == {
        "invalid_json", "missing_field", "duplicate_problem"
    }

    evaluations = catalog_rows(built, "select source, verdict, count(*) n from evaluations group by all", built.hard_shards)
    by_verdict: Counter = Counter()
    for r in evaluations:
        by_verdict[r["source"], "none" if r["verdict"] is None else str(r["verdict"])] += r["n"]
    for source, entry in figures["evaluations_by_source"].items():
        assert entry["rows"] == sum(n for (s, _), n in by_verdict.items() if s == source)
        assert {v: n for v, n in entry["verdicts"].items() if n} == {v: n for (s, v), n in by_verdict.items() if s == source}

    for table, n in figures["counts"].items():
        assert n == catalog_rows(built, f"select count(*) n from {table}", built.hard_shards)[0]["n"], table


def test_value_by_depth_is_the_mean_monte_carlo_value_at_each_depth(built, figures):
    rows = catalog_rows(
        built, "select e.source, e.value, n.depth from evaluations e join nodes n using (node_id) "
        "where e.source = 'mc'", built.hard_shards,
    )
    values: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        values[r["depth"]].append(r["value"])
    assert [(p["depth"], p["n"]) for p in figures["value_by_depth"]] == [(d, len(v)) for d, v in sorted(values.items())]
    for point in figures["value_by_depth"]:
        assert point["source"] == "mc"
        assert point["mean_value"] == pytest.approx(sum(values[point["depth"]]) / len(values[point["depth"]]), abs=1e-6)


def test_agreement_is_recomputed_from_the_evaluations(built, figures):
    rows = catalog_rows(built, "select node_id, source, value, verdict from evaluations", built.hard_shards)
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r["source"] == "mc":
            vote = r["verdict"] if r["verdict"] is not None else (1 if r["value"] > 0 else -1)
        elif r["source"] in ("judge", "tool", "human") and r["verdict"] is not None:
            vote = r["verdict"]
        else:
            continue
        sums[r["node_id"], r["source"]] += vote
    verdicts: dict[str, dict[str, int]] = defaultdict(dict)
    for (node, source), total in sums.items():
        verdicts[source][node] = (total > 0) - (total < 0)
    shared = verdicts["mc"].keys() & verdicts["tool"].keys()
    agree = sum(verdicts["mc"][n] == verdicts["tool"][n] for n in shared)
    assert shared and 0 < agree < len(shared), "the synthetic run should have both agreement and disagreement"

    (pair,) = figures["agreement"]["pairs"]
    assert pair == {"a": "mc", "b": "tool", "nodes": len(shared), "agree": agree, "rate": round(agree / len(shared), 6)}
    matrix = figures["agreement"]["matrix"]
    assert matrix["sources"] == ["mc", "tool"]
    assert matrix["rates"] == [[None, pair["rate"]], [pair["rate"], None]]
    assert matrix["nodes"] == [[len(verdicts["mc"]), len(shared)], [len(shared), len(verdicts["tool"])]]


def test_the_shard_restriction_leaves_out_the_other_chain(built, figures):
    soft = run_figures(built.store, RUN, built.soft_shards)
    everything = run_figures(built.store, RUN)
    assert soft["label_policies"] == [built.soft_policy]
    assert everything["label_policies"] == sorted([built.hard_policy, built.soft_policy])
    assert everything["counts"]["labels"] == figures["counts"]["labels"] + soft["counts"]["labels"]
    for value in ("-1", "0", "1"):
        assert everything["labels"][value] == figures["labels"][value] + soft["labels"][value]
    # The chains share rollouts and evidence, not labels or pairs.
    assert soft["evaluations_by_source"] == figures["evaluations_by_source"]
    assert soft["counts"]["problems"] == figures["counts"]["problems"] == everything["counts"]["problems"] == 6


def test_cost_comes_from_the_run_record_and_the_shard_manifests(built, figures):
    record = json.loads((built.store / "runs" / f"{RUN}.json").read_text())
    tokens = sum(client["generated_tokens"] for client in record["traffic"].values())
    seconds = sum(
        m.stats.get("seconds", 0)
        for m in Catalog(built.store).store.manifests(run=RUN) if m.shard in built.hard_shards
    )
    cost = figures["cost"]
    assert tokens > 0 and cost["generated_tokens"] == tokens
    assert cost["seconds"] == pytest.approx(seconds, abs=1e-3)
    assert cost["labelled_steps"] == figures["counts"]["labels"]
    assert cost["tokens_per_labelled_step"] == pytest.approx(tokens / figures["counts"]["labels"], abs=1e-6)
    assert cost["seconds_per_labelled_step"] == pytest.approx(seconds / figures["counts"]["labels"], abs=1e-6)
    assert figures["models"] == {"policy": record["config"]["backend"]["model"], "policy_kind": "synthetic",
                                 "judge": None, "judge_kind": None}


def test_figures_are_plain_json_and_deterministic(built, figures):
    assert json.loads(json.dumps(figures)) == figures
    assert json.dumps(run_figures(built.store, RUN, built.hard_shards)) == json.dumps(figures)


def test_a_run_without_rows_or_record_gives_zeros(built):
    empty = run_figures(built.store, "never-ran")
    assert empty["counts"] == dict.fromkeys(("problems", "rollouts", "nodes", "evaluations", "labels", "pairs", "rejects"), 0)
    assert empty["labels"] == {"-1": 0, "0": 0, "1": 0}
    assert empty["cost"] == {} and empty["models"] == {}
    assert empty["agreement"]["pairs"] == [] and empty["rejects"] == [] and empty["value_by_depth"] == []
    page = render_report(empty, "nothing yet")
    assert page.count('data-empty="true"') == len(PLOTS)
    assert "<svg" not in page


# -- the HTML page -----------------------------------------------------------------------
class PlotMarks(HTMLParser):
    """Per plot element: the SVG marks (rect, path, circle) it contains and their colours."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.depth = 0
        self.marks: dict[str, list[tuple[str, str]]] = {}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "data-plot" in attributes:
            self.current, self.depth = attributes["data-plot"], 0
            self.marks[self.current] = []
        if self.current is None:
            return
        self.depth += 1
        if tag in ("rect", "path", "circle"):
            self.marks[self.current].append((tag, attributes.get("fill") if tag != "path" else attributes.get("stroke")))

    def handle_endtag(self, tag):
        if self.current is not None:
            self.depth -= 1
            if self.depth == 0:
                self.current = None


def test_the_page_has_every_plot_with_visible_marks_and_no_external_resources(built, figures):
    page = render_report(figures, "report <b>test</b>")
    parser = PlotMarks()
    parser.feed(page)
    assert list(parser.marks) == list(PLOTS)
    for name in PLOTS:
        assert f'id="plot-{name}"' in page
        colours = {colour for _, colour in parser.marks[name]}
        assert colours & set(SIGNATURE_COLOURS[name]), f"{name} draws none of its colours: {colours}"
    for external in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert external not in page.lower()
    assert "&lt;script&gt;alert(1)/problems.jsonl" in page and "<script>" not in page
    assert "report &lt;b&gt;test&lt;/b&gt;" in page


def test_write_report_writes_the_page_under_the_store(built):
    path = write_report(built.store, RUN, shards=built.hard_shards)
    assert path == built.store / "reports" / f"{RUN}.html"
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and f'data-plot="{PLOTS[0]}"' in page
    assert built.soft_policy not in page and built.hard_policy in page


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    installer = subprocess.run([str(REPO / ".ci" / "install-chromium")], capture_output=True, text=True, timeout=600)
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    pytest.skip(f"no chromium and .ci/install-chromium could not install it: {installer.stderr.strip()[-500:]}")


@pytest.mark.slow
def test_chromium_renders_every_plot(built, tmp_path):
    image = pytest.importorskip("PIL.Image", reason="decoding the screenshot needs Pillow (the test extra)")
    chromium = find_chromium()
    report = write_report(built.store, RUN, out=tmp_path / "report.html", shards=built.hard_shards)
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,4000"]

    dom = subprocess.run([*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = PlotMarks()
    parser.feed(dom.stdout)
    assert list(parser.marks) == list(PLOTS)
    assert all(parser.marks[name] for name in PLOTS), "every plot is drawn in the rendered DOM"

    def painted(page: Path) -> dict[tuple[int, int, int], int]:
        png = page.with_suffix(".png")
        shot = subprocess.run([*common, f"--screenshot={png}", page.as_uri()], capture_output=True, text=True, timeout=60)
        assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
        return {rgb: n for n, rgb in image.open(png).convert("RGB").getcolors(maxcolors=1 << 24)}

    # The same page with its SVGs hidden: legends and coloured numbers stay, so only the charts'
    # own marks can make up the difference.
    hidden = tmp_path / "hidden.html"
    hidden.write_text(report.read_text().replace("</head>", "<style>svg{visibility:hidden}</style></head>", 1))
    shown, without_charts = painted(report), painted(hidden)

    def pixels(screenshot: dict, colour: str) -> int:
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        return sum(n for p, n in screenshot.items() if all(abs(a - b) <= 2 for a, b in zip(p, rgb)))

    for name in PLOTS:
        colours = {c for _, c in parser.marks[name]} & set(SIGNATURE_COLOURS[name])
        drawn = {c: pixels(shown, c) - pixels(without_charts, c) for c in colours}
        assert sum(drawn.values()) >= 500, f"{name}: its marks cover too few pixels: {drawn}"
    background = max(shown.values()) / sum(shown.values())
    assert background < 0.9, "the page is mostly one colour: nothing rendered"


# -- Prefect artifacts -------------------------------------------------------------------
def test_artifact_keys_are_in_prefects_alphabet_and_unique_per_run():
    assert artifact_key_prefix("report-run") == "report-run"
    odd = artifact_key_prefix("My Run_2/ü")
    assert odd.startswith("my-run-2-") and set(odd) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert artifact_key_prefix("a_b") != artifact_key_prefix("a-b") != artifact_key_prefix("A-B")
    assert artifact_key_prefix("!!!").startswith("run-")


def test_publishing_outside_a_flow_run_does_nothing(figures):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert publish_artifacts(figures, RUN) == []


def test_artifacts_of_a_flow_run_carry_the_key_figures(prefect_harness, figures):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.runtime import flow_run

    @flow
    def publish(figures: dict, run: str) -> tuple[list[str], str]:
        return publish_artifacts(figures, run), flow_run.id

    keys, run_id = publish(figures, "Report Run!")
    assert len(keys) == 3 and all(k.startswith(artifact_key_prefix("Report Run!")) for k in keys)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {a.key: a for a in found}
    assert set(by_key) == set(keys)
    assert all(str(a.flow_run_id) == str(run_id) for a in found)

    summary, labels, rejects = (by_key[k] for k in keys)
    assert summary.type == "markdown"
    labelled = figures["counts"]["labels"]
    assert f"| Labelled steps | {labelled:,} (+1: {figures['labels']['1']:,}" in summary.data
    assert f"| Rejects | {figures['counts']['rejects']:,} |" in summary.data

    assert labels.type == "table" and rejects.type == "table"
    assert json.loads(labels.data) == [
        {"problem source": built_source, "+1": c["1"], "0": c["0"], "-1": c["-1"], "labelled steps": sum(c.values())}
        for built_source, c in figures["labels_by_source"].items()
    ]
    assert json.loads(rejects.data) == [{"stage": r["stage"], "reason": r["reason"], "rows": r["count"]} for r in figures["rejects"]]
