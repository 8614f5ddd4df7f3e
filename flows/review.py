"""The human review loop: push the trajectories the machine is least sure about to Label Studio,
pull annotators' step labels back as ``human`` evaluations, and re-label with them.

- **push** selects trajectories of the run's current chains by the review policies
  (stages/review/annotations.py), creates or updates the project, and imports one task per trajectory
  with the automatic labels as a prediction. It lists the project's tasks first, so pushing
  twice imports nothing twice, and a push that died after the import but before its shard was
  written is reconciled by the next one.
- **pull** reads annotated tasks page by page; every annotation version it has not stored
  becomes human evaluations (or a reject with a reason) in a ``review`` shard written per page.
  A pull that dies in the middle (Label Studio gone) keeps the pages it finished and fails with
  a clear error; the next pull skips what is stored, so no label is lost or counted twice.
- **consensus** reads each annotation's latest version (an edit replaces, a re-pull repeats
  nothing); human evidence enters the consensus shard key of the problem shards it touches, so
  a backfill of consensus → export re-labels exactly those.

Talks to the server with label-studio-sdk; the token comes from the environment or a secrets
file (ReviewConfig.token_env / token_file), never from a parameter.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from prefect import flow

from stepforge.flows.runtime.registry import LABELS, ROOT
from stepforge.flows.secrets import read_secret
from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Label, Reject, ReviewItem
from stepforge.stages.review import annotations as review
from stepforge.stages.review.annotations import AnnotationError, ReviewConfig


class ReviewError(RuntimeError):
    """The review loop cannot go on (server unreachable, refused token); the message says what to do."""


# -- the server ----------------------------------------------------------------------------
def connect(cfg: ReviewConfig):
    """A label-studio-sdk client for the configured server, token from the environment or secrets file."""
    try:
        from label_studio_sdk import LabelStudio
    except ImportError as exc:
        raise ImportError("the review loop needs label-studio-sdk: pip install 'stepforge[review]'") from exc
    token = read_secret(cfg.token_env, cfg.token_file)
    # No SDK retries: a failed call surfaces at once, and every step of push and pull is safe to re-run.
    return LabelStudio(base_url=cfg.url.rstrip("/"), api_key=token, timeout=cfg.timeout_seconds, max_retries=0)


def _server_errors() -> tuple[type[BaseException], ...]:
    """What a failing or vanished server raises through the SDK; anything else is a bug and propagates."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    return ApiError, httpx.HTTPError, OSError


def _unreachable(cfg: ReviewConfig, exc: Exception, done: str) -> ReviewError:
    status = getattr(exc, "status_code", None)
    if status in (401, 403):
        return ReviewError(f"Label Studio at {cfg.url} refused the token from {cfg.token_env}"
                           f"{' / ' + str(cfg.token_file) if cfg.token_file else ''} (HTTP {status})")
    what = f"HTTP {status}" if status else type(exc).__name__
    return ReviewError(f"Label Studio at {cfg.url} failed ({what}: {str(exc)[:200]}); {done}. Run the command again.")


def project_title(cfg: ReviewConfig, run: str) -> str:
    return cfg.project or f"stepforge {run}"


def ensure_project(client, title: str) -> int:
    """The project of this title, created with stepforge's view, or its view updated if it differs."""
    config = review.label_config()
    for project in client.projects.list(title=title):
        if project.title == title:
            full = client.projects.get(id=project.id)
            if (full.label_config or "").strip() != config.strip():
                client.projects.update(id=project.id, label_config=config)
            return int(project.id)
    created = client.projects.create(
        title=title, label_config=config, show_skip_button=True,
        description="Step labels from stepforge: confirm or change each step's automatic label.",
    )
    return int(created.id)


def _tasks(client, project_id: int, page_size: int, *, only_annotated: bool):
    """Pages of the project's tasks as plain dicts (annotations included)."""
    from label_studio_sdk.core.api_error import ApiError

    pager = client.tasks.list(project=project_id, page_size=page_size, only_annotated=only_annotated or None)
    try:
        for page in pager.iter_pages():
            yield [task.model_dump(mode="json") if hasattr(task, "model_dump") else dict(task) for task in page.items or []]
    except ApiError as exc:
        if exc.status_code != 404:  # the page after the last one
            raise


