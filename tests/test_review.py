"""The review loop against a real Label Studio server (its own venv, started by the session fixture).

The run under review is model-free: Math-Shepherd trajectories imported with their MC labels,
tool-checked, labelled by mc_hard; everything else (push, annotations, pull, consensus, export)
is the real thing.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from label_studio import create_annotator, label_studio_fixture  # noqa: F401
from stored_runs import store_run
from stepforge.flows import runtime
from stepforge.flows.backfill import backfill_run
from stepforge.flows.config import RunConfig
from stepforge.flows.review import ReviewError, connect, pull, push, status
from stepforge.flows.review_webhook import webhook_app
from stepforge.flows.secrets import SecretError
from stepforge.stages.review.annotations import item_id
from stepforge.storage.catalog import Catalog

pytestmark = pytest.mark.slow  # a Label Studio server: ~30 s to start on a fresh data dir

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN_ENV = "STEPFORGE_TEST_LS_TOKEN"


def make_run(store: Path, server, project: str, run: str = "rev", **review) -> runtime.RunContext:
    """A labelled run whose record carries the review settings (as a user's config would)."""
    cfg = RunConfig.model_validate({
        "run": run, "store": str(store), "labeller": "none", "shard_size": 2,
        "ingest": {"source": str(FIXTURES / "math_shepherd_sample.jsonl"), "format": "math_shepherd"},
        "rollout": {"samples_per_problem": 0}, "verify": {"sources": ["tool"]},
        "consensus": {"policy": "mc_hard"},
        "export": {"out_dir": str(store / "export"), "formats": ["prm_stepwise"]},
        "review": {"url": server.url, "project": project, "token_env": TOKEN_ENV, **review},
    })
    return store_run(cfg)


@pytest.fixture
def token(label_studio, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, label_studio.token)
    return label_studio.token


def unique(name: str) -> str:
    return f"{name} {os.urandom(3).hex()}"


def tasks_of(client, project_id: int) -> list[dict]:
    return [t.model_dump(mode="json") for t in client.tasks.list(project=project_id)]


def annotate(server, annotator: dict, task_id: int, result: list[dict], **fields):
    """What an annotator's Submit sends, through the API with the annotator's own token."""
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=server.url, api_key=annotator["token"])
    return client.annotations.create(id=task_id, result=result, lead_time=2.5, **fields)


def choice(i: int, value: str) -> dict:
    return {"from_name": f"label_{i}", "to_name": f"step_{i}", "type": "choices", "value": {"choices": [value]}}


@pytest.fixture(scope="module")
def annotators(label_studio):
    return [create_annotator(label_studio, f"ann{i}-{os.urandom(3).hex()}@example.com", os.urandom(12).hex())
            for i in range(2)]


def test_push_sends_selected_trajectories_once_with_the_automatic_labels_as_predictions(label_studio, token, tmp_path):
    ctx = make_run(tmp_path, label_studio, unique("push"), policies=["sql"], sql="select rollout_id from rollouts",
                   max_items=2)
    first = push(ctx)
    assert first["selected"] == 3, "every Math-Shepherd trajectory"
    assert first["pushed"] == 2 and first["left_for_next_push"] == 1
    second = push(ctx)
    assert second["pushed"] == 1 and second["already_in_project"] == 2
    third = push(ctx)
    assert third["pushed"] == 0 and third["already_in_project"] == first["selected"], "nothing is imported twice"
    client = connect(ctx.config.review)
    tasks = tasks_of(client, first["project_id"])
    assert len(tasks) == first["selected"]
    assert len({t["data"]["item_id"] for t in tasks}) == len(tasks)
    items = ctx.review_items()
    assert sorted(i["task_id"] for i in items) == sorted(t["id"] for t in tasks), "every task is recorded once"
    labels = {r["node_id"]: r for r in ctx.store.read_rows("labels", ctx.store.manifests(ctx.run, "consensus"))}
    task = tasks[0]
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == ctx.config.consensus.policy_id
    steps = task["data"]["steps"]
    expected = [labels[s["node_id"]]["confidence"] for s in steps if s["node_id"] in labels]
    assert prediction["score"] == pytest.approx(sum(expected) / len(expected))
    shown = {r["from_name"]: r["value"]["choices"][0] for r in prediction["result"]}
    names = {1: "correct", -1: "incorrect", 0: "neutral"}
    assert shown == {f"label_{s['idx']}": names[labels[s["node_id"]]["label"]] for s in steps if s["node_id"] in labels}
    project = client.projects.get(id=first["project_id"])
    assert '<Repeater on="$steps"' in project.label_config


