"""The human review loop through Label Studio's own UI, in a real headless Chromium.

stepforge pushes one trajectory (a model-free ProcessBench run: imported steps, tool checks) to the
session's Label Studio server; an annotator logs in through the login form, opens the task, finds the
automatic labels pre-selected (the project shows predictions to annotators), changes one step from
"correct" to "incorrect", adds a correction and submits; stepforge's pull then turns that click into a
``human`` evaluation of that step's node. Screenshots of the page before and after the change are
checked for content (size, not blank, the checkbox pixels that changed), the text through the DOM.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import httpx
import pytest
from label_studio import create_annotator, label_studio_fixture  # noqa: F401
from PIL import Image
from playwright.sync_api import Locator, Page, expect, sync_playwright
from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.flows.review import pull, push
from stepforge.stages.review.annotations import ReviewConfig
from stored_runs import processbench_config, store_run
from test_report import find_chromium

RUN = "review-ui"
UI_TIMEOUT_MS = 120_000  # the editor is a large React app; two shared cores make its first paint slow
CORRECTION = "Only 12 pink flamingos stay pink on Saturday: 6 of the 18 were taken and painted white."


def make_run(store: Path, server, project: str) -> RunConfig:
    """A completed run without a model (ProcessBench steps, tool verification), set up to send one
    trajectory to ``server`` by the audit policy."""
    cfg = processbench_config(store, RUN, limit=2)
    store_run(cfg).close()
    # The sql policy (not the audit, whose tasks are blind): the annotator starts from the prediction.
    review = ReviewConfig(url=server.url, project=project, policies=("sql",), sql="select rollout_id from rollouts",
                          max_items=1)
    return cfg.model_copy(update={"review": review})


def squash(text: str) -> str:
    return " ".join(text.split())


def blue_share(png: bytes) -> float:
    """Share of clearly blue pixels: Label Studio fills a checked checkbox with its primary blue,
    an unchecked one is white with a grey border."""
    counts = Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 24)
    blue = sum(n for n, (r, g, b) in counts if b > 120 and b - r > 40 and b - g > 25)
    return blue / sum(n for n, _ in counts)


def assert_rendered_page(path: Path, width: int) -> None:
    """A full-page screenshot with content: the viewport's width, tall, many colours, no colour dominating."""
    image = Image.open(path).convert("RGB")
    assert image.width == width and image.height >= 800, image.size
    assert path.stat().st_size > 50_000, f"{path.name} is only {path.stat().st_size} bytes"
    colours = image.getcolors(maxcolors=1 << 24)
    dominant = max(n for n, _ in colours) / (image.width * image.height)
    assert len(colours) > 200 and dominant < 0.9, f"{path.name} looks blank: {len(colours)} colours, {dominant:.0%} one colour"


def step_block(page: Page, number: int) -> Locator:
    """The Repeater block of step ``number`` (1-based): the View whose header is 'Step <n> · ...'
    (the inline border style is stepforge's label_config, not Label Studio's markup)."""
    heading = page.get_by_role("heading", name=re.compile(rf"^Step {number} ·"))
    return page.locator('div[style*="border-top"]').filter(has=heading)