def _items_in_project(client, project_id: int, page_size: int) -> dict[str, int]:
    """item_id → task id of every task in the project (what a push must not import again)."""
    return {t["data"].get("item_id"): t["id"] for page in _tasks(client, project_id, page_size, only_annotated=False)
            for t in page}


# -- push ----------------------------------------------------------------------------------
def evidence_chains(ctx):
    """The problem shards whose evidence is complete under the current config (ingest → verify), the
    consensus shards that label them (current, else the one the run last recorded: after a pull the
    current one is only made by the next backfill), the ingest rejects shard, and how many shards
    have no evidence yet."""
    from stepforge.flows.runtime import ROOT, current_chains, load_run_record

    # The evidence is what the labels are made from: the slots the labels' stage needs.
    labels_stage = ctx.chain.stage(LABELS)
    evidence_slots = (ROOT, *labels_stage.needs)
    chains, reject_shard = current_chains(ctx)
    ready = [{slot: chain[slot] for slot in evidence_slots} for chain in chains
             if all(chain[slot] is not None for slot in evidence_slots)]
    try:
        recorded = load_run_record(ctx.store.root, ctx.run).get("chains") or {}
    except FileNotFoundError:  # a run being made for the first time has no record yet
        recorded = {}
    labels_from = []
    for chain in chains:
        if chain[LABELS] is not None:
            labels_from.append(chain[LABELS])
        elif (key := recorded.get(chain[ROOT].shard, {}).get(LABELS)) is not None:
            if (manifest := ctx.store.manifest(ctx.run, labels_stage.name, key)) is not None:
                labels_from.append(manifest)
    return ready, labels_from, reject_shard, len(chains) - len(ready)


def push(ctx, *, limit: int | None = None) -> dict:
    """Send the trajectories the review policies select; return counts per reason and what was skipped."""
    from stepforge.flows.runtime import chain_shard_keys
    from stepforge.storage.catalog import Catalog

    cfg: ReviewConfig = ctx.config.review
    chains, labels_from, reject_shard, incomplete = evidence_chains(ctx)
    store, run = ctx.store, ctx.run

    def read(table: str, *slots: str) -> list[dict]:
        return store.read_rows(table, [chain[s] for chain in chains for s in slots])

    evidence = ctx.chain.stage(LABELS).reads  # what the labels are made from, as the labels' stage declares
    tree = (ROOT, *evidence["nodes"][1:])  # trajectories: imported, sampled, and the labeller's completions
    rollouts = read("rollouts", *tree)
    labels = store.read_rows("labels", labels_from)
    evaluations = read("evaluations", *evidence["evaluations"])
    sql_ids: list[str] = []
    if "sql" in cfg.policies and cfg.sql:
        shown = chain_shard_keys(chains, reject_shard) | {m.shard for m in labels_from}
        with Catalog(store.root) as catalog:
            catalog.refresh(run=run, shards=shown)
            result = catalog.query(cfg.sql)
        if "rollout_id" not in result.column_names:
            raise ReviewError(f"review.sql must return a rollout_id column; it returned {result.column_names}")
        sql_ids = [str(v) for v in result.column("rollout_id").to_pylist()]
    candidates = review.select(rollouts, labels, evaluations, cfg, ctx.config.consensus, sql_ids)
    recorded = {row["item_id"]: row for row in ctx.review_items()}
    title = project_title(cfg, run)
    client = connect(cfg)
    try:
        project_id = ensure_project(client, title)
        in_project = _items_in_project(client, project_id, cfg.page_size)
    except _server_errors() as exc:
        raise _unreachable(cfg, exc, "nothing was pushed") from exc
    fresh = [c for c in candidates if review.item_id(run, c.rollout_id) not in in_project]
    budget = limit if limit is not None else cfg.max_items
    chosen = fresh[:budget] if budget is not None else fresh
    problems = {p["problem_id"]: p for p in read("problems", ROOT)}
    rollout_of = {r["rollout_id"]: r for r in rollouts}
    nodes = {n["node_id"]: n for n in read("nodes", *tree)}
    label_of = {row["node_id"]: row for row in labels}
    policy_id = ctx.config.consensus.policy_id
    tasks = [review.build_task(run, c, problems[c.problem_id], rollout_of[c.rollout_id], nodes, label_of, policy_id)
             for c in chosen]
    try:
        if tasks:
            client.projects.import_tasks(id=project_id, request=tasks)
            in_project = _items_in_project(client, project_id, cfg.page_size)
    except _server_errors() as exc:
        raise _unreachable(cfg, exc, "the next push finds and records whatever was imported") from exc
    now = time.time()
    by_rollout = {c.rollout_id: c for c in candidates}
    # Items in the project but not in the store: this push's, and any an interrupted push imported.
    items = []
    for rid, candidate in sorted(by_rollout.items()):
        iid = review.item_id(run, rid)
        if iid in in_project and iid not in recorded:
            items.append(ReviewItem(
                item_id=iid, rollout_id=rid, problem_id=candidate.problem_id, node_ids=rollout_of[rid]["node_ids"],
                reasons="+".join(candidate.reasons), project=title, project_id=project_id, task_id=int(in_project[iid]),
                prediction_policy=policy_id, pushed_at=now,
            ))
    if items:
        key = content_hash("review-push", review.VERSION, title, sorted(i.item_id for i in items))
        store.write_shard(run, review.STAGE, key, {"review_items": items, "evaluations": [], "rejects": []},
                          stats={"pushed": len(items), "project_id": project_id})
    reasons = Counter(reason for c in chosen for reason in c.reasons)
    return {
        "project": title, "project_id": project_id, "url": f"{cfg.url.rstrip('/')}/projects/{project_id}",
        "selected": len(candidates), "already_in_project": len(candidates) - len(fresh), "pushed": len(chosen),
        "left_for_next_push": len(fresh) - len(chosen), "recorded": len(items), "by_reason": dict(sorted(reasons.items())),
        "incomplete_shards": incomplete,
    }