def test_pulled_labels_override_consensus_reach_the_export_and_edits_replace_them(
    label_studio, token, annotators, tmp_path
):
    ctx = make_run(tmp_path, label_studio, unique("pull"), policies=["audit"], audit_rate=1.0)
    pushed = push(ctx)
    client = connect(ctx.config.review)
    task = next(t for t in tasks_of(client, pushed["project_id"]) if len(t["data"]["steps"]) >= 2)
    steps = task["data"]["steps"]
    flipped = {"correct": "incorrect", "incorrect": "correct", "unlabelled": "incorrect", "neutral": "incorrect"}
    new_choice = flipped[steps[0]["automatic"]]
    annotation = annotate(label_studio, annotators[0], task["id"], [
        choice(0, new_choice), choice(1, steps[1]["automatic"] if steps[1]["automatic"] != "unlabelled" else "neutral"),
        {"from_name": "correction_0", "to_name": "step_0", "type": "textarea", "value": {"text": ["a better step"]}},
    ])
    pulled = pull(ctx)
    assert pulled["new_step_labels"] == 2 and pulled["rejected_annotations"] == 0
    assert pull(ctx)["new_step_labels"] == 0, "a second pull stores nothing again"
    human = {r["node_id"]: r for r in ctx.human_review_rows()}
    row = human[steps[0]["node_id"]]
    meta = json.loads(row["meta"])
    assert row["source"] == "human" and row["verdict"] == {"correct": 1, "incorrect": -1}[new_choice]
    assert meta["annotator"] == annotators[0]["email"] and meta["correction"] == "a better step"
    assert meta["annotation_id"] == annotation.id and meta["updated_at"] and meta["lead_time"] == 2.5
    assert row["confidence"] is None

    changed = backfill_run(tmp_path, ctx.run)
    assert changed["written"]["consensus"] == 1, "only the reviewed problem's shard is re-labelled"
    assert changed["labels"]["changed"] + changed["labels"]["added"] >= 1
    labels = {r["node_id"]: r for r in ctx.store.read_rows("labels", [
        c["labels"] for c in runtime.completed_chains(runtime.RunContext(runtime.load_run_config(tmp_path, ctx.run)))[0]])}
    label = labels[steps[0]["node_id"]]
    assert label["label"] == row["verdict"] and label["sources"] == "human" and label["confidence"] == 1.0
    export = pq.read_table(tmp_path / "export" / "prm_stepwise.parquet").to_pylist()
    exported = next(r for r in export if r["rollout_id"] == task["data"]["rollout_id"])
    assert exported["labels"][0] is (row["verdict"] == 1) and exported["label_sources"][0] == "human"
    assert backfill_run(tmp_path, ctx.run)["written"] == {}, "idempotent"

    # The annotator changes their mind: the edit replaces the earlier version, nothing is counted twice.
    time.sleep(1.1)  # updated_at has microseconds, but make the order unambiguous
    reader = connect(ctx.config.review)
    reader.annotations.update(id=annotation.id, result=[choice(0, steps[0]["automatic"] if steps[0]["automatic"]
                                                                in ("correct", "incorrect") else "correct")])
    assert pull(ctx)["new_step_labels"] == 1
    rows = [r for r in ctx.human_review_rows() if json.loads(r["meta"])["annotation_id"] == annotation.id]
    assert [r["node_id"] for r in rows] == [steps[0]["node_id"]], "step 2's label went with the edit"
    with Catalog(tmp_path) as catalog:
        catalog.refresh(run=ctx.run)
        stored = catalog.query("select count(*) n from evaluations where source = 'human'").to_pylist()[0]["n"]
    assert stored == 3, "both versions are kept in the store (2 + 1 rows); consensus reads the latest"


def test_several_annotators_give_agreement_statistics_and_flag_conflicts(label_studio, token, annotators, tmp_path):
    ctx = make_run(tmp_path, label_studio, unique("agree"), policies=["audit"], audit_rate=1.0, max_items=2)
    pushed = push(ctx)
    client = connect(ctx.config.review)
    first, second = tasks_of(client, pushed["project_id"])[:2]
    annotate(label_studio, annotators[0], first["id"], [choice(0, "correct"), choice(1, "incorrect")])
    annotate(label_studio, annotators[1], first["id"], [choice(0, "correct"), choice(1, "correct")])
    annotate(label_studio, annotators[0], second["id"], [choice(0, "incorrect")])
    annotate(label_studio, annotators[1], second["id"], [choice(0, "incorrect")])
    pull(ctx)
    report = status(ctx)
    assert report["annotations"] == 4 and report["multi_annotated_steps"] == 3
    assert report["pairwise_agreement"] == pytest.approx(2 / 3)
    (conflict,) = report["conflicts"]
    assert conflict["node_id"] == first["data"]["steps"][1]["node_id"]
    assert conflict["votes"] == {annotators[0]["email"]: "incorrect", annotators[1]["email"]: "correct"}
    assert report["automatic_vs_human"]["audit"]["steps"] == report["automatic_vs_human"]["all"]["steps"] >= 2
    backfill_run(tmp_path, ctx.run)
    ctx2 = runtime.RunContext(runtime.load_run_config(tmp_path, ctx.run))
    labels = {r["node_id"]: r for r in ctx2.store.read_rows("labels", [c["labels"] for c in runtime.completed_chains(ctx2)[0]])}
    split = labels[conflict["node_id"]]
    assert split["label"] == -1 and split["confidence"] == 0.5 and "annotators disagree" in split["reason"]