@pytest.mark.slow
def test_annotator_changes_a_step_label_in_the_browser_and_pull_stores_it(label_studio, tmp_path, monkeypatch):
    chromium = find_chromium()
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    cfg = make_run(tmp_path / "store", label_studio, f"stepforge ui {os.urandom(4).hex()}")
    ctx = runtime.RunContext(cfg)
    try:
        pushed = push(ctx)
        assert pushed["pushed"] == 1 and pushed["by_reason"] == {"sql": 1}, pushed
        [item] = ctx.review_items()
        project_id, task_id = int(item["project_id"]), int(item["task_id"])
        with httpx.Client(base_url=label_studio.url, headers=label_studio.headers, timeout=30, trust_env=False) as api:
            project = api.get(f"/api/projects/{project_id}").json()
            task = api.get(f"/api/tasks/{task_id}").json()
        # Label Studio's default for new projects, which stepforge relies on: annotators start from the prediction.
        assert project["show_collab_predictions"] is True
        steps = task["data"]["steps"]
        assert [s["node_id"] for s in steps] == list(item["node_ids"])
        index = next(i for i, s in enumerate(steps) if s["automatic"] == "correct")  # the step the annotator flips
        step = steps[index]

        email, password = f"annotator-{os.urandom(4).hex()}@example.com", os.urandom(12).hex()
        annotator = create_annotator(label_studio, email, password)
        before_png, after_png = tmp_path / "before.png", tmp_path / "after.png"
        width = 1280
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": width, "height": 1600})
                page.set_default_timeout(UI_TIMEOUT_MS)
                expect.set_options(timeout=UI_TIMEOUT_MS)

                page.goto(f"{label_studio.url}/user/login/")
                page.locator("input[name=email]").fill(email)
                page.locator("input[name=password]").fill(password)
                page.get_by_role("button", name=re.compile(r"log ?in", re.IGNORECASE)).click()
                page.wait_for_url(lambda url: "/user/login" not in url)
                page.goto(f"{label_studio.url}/projects/{project_id}/data?task={task_id}")

                block = step_block(page, index + 1)
                expect(block).to_have_count(1)
                expect(page.get_by_role("heading", name="Problem", exact=True)).to_be_visible()
                choice = {value: block.locator(f'input[type=checkbox][name="{value}"]')
                          for value in ("correct", "incorrect", "neutral")}
                # The prediction is pre-selected: every labelled step shows its automatic label checked.
                expect(choice["correct"]).to_be_checked()
                expect(choice["incorrect"]).not_to_be_checked()
                for number, other in enumerate(steps, 1):
                    if other["automatic"] in ("correct", "incorrect", "neutral"):
                        expect(step_block(page, number).locator(f'input[name="{other["automatic"]}"]')).to_be_checked()
                # The browser collapses runs of white space (ProcessBench has double spaces after full stops).
                dom_text = squash(block.inner_text())
                assert squash(step["text"]) in dom_text and squash(step["title"]) in dom_text
                assert squash(task["data"]["problem"]) in squash(page.locator("body").inner_text())
                box = {value: choice[value].locator("xpath=..") for value in ("correct", "incorrect")}  # the drawn box
                blue_before = {v: blue_share(box[v].screenshot(path=tmp_path / f"before-{v}.png")) for v in box}
                page.screenshot(path=before_png, full_page=True)

                choice["incorrect"].click()
                expect(choice["incorrect"]).to_be_checked()
                expect(choice["correct"]).not_to_be_checked()  # one choice per step
                block.locator("textarea").fill(CORRECTION)
                block.get_by_role("button", name="Add").click()
                # maxSubmissions=1: the added text replaces the text box
                expect(block.get_by_text(CORRECTION)).to_be_visible()
                expect(block.locator("textarea")).to_have_count(0)
                blue_after = {v: blue_share(box[v].screenshot(path=tmp_path / f"after-{v}.png")) for v in box}
                page.screenshot(path=after_png, full_page=True)

                with page.expect_response(lambda r: r.request.method == "POST"
                                          and re.search(rf"/api/tasks/{task_id}/annotations/?(\?|$)", r.url)) as posted:
                    page.get_by_role("button", name=re.compile(r"^submit", re.IGNORECASE)).click()
                assert posted.value.status == 201, posted.value.text()
                annotation = posted.value.json()
                # A saved annotation: the editor's button reads "Update" where it read "Submit" (its
                # accessible name stays "submit", so this matches the visible text).
                expect(page.locator("button").filter(has_text=re.compile(r"^\s*Update\s*$"))).to_be_visible()
                page.screenshot(path=tmp_path / "submitted.png", full_page=True)
            finally:
                expect.set_options(timeout=None)  # a process-wide setting: back to Playwright's default
                browser.close()

        for png in (before_png, after_png):
            assert_rendered_page(png, width)
        assert before_png.read_bytes() != after_png.read_bytes()
        # The pixels of the click: the blue fill moved from "correct" to "incorrect".
        assert blue_before["correct"] > 0.2 > blue_before["incorrect"], blue_before
        assert blue_after["incorrect"] > 0.2 > blue_after["correct"], blue_after

        # What the browser sent: the edited prediction (Label Studio marks its origin) and the correction.
        assert annotation["completed_by"] == annotator["id"] and annotation["parent_prediction"] is not None
        by_name = {r["from_name"]: r for r in annotation["result"]}
        assert by_name[f"label_{index}"]["value"] == {"choices": ["incorrect"]}
        assert by_name[f"label_{index}"]["origin"] == "prediction-changed"
        assert by_name[f"correction_{index}"]["value"] == {"text": [CORRECTION]}

        summary = pull(ctx)
        assert summary["rejected_annotations"] == 0 and summary["new_step_labels"] >= 1, summary
        human = {row["node_id"]: row for row in ctx.human_review_rows()}
        row = human[step["node_id"]]
        meta = json.loads(row["meta"])
        assert row["source"] == "human" and row["verdict"] == -1 and row["successes"] == 0
        assert row["problem_id"] == item["problem_id"] and row["rationale"] == CORRECTION
        assert meta["annotator"] == email and meta["annotator_id"] == annotator["id"]
        assert meta["correction"] == CORRECTION and meta["automatic"] == "correct"
        assert meta["annotation_id"] == annotation["id"] and meta["task_id"] == task_id
        assert meta["updated_at"] == annotation["updated_at"] and meta["step_index"] == index
        # The other steps were submitted as pre-filled: whatever evidence they give is the automatic label.
        verdict_of = {"correct": 1, "incorrect": -1, "neutral": 0}
        for other in steps:
            if other["node_id"] in human and other["node_id"] != step["node_id"]:
                assert human[other["node_id"]]["verdict"] == verdict_of[other["automatic"]]
        assert pull(ctx)["new_step_labels"] == 0  # the same annotation version is not stored twice
    finally:
        ctx.close()