# -- pull ----------------------------------------------------------------------------------
def _stored_versions(ctx) -> set[str]:
    """Annotation versions some review shard already holds, as evidence or as a reject."""
    manifests = ctx.store.manifests(ctx.run, review.STAGE)
    versions = {json.loads(row["meta"])["version"] for row in ctx.store.read_rows("evaluations", manifests)}
    versions |= {row["item"].removeprefix("annotation:") for row in ctx.store.read_rows("rejects", manifests)}
    return versions


def _annotators(client) -> dict[int, str]:
    try:
        return {int(u.id): (u.email or u.username or str(u.id)) for u in client.users.list()}
    except _server_errors():  # listing users may need rights an annotator token lacks: ids are still kept
        return {}


def pull(ctx, *, on_page: Callable[[int, int], None] | None = None) -> dict:
    """Store every annotation version not stored yet, one shard per page of tasks."""
    cfg: ReviewConfig = ctx.config.review
    store, run = ctx.store, ctx.run
    title = project_title(cfg, run)
    stored = _stored_versions(ctx)
    client = connect(cfg)
    new_evidence = new_rejects = pages = 0
    reasons: Counter = Counter()
    try:
        project_id = next((int(p.id) for p in client.projects.list(title=title) if p.title == title), None)
        if project_id is None:
            raise ReviewError(f"no Label Studio project {title!r} at {cfg.url}: push first (stepforge review push)")
        annotators = _annotators(client)
        for page in _tasks(client, project_id, cfg.page_size, only_annotated=True):
            pages += 1
            evidence, rejects, versions = [], [], []
            for task in page:
                for annotation in task.get("annotations") or []:
                    version = review.annotation_version(annotation)
                    if version in stored:
                        continue
                    versions.append(version)
                    who = annotation.get("completed_by")
                    who = who.get("email") if isinstance(who, dict) else annotators.get(who) if isinstance(who, int) else who
                    try:
                        evidence.extend(review.parse_annotation(task, annotation, annotator=who))
                    except AnnotationError as exc:
                        reasons[exc.reason] += 1
                        rejects.append(Reject(
                            stage=review.STAGE, item=f"annotation:{version}", reason=exc.reason,
                            detail=f"task {task.get('id')}: {exc}",
                            payload=json.dumps(annotation.get("result"), default=str)[:2000],
                        ))
            if versions:
                key = content_hash("review-pull", review.VERSION, title, sorted(versions))
                store.write_shard(run, review.STAGE, key, {"review_items": [], "evaluations": evidence, "rejects": rejects},
                                  stats={"annotations": len(versions), "reject_reasons": dict(Counter(r.reason for r in rejects))})
                stored.update(versions)
                new_evidence += len(evidence)
                new_rejects += len(rejects)
            if on_page is not None:
                on_page(pages, len(versions))
    except _server_errors() as exc:
        raise _unreachable(
            cfg, exc, f"{pages} page(s) finished before it and are stored ({new_evidence} step labels)"
        ) from exc
    return {"project": title, "pages": pages, "new_step_labels": new_evidence, "rejected_annotations": new_rejects,
            "reject_reasons": dict(reasons)}