def test_cancelled_and_malformed_annotations_become_rejects_and_the_pull_goes_on(
    label_studio, token, annotators, tmp_path
):
    ctx = make_run(tmp_path, label_studio, unique("bad"), policies=["audit"], audit_rate=1.0, max_items=3)
    pushed = push(ctx)
    client = connect(ctx.config.review)
    a, b, c = tasks_of(client, pushed["project_id"])[:3]
    annotate(label_studio, annotators[0], a["id"], [], was_cancelled=True)  # the annotator pressed Skip
    annotate(label_studio, annotators[0], b["id"], [choice(0, "maybe")])
    annotate(label_studio, annotators[0], c["id"], [choice(0, "correct")])
    result = pull(ctx)
    assert result["new_step_labels"] == 1 and result["reject_reasons"] == {"annotation_cancelled": 1, "unknown_choice": 1}
    with Catalog(tmp_path) as catalog:
        catalog.refresh(run=ctx.run)
        rejects = catalog.query("select reason, detail, payload from rejects where stage = 'review' order by reason").to_pylist()
    assert [r["reason"] for r in rejects] == ["annotation_cancelled", "unknown_choice"]
    assert "maybe" in rejects[1]["payload"] and f"task {b['id']}" in rejects[1]["detail"]
    assert pull(ctx)["rejected_annotations"] == 0, "a rejected version is not rejected again"
    backfill_run(tmp_path, ctx.run)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "annotation_cancelled" in card and "unknown_choice" in card, "the dataset card counts review rejects too"


def test_label_studio_killed_mid_pull_loses_nothing_and_a_rerun_completes(label_studio, token, annotators, tmp_path):
    ctx = make_run(tmp_path, label_studio, unique("fault"), policies=["audit"], audit_rate=1.0,
                   page_size=1)
    pushed = push(ctx)
    client = connect(ctx.config.review)
    tasks = tasks_of(client, pushed["project_id"])
    for task in tasks:
        annotate(label_studio, annotators[0], task["id"], [choice(i, "correct") for i in range(len(task["data"]["steps"]))])
    expected = sum(len(t["data"]["steps"]) for t in tasks)

    def die_after_first_page(pages: int, _new: int) -> None:
        if pages == 1:
            label_studio.kill()

    try:
        with pytest.raises(ReviewError, match=r"1 page\(s\) finished .* Run the command again"):
            pull(ctx, on_page=die_after_first_page)
    finally:
        label_studio.restart()
    kept = ctx.human_review_rows()
    assert 0 < len(kept) < expected, "the finished page is stored"
    resumed = pull(ctx)
    assert resumed["new_step_labels"] == expected - len(kept)
    rows = ctx.human_review_rows()
    assert len(rows) == expected and len({r["evaluation_id"] for r in rows}) == expected, "none lost, none twice"
    with Catalog(tmp_path) as catalog:
        catalog.refresh(run=ctx.run)
        stored = catalog.query("select count(*) n from evaluations where source = 'human'").to_pylist()[0]["n"]
    assert stored == expected


def test_a_webhook_from_label_studio_triggers_a_pull(label_studio, token, annotators, tmp_path):
    from asgi_server import serving

    ctx = make_run(tmp_path, label_studio, unique("hook"), policies=["audit"], audit_rate=1.0, max_items=1)
    pushed = push(ctx)
    client = connect(ctx.config.review)
    (task,) = tasks_of(client, pushed["project_id"])
    app = webhook_app(lambda: pull(ctx))
    with serving(app) as url:
        client.webhooks.create(url=f"{url}/webhook", project=pushed["project_id"], send_payload=False,
                               send_for_all_actions=False, actions=["ANNOTATION_CREATED"])
        annotate(label_studio, annotators[1], task["id"], [choice(0, "incorrect")])
        deadline = time.monotonic() + 60
        while not app.state.puller.results and time.monotonic() < deadline:
            time.sleep(0.2)
    assert app.state.puller.errors == []
    assert app.state.puller.results and app.state.puller.results[0]["new_step_labels"] == 1
    (row,) = ctx.human_review_rows()
    assert row["node_id"] == task["data"]["steps"][0]["node_id"] and row["verdict"] == -1


def test_the_token_stays_out_of_configs_shards_logs_and_flow_parameters(label_studio, token, annotators, tmp_path, capsys,
                                                                        caplog, monkeypatch):
    from stepforge.flows.review import review_pull, review_push

    ctx = make_run(tmp_path, label_studio, unique("secret"), policies=["audit"], audit_rate=1.0, max_items=1)
    push(ctx)
    (task,) = tasks_of(connect(ctx.config.review), ctx.review_items()[0]["project_id"])
    annotate(label_studio, annotators[0], task["id"], [choice(0, "correct")])
    pull(ctx)
    backfill_run(tmp_path, ctx.run)
    for flow in (review_pull, review_push):
        assert set(inspect.signature(flow.fn).parameters) <= {"run", "store", "rerun"}, "no secret is a parameter"
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert leaked == [], f"the token is in {leaked}"
    out = capsys.readouterr()
    assert token not in out.out + out.err and token not in caplog.text
    # A secrets file instead of the environment: it must not be readable by others.
    monkeypatch.delenv(TOKEN_ENV)
    secrets = tmp_path / "ls.env"
    secrets.write_text(f"{TOKEN_ENV}={token}\n")
    secrets.chmod(0o644)
    with_file = ctx.config.review.model_copy(update={"token_file": secrets})
    with pytest.raises(SecretError, match="chmod 600"):
        connect(with_file)
    secrets.chmod(0o600)
    assert connect(with_file).projects.list() is not None
    missing = ctx.config.review.model_copy(update={"token_env": "STEPFORGE_NO_SUCH_TOKEN"})
    with pytest.raises(SecretError, match="STEPFORGE_NO_SUCH_TOKEN is not set"):
        connect(missing)
    # A wrong token is a clear error, not a stack of HTTP internals.
    monkeypatch.setenv(TOKEN_ENV, "0" * 40)
    with pytest.raises(ReviewError, match="refused the token"):
        pull(ctx)


def test_review_pull_flow_pulls_and_relabels(prefect_harness, label_studio, token, annotators, tmp_path):
    from stepforge.flows.review import review_pull

    ctx = make_run(tmp_path, label_studio, unique("flow"), policies=["audit"], audit_rate=1.0, max_items=1)
    push(ctx)
    item = ctx.review_items()[0]
    annotate(label_studio, annotators[0], item["task_id"], [choice(0, "incorrect")])
    summary = review_pull(run=ctx.run, store=str(tmp_path))
    assert summary["new_step_labels"] == 1
    assert summary["backfill"]["written"]["consensus"] == 1
    assert item_id(ctx.run, item["rollout_id"]) == item["item_id"]
    again = review_pull(run=ctx.run, store=str(tmp_path))
    assert again["new_step_labels"] == 0 and "backfill" not in again


def test_the_cli_pushes_pulls_and_reports(label_studio, token, annotators, tmp_path):
    from typer.testing import CliRunner

    from stepforge.flows.cli import app

    ctx = make_run(tmp_path, label_studio, unique("cli"), policies=["audit"], audit_rate=1.0, max_items=2)
    runner = CliRunner()
    pushed = runner.invoke(app, ["review", "push", ctx.run, "--store", str(tmp_path), "--limit", "1"])
    assert pushed.exit_code == 0, pushed.output
    said = " ".join(pushed.output.split())  # rich wraps long lines
    assert "1 trajectories pushed (audit 1); 0 already in the project; 2 left for the next push" in said
    item = ctx.review_items()[0]
    annotate(label_studio, annotators[0], item["task_id"], [choice(0, "incorrect")])
    annotate(label_studio, annotators[1], item["task_id"], [choice(0, "correct")])
    pulled = runner.invoke(app, ["review", "pull", ctx.run, "--store", str(tmp_path)])
    assert pulled.exit_code == 0, pulled.output
    said = " ".join(pulled.output.split())
    assert "2 new step labels" in said and "re-ran: consensus ×1" in said
    report = runner.invoke(app, ["review", "status", ctx.run, "--store", str(tmp_path)])
    assert report.exit_code == 0, report.output
    said = " ".join(report.output.split())
    assert "conflict: rollout" in said and f"{annotators[0]['email']}: incorrect" in said
    assert label_studio.token not in pushed.output + pulled.output + report.output