# -- status --------------------------------------------------------------------------------
def status(ctx) -> dict:
    """What review has produced: items, annotations, agreement and conflicts, and how the automatic
    labels fare against humans on the audit sample and on everything reviewed."""

    items = ctx.review_items()
    human = ctx.human_review_rows()
    chains, _, _, _ = evidence_chains(ctx)
    # Automatic labels = the consensus policy without human override, recomputed from the same evidence.
    from stepforge.stages.consensus import policy as consensus

    auto_cfg = ctx.config.consensus.model_copy(update={"human_override": False})
    evidence = ctx.chain.stage(LABELS).reads
    evaluations = ctx.store.read_rows("evaluations", [c[s] for c in chains for s in evidence["evaluations"]])
    nodes = (ctx.store.read_rows("nodes", [c[s] for c in chains for s in evidence["nodes"]])
             if auto_cfg.propagate_errors else [])
    automatic = {lab.node_id: lab.label for lab in consensus.run(evaluations, auto_cfg, nodes) if isinstance(lab, Label)}
    audit_nodes = {nid for item in items if "audit" in item["reasons"].split("+") for nid in item["node_ids"]}
    compared = {"audit": Counter(), "all": Counter()}
    by_node: dict[str, list[dict]] = {}
    for row in human:
        by_node.setdefault(row["node_id"], []).append(row)
    for nid, rows in by_node.items():
        if nid not in automatic:
            continue
        majority = consensus.human_opinion(rows).label  # what the human override makes of them
        for scope in ("all", "audit") if nid in audit_nodes else ("all",):
            compared[scope]["steps"] += 1
            compared[scope]["agree"] += automatic[nid] == majority
    agreement = review.agreement(human)
    annotations = {json.loads(r["meta"])["annotation_id"] for r in human}
    rejects = ctx.store.read_rows("rejects", ctx.store.manifests(ctx.run, review.STAGE))
    return {
        "items": len(items), "items_by_reason": dict(Counter(r for i in items for r in i["reasons"].split("+"))),
        "annotations": len(annotations), "step_labels": len(human), "steps_reviewed": len(by_node),
        "rejected_annotations": dict(Counter(r["reason"] for r in rejects)),
        "multi_annotated_steps": agreement.steps_multi, "pairwise_agreement": agreement.pairwise,
        "krippendorff_alpha": agreement.alpha, "conflicts": agreement.conflicts,
        "automatic_vs_human": {
            scope: {"steps": c["steps"], "accuracy": (c["agree"] / c["steps"]) if c["steps"] else None}
            for scope, c in compared.items()
        },
    }


# -- flows ---------------------------------------------------------------------------------
@flow(name="review-push", log_prints=True)
def review_push(run: str, store: str = "stepforge-data") -> dict:
    """Send the trajectories the run's review policies select to its Label Studio project (idempotent)."""
    from stepforge.flows.runtime import open_run

    with open_run(store, run) as ctx:
        summary = push(ctx)
    print(f"pushed {summary['pushed']} trajectories to {summary['url']} ({summary['already_in_project']} already there)")
    return summary


@flow(name="review-pull", log_prints=True)
def review_pull(run: str, store: str = "stepforge-data", rerun: bool = True) -> dict:
    """Read every new or changed annotation of the run's Label Studio project into a review shard; with
    ``rerun``, re-run consensus, pairs, filter and export over the shards whose human labels changed."""
    from stepforge.flows.backfill import backfill_run
    from stepforge.flows.runtime import open_run

    with open_run(store, run) as ctx:
        summary = pull(ctx)
    print(f"pulled {summary['new_step_labels']} step labels, {summary['rejected_annotations']} annotations rejected")
    if rerun and (summary["new_step_labels"] or summary["rejected_annotations"]):
        summary["backfill"] = backfill_run(Path(store), run)  # the default: labels and what derives from them
    return summary
