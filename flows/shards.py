"""One function per stage that runs it over one shard: read inputs, run the stage, write the shard.

These are plain functions (Prefect wraps them in ``synthesize``), so they are testable and
reusable from any executor. Each is idempotent: a shard whose completion marker exists is
returned as is. Shard keys are content hashes of the input shard keys, the stage's config,
the model and the stage version — never of worker counts or run order.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stepforge.flows.config import RunConfig
from stepforge.flows.progress import reporter
from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Problem, Record, Reject
from stepforge.stages import (
    agent_pairs,
    augment,
    binary_search,
    consensus,
    export,
    ingest,
    mc_label,
    mcts,
    pairs,
    review,
    rollout,
    step_filter,
    verify,
)
from stepforge.stages.answers import AnswerChecker
from stepforge.stages.llm import GenerationCache, GenerationClient, backend_model_id, load_backend
from stepforge.storage.shards import ShardManifest, ShardStore, write_json_atomic

STAGE_TABLES = {
    # Imported datasets (ProcessBench, PRM800K, Math-Shepherd) bring their trajectories and labels.
    "ingest": ("problems", "rollouts", "nodes", "evaluations", "rejects"),
    "rollout": ("rollouts", "nodes", "rejects"),
    "mc_label": ("evaluations", "rollouts", "nodes", "rejects"),
    "binary_search": ("evaluations", "rollouts", "nodes", "rejects"),
    "mcts": ("evaluations", "rollouts", "nodes", "rejects"),
    "no_label": ("evaluations", "rollouts", "nodes", "rejects"),
    "verify": ("evaluations", "rejects"),
    "consensus": ("labels", "rejects"),
    "pairs": ("pairs", "rejects"),
    # Agent trajectories: step decisions, written reasoning, and better actions with their grades and pairs.
    "filter": ("step_filter", "augmentations", "nodes", "evaluations", "pairs", "rejects"),
    # Human review (flows/review.py), run-level: what was pushed, and the annotations pulled back.
    "review": ("review_items", "evaluations", "rejects"),
}


@contextlib.contextmanager
def open_run(store: str | Path, run: str) -> Iterator["RunContext"]:
    """The RunContext of a stored run (its recorded config), closed when the block ends."""
    ctx = RunContext(load_run_config(Path(store), run))
    try:
        yield ctx
    finally:
        ctx.close()


@dataclass
class RunContext:
    """What the stages of one run share in one process: the store, the model client, the checker."""

    config: RunConfig
    store: ShardStore = field(init=False)
    checker: AnswerChecker = field(default_factory=AnswerChecker)
    _client: GenerationClient | None = None
    _judge_client: GenerationClient | None = None
    _writer_client: GenerationClient | None = None
    _review: tuple[tuple[str, ...], dict[str, list[dict]]] | None = None

    def __post_init__(self) -> None:
        self.store = ShardStore(self.config.store)

    @property
    def run(self) -> str:
        return self.config.run

    @property
    def model_id(self) -> str:
        return backend_model_id(self.config.backend)

    def client(self) -> GenerationClient:
        if self._client is None:
            self._client = GenerationClient(load_backend(self.config.backend), self._cache())
        return self._client

    def judge_client(self) -> GenerationClient:
        """The judge's client: the policy's, unless ``verify.judge_backend`` names another model."""
        judge_backend = self.config.verify.judge_backend
        if judge_backend is None or judge_backend == self.config.backend:
            return self.client()
        if self._judge_client is None:
            # One cache file for both: keys include the model id, so they never collide.
            self._judge_client = GenerationClient(load_backend(judge_backend), self._cache())
        return self._judge_client

    def writer_backend(self):
        """The reasoning writer's backend config: augment_backend, else the judge's, else the policy's."""
        return self.config.augment_backend or self.config.verify.judge_backend or self.config.backend

    def writer_client(self) -> GenerationClient:
        backend = self.writer_backend()
        if backend == self.config.backend:
            return self.client()
        if backend == self.config.verify.judge_backend:
            return self.judge_client()
        if self._writer_client is None:
            self._writer_client = GenerationClient(load_backend(backend), self._cache())
        return self._writer_client

    def _cache(self) -> GenerationCache:
        return GenerationCache(self.store.root / "cache" / "generations.sqlite")

    def close(self) -> None:
        self.checker.close()


def _by_table(records: Iterable[Record], tables: tuple[str, ...]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {t: [] for t in tables}
    for record in records:
        grouped[record.TABLE].append(record)
    return grouped


def _write(ctx: RunContext, stage: str, key: str, records: Iterable[Record], inputs: list[str], **stats) -> ShardManifest:
    started = time.perf_counter()
    clients = {
        "generation": lambda: ctx._client, "judge_generation": lambda: ctx._judge_client,
        "writer_generation": lambda: ctx._writer_client,
    }
    before = {name: (c().counters() if c() else {}) for name, c in clients.items()}
    grouped = _by_table(records, STAGE_TABLES[stage])
    for name, current in clients.items():
        if (client := current()) is not None:
            after = client.counters()
            delta = {k: round(v - before[name].get(k, 0), 6) for k, v in after.items()}
            if delta["samples"]:
                stats[name] = {k: v for k, v in delta.items() if v or k in GenerationClient.COUNTED}
    stats["reject_reasons"] = dict(Counter(r.reason for r in grouped.get("rejects", []) if isinstance(r, Reject)))
    stats["seconds"] = round(time.perf_counter() - started, 3)
    stats["worker"] = f"{socket.gethostname()}:{os.getpid()}"  # which process (Ray worker, host) made it
    return ctx.store.write_shard(ctx.run, stage, key, grouped, inputs=inputs, stats=stats)


def _problems(ctx: RunContext, shard: ShardManifest) -> list[Problem]:
    return [Problem(**row) for row in ctx.store.read_rows("problems", [shard])]


# -- ingest ------------------------------------------------------------------------------
def ingest_shards(ctx: RunContext) -> tuple[list[ShardManifest], ShardManifest]:
    """Problem shards of ``shard_size`` problems each (keyed by their content), and the rejects shard.

    An imported dataset's trajectories and labels travel in the shard of their problem.
    """
    cfg = ctx.config
    problems: list[Problem] = []
    rejects: list[Reject] = []
    imported: dict[str, list[Record]] = {}
    for record in ingest.run(cfg.ingest):
        if isinstance(record, Problem):
            problems.append(record)
        elif isinstance(record, Reject):
            rejects.append(record)
        else:
            imported.setdefault(record.problem_id, []).append(record)
    manifests = []
    for start in range(0, len(problems), cfg.shard_size):
        chunk = problems[start : start + cfg.shard_size]
        records = [r for p in chunk for r in imported.get(p.problem_id, [])]
        parts = [[p.model_dump() for p in chunk]]
        if records:  # a shard of plain problems keeps the key it always had
            parts.append([(r.TABLE, r.model_dump()) for r in records])
        key = content_hash("ingest", ingest.VERSION, *parts)
        manifest = ctx.store.manifest(ctx.run, "ingest", key)
        if manifest is None:
            tables = _by_table(records, STAGE_TABLES["ingest"])
            tables.update(problems=chunk, rejects=[])
            manifest = ctx.store.write_shard(ctx.run, "ingest", key, tables)
        manifests.append(manifest)
    reject_key = content_hash("ingest-rejects", ingest.VERSION, [r.model_dump() for r in rejects])
    reject_manifest = ctx.store.manifest(ctx.run, "ingest", reject_key) or ctx.store.write_shard(
        ctx.run, "ingest", reject_key, {"problems": [], "rejects": rejects},
        stats={"reject_reasons": dict(Counter(r.reason for r in rejects))},
    )
    return manifests, reject_manifest


# -- keys --------------------------------------------------------------------------------
def _engine(ctx: RunContext) -> tuple[str, int]:
    """What of the engine shapes a shard's rows: the weights, and the context size (what fits)."""
    return ctx.model_id, ctx.config.backend.n_ctx


def rollout_key(ctx: RunContext, problem_shard: str) -> str:
    return content_hash("rollout", rollout.VERSION, problem_shard, _engine(ctx), ctx.config.rollout.model_dump())


LABELLERS = {"mc": mc_label, "binary_search": binary_search, "mcts": mcts}
"""The labeller modules by config name; each writes evaluations, rollouts, nodes and rejects."""
NO_LABEL_STAGE = "no_label"


def label_stage(ctx: RunContext) -> str:
    """The chosen labeller's stage name: its shards live under ``stage=<name>``."""
    if ctx.config.labeller == "none":
        return NO_LABEL_STAGE
    return LABELLERS[ctx.config.labeller].STAGE


def label_key(ctx: RunContext, rollout_shard: str) -> str:
    if ctx.config.labeller == "none":
        return content_hash(NO_LABEL_STAGE, 1, rollout_shard)
    module = LABELLERS[ctx.config.labeller]
    return content_hash(module.STAGE, module.VERSION, rollout_shard, _engine(ctx), ctx.config.labeller_config.model_dump())


def verify_key(ctx: RunContext, label_shard: str) -> str:
    """Only the verifiers that run enter the key: a tool-only shard never loads the judge's model,
    and changing the judge's settings does not redo it."""
    cfg = ctx.config.verify
    parts: dict = {"sources": list(cfg.sources)}
    if "tool" in cfg.sources:
        parts["tool"] = cfg.tool.model_dump(mode="json", exclude={"code_workers"})
    # Agent settings enter only when changed, so stores made before they existed keep their keys.
    for section in ("agent_tool", "agent_judge"):
        source = "tool" if section == "agent_tool" else "judge"
        current = getattr(cfg, section)
        if source in cfg.sources and current != type(current)():
            parts[section] = current.model_dump(mode="json")
    if "judge" in cfg.sources:
        judge_backend = cfg.judge_backend or ctx.config.backend
        parts["judge"] = cfg.judge.model_dump(mode="json")
        # Named, not loaded: `stepforge export` computes every key and must not load a judge model.
        parts["judge_engine"] = (backend_model_id(judge_backend), judge_backend.n_ctx)
    return content_hash("verify", verify.VERSION, label_shard, parts)


def consensus_key(ctx: RunContext, verify_shard: str, human: list[dict] = ()) -> str:
    """Human review evidence enters only where there is some: a shard nobody reviewed keeps its key,
    and a new annotation re-labels just the shard of its problem."""
    parts: list = [verify_shard, ctx.config.consensus.model_dump()]
    if human:
        parts.append(sorted((row["evaluation_id"], row["verdict"], json.loads(row["meta"])["version"]) for row in human))
    return content_hash("consensus", consensus.VERSION, *parts)


def pairs_key(ctx: RunContext, label_shard: str) -> str:
    return content_hash("pairs", pairs.VERSION, label_shard, ctx.config.pairs.model_dump())


def filter_key(ctx: RunContext, consensus_shard: str) -> str:
    """The filter is pure; the writer and the alternatives enter the key only when they run."""
    cfg = ctx.config
    parts: dict = {"filter": cfg.filter.model_dump(mode="json")}
    if cfg.augment.enabled:
        writer = ctx.writer_backend()
        parts["augment"] = (cfg.augment.model_dump(mode="json"), backend_model_id(writer), writer.n_ctx)
    if cfg.agent_pairs.enabled:
        judge_backend = cfg.verify.judge_backend or cfg.backend
        parts["agent_pairs"] = (
            cfg.agent_pairs.model_dump(mode="json"), _engine(ctx), cfg.verify.agent_judge.model_dump(mode="json"),
            backend_model_id(judge_backend), judge_backend.n_ctx,
        )
    return content_hash("filter", step_filter.VERSION, consensus_shard, parts)


def chain_keys(ctx: RunContext, problem_shard: str) -> dict[str, str]:
    """The key of every stage's shard downstream of one problem shard, under this run's config."""
    keys = {"rollout": rollout_key(ctx, problem_shard)}
    keys["label"] = label_key(ctx, keys["rollout"])
    keys["verify"] = verify_key(ctx, keys["label"])
    keys["consensus"] = consensus_key(ctx, keys["verify"], shard_review(ctx, problem_shard))
    keys["pairs"] = pairs_key(ctx, keys["consensus"])
    keys["filter"] = filter_key(ctx, keys["consensus"])
    return keys


def completed_chains(ctx: RunContext) -> tuple[list[dict[str, ShardManifest]], int, ShardManifest]:
    """The complete shard chains of the current config (ingest → pairs, filter), how many are
    incomplete, and the ingest rejects shard (read from the same pass over the source).

    Shards an earlier config of the same run left behind are not part of any chain, so an
    export never mixes label policies or counts a problem twice.
    """
    chains, reject_shard = current_chains(ctx)
    complete = [chain for chain in chains if all(chain.values())]
    return complete, len(chains) - len(complete), reject_shard


def current_chains(ctx: RunContext) -> tuple[list[dict[str, ShardManifest | None]], ShardManifest]:
    """Every problem shard's chain under the current config, None in the slots not computed yet
    (e.g. consensus after a review pull brought new human labels), and the ingest rejects shard."""
    chains = []
    problem_shards, reject_shard = ingest_shards(ctx)
    for problem_shard in problem_shards:
        chain: dict[str, ShardManifest | None] = {"ingest": problem_shard}
        for slot, key in chain_keys(ctx, problem_shard.shard).items():
            chain[slot] = ctx.store.manifest(ctx.run, label_stage(ctx) if slot == "label" else slot, key)
        chains.append(chain)
    return chains, reject_shard


# -- human review --------------------------------------------------------------------------
def human_review(ctx: RunContext) -> dict[str, list[dict]]:
    """problem_id → the run's human review evidence as it stands (each annotation's latest version),
    re-read whenever a pull has written a review shard since the last call."""
    manifests = ctx.store.manifests(ctx.run, review.STAGE)
    version = tuple(m.shard for m in manifests)
    if ctx._review is None or ctx._review[0] != version:
        by_problem: dict[str, list[dict]] = {}
        for row in review.latest(ctx.store.read_rows("evaluations", manifests)):
            by_problem.setdefault(row["problem_id"], []).append(row)
        ctx._review = (version, by_problem)
    return ctx._review[1]


def human_review_rows(ctx: RunContext) -> list[dict]:
    return [row for rows in human_review(ctx).values() for row in rows]


def shard_review(ctx: RunContext, problem_shard: str) -> list[dict]:
    """The human review evidence on the problems of one problem shard."""
    evidence = human_review(ctx)
    if not evidence:
        return []
    manifest = ctx.store.manifest(ctx.run, "ingest", problem_shard)
    if manifest is None:
        return []
    problem_ids = ctx.store.read("problems", [manifest]).column("problem_id").to_pylist()
    return [row for pid in sorted(set(problem_ids)) for row in evidence.get(pid, [])]


def review_items(ctx: RunContext) -> list[dict]:
    """Every trajectory pushed to review (first push wins for an item recorded twice)."""
    rows = ctx.store.read_rows("review_items", ctx.store.manifests(ctx.run, review.STAGE))
    first: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["pushed_at"]):
        first.setdefault(row["item_id"], row)
    return list(first.values())


def run_record_path(store: str | Path, run: str) -> Path:
    return Path(store) / "runs" / f"{run}.json"


def load_run_record(store: str | Path, run: str) -> dict:
    """A run's record (``record_run``); FileNotFoundError naming the run when there is none."""
    path = run_record_path(store, run)
    if not path.exists():
        raise FileNotFoundError(f"no run {run!r} in {store} (no {path})")
    return json.loads(path.read_text())


def load_run_config(store: str | Path, run: str) -> RunConfig:
    """The config a run was last made with (its record under ``<store>/runs``), with ``store`` as given."""
    return RunConfig.model_validate({**load_run_record(store, run)["config"], "store": str(store)})


# -- stages over one shard ---------------------------------------------------------------
def rollout_shard(ctx: RunContext, key: str, problem_shard: ShardManifest) -> ShardManifest:
    if (done := ctx.store.manifest(ctx.run, "rollout", key)) is not None:
        return done
    if ctx.config.rollout.samples_per_problem == 0:  # imported solutions only: no model needed
        return _write(ctx, "rollout", key, [], [problem_shard.shard])
    problems = _problems(ctx, problem_shard)
    with reporter().track(f"rollouts {problem_shard.shard[:8]}", len(problems)) as advance:
        records = rollout.run(problems, ctx.config.rollout, ctx.client(), ctx.checker, on_problem_done=advance)
        return _write(ctx, "rollout", key, records, [problem_shard.shard])


def label_shard(ctx: RunContext, key: str, problem_shard: ShardManifest, rollout_manifest: ShardManifest) -> ShardManifest:
    """The chosen labeller over one shard of policy rollouts."""
    stage = label_stage(ctx)
    if (done := ctx.store.manifest(ctx.run, stage, key)) is not None:
        return done
    if ctx.config.labeller == "none":
        return _write(ctx, stage, key, [], [rollout_manifest.shard])
    problems = _problems(ctx, problem_shard)
    tree = [problem_shard, rollout_manifest]  # imported trajectories live in the ingest shard
    rollouts = ctx.store.read_rows("rollouts", tree)
    nodes = ctx.store.read_rows("nodes", tree)
    inputs = (problems, rollouts, nodes, ctx.config.labeller_config, ctx.client(), ctx.checker)
    if ctx.config.labeller == "mc":
        prefixes = {nid for r in rollouts for nid in r["node_ids"][:-1]}
        with reporter().track(f"mc labels {problem_shard.shard[:8]}", len(prefixes)) as advance:
            return _write(ctx, stage, key, mc_label.run(*inputs, on_step_done=advance), [rollout_manifest.shard])
    module = LABELLERS[ctx.config.labeller]
    with reporter().track(f"{stage} {problem_shard.shard[:8]}", len(problems)) as advance:
        return _write(ctx, stage, key, module.run(*inputs, on_problem_done=advance), [rollout_manifest.shard])


def verify_shard(
    ctx: RunContext, key: str, problem_shard: ShardManifest, rollout_manifest: ShardManifest, label_manifest: ShardManifest
) -> ShardManifest:
    """The configured verifiers (tool checks, judge) over every trajectory of one shard."""
    if (done := ctx.store.manifest(ctx.run, "verify", key)) is not None:
        return done
    tree = [problem_shard, rollout_manifest, label_manifest]
    problems = _problems(ctx, problem_shard)
    with reporter().track(f"verify {problem_shard.shard[:8]}", len(problems)) as advance:
        records = verify.run(
            problems, ctx.store.read_rows("rollouts", tree), ctx.store.read_rows("nodes", tree), ctx.config.verify,
            ctx.judge_client, ctx.checker, on_problem_done=advance,
        )
        return _write(ctx, "verify", key, records, [label_manifest.shard])


def consensus_shard(
    ctx: RunContext,
    key: str,
    problem_shard: ShardManifest,
    rollout_manifest: ShardManifest,
    label_manifest: ShardManifest,
    verify_manifest: ShardManifest,
) -> ShardManifest:
    """Labels from every piece of evidence on the shard's tree: imported, labeller's, verifiers'."""
    if (done := ctx.store.manifest(ctx.run, "consensus", key)) is not None:
        return done
    evaluations = ctx.store.read_rows("evaluations", [problem_shard, label_manifest, verify_manifest])
    evaluations += shard_review(ctx, problem_shard.shard)
    nodes = (
        ctx.store.read_rows("nodes", [problem_shard, rollout_manifest, label_manifest])
        if ctx.config.consensus.propagate_errors else []
    )
    records = consensus.run(evaluations, ctx.config.consensus, nodes)
    return _write(ctx, "consensus", key, records, [verify_manifest.shard])


def pairs_shard(
    ctx: RunContext,
    key: str,
    problem_shard: ShardManifest,
    rollout_manifest: ShardManifest,
    label_stage_manifest: ShardManifest,
    label_manifest: ShardManifest,
) -> ShardManifest:
    if (done := ctx.store.manifest(ctx.run, "pairs", key)) is not None:
        return done
    tree = [problem_shard, rollout_manifest, label_stage_manifest]
    records = pairs.run(
        _problems(ctx, problem_shard),
        ctx.store.read_rows("rollouts", tree),
        ctx.store.read_rows("nodes", tree),
        ctx.store.read_rows("labels", [label_manifest]),
        ctx.config.pairs,
    )
    return _write(ctx, "pairs", key, records, [label_manifest.shard])


def filter_shard(
    ctx: RunContext,
    key: str,
    problem_shard: ShardManifest,
    rollout_manifest: ShardManifest,
    label_stage_manifest: ShardManifest,
    verify_manifest: ShardManifest,
    label_manifest: ShardManifest,
) -> ShardManifest:
    """Agent trajectories: step filtering, reasoning for the kept steps, better actions at wrong ones.

    A shard without agent problems is written empty without loading a model.
    """
    if (done := ctx.store.manifest(ctx.run, "filter", key)) is not None:
        return done
    cfg = ctx.config
    from stepforge.stages.agent import is_agent_problem

    problems = [p for p in _problems(ctx, problem_shard) if is_agent_problem(p)]
    if not problems:
        return _write(ctx, "filter", key, [], [label_manifest.shard])
    tree = [problem_shard, rollout_manifest, label_stage_manifest]
    rollouts = ctx.store.read_rows("rollouts", tree)
    nodes = ctx.store.read_rows("nodes", tree)
    labels = ctx.store.read_rows("labels", [label_manifest])
    evaluations = ctx.store.read_rows("evaluations", [problem_shard, label_stage_manifest, verify_manifest])
    decisions = list(step_filter.run(problems, rollouts, labels, evaluations, cfg.filter))
    records: list[Record] = list(decisions)
    if cfg.augment.enabled:
        kept = [d.node_id for d in decisions if d.kept]
        with reporter().track(f"reasoning {problem_shard.shard[:8]}", len(set(kept))):
            records.extend(augment.run(problems, nodes, kept, cfg.augment, ctx.writer_client()))
    if cfg.agent_pairs.enabled:
        with reporter().track(f"agent pairs {problem_shard.shard[:8]}", len(problems)):
            records.extend(
                agent_pairs.run(problems, rollouts, nodes, labels, cfg.agent_pairs, cfg.verify.agent_judge,
                                ctx.client(), ctx.judge_client())
            )
    return _write(ctx, "filter", key, records, [label_manifest.shard])


def run_chain(ctx: RunContext, problem_shard: ShardManifest) -> dict[str, ShardManifest]:
    """Every stage over one problem shard, without Prefect (benchmarks, other executors)."""
    keys = chain_keys(ctx, problem_shard.shard)
    chain = {"ingest": problem_shard}
    chain["rollout"] = rollout_shard(ctx, keys["rollout"], problem_shard)
    chain["label"] = label_shard(ctx, keys["label"], problem_shard, chain["rollout"])
    chain["verify"] = verify_shard(ctx, keys["verify"], problem_shard, chain["rollout"], chain["label"])
    chain["consensus"] = consensus_shard(
        ctx, keys["consensus"], problem_shard, chain["rollout"], chain["label"], chain["verify"]
    )
    chain["pairs"] = pairs_shard(
        ctx, keys["pairs"], problem_shard, chain["rollout"], chain["label"], chain["consensus"]
    )
    chain["filter"] = filter_shard(
        ctx, keys["filter"], problem_shard, chain["rollout"], chain["label"], chain["verify"], chain["consensus"]
    )
    return chain


# -- export ------------------------------------------------------------------------------
def export_run(ctx: RunContext, chains: list[dict[str, ShardManifest]], reject_shard: ShardManifest) -> list[dict]:
    """The datasets of the given shard chains (export only reads: re-runnable at will); the card
    counts the ingest rejects of ``reject_shard`` too."""
    store = ctx.store

    def read(table: str, *stages: str):
        return store.read(table, [chain[stage] for chain in chains if all(s in chain for s in stages) for stage in stages])

    return list(
        export.run(
            ctx.config.export,
            problems=read("problems", "ingest"),
            rollouts=read("rollouts", "ingest", "rollout", "label"),
            nodes=read("nodes", "ingest", "rollout", "label", "filter"),
            labels=read("labels", "consensus"),
            pairs=read("pairs", "pairs"),
            step_filter=read("step_filter", "filter"),
            augmentations=read("augmentations", "filter"),
            agent_pairs=read("pairs", "filter"),
            provenance=run_provenance(ctx, chains, reject_shard),
        )
    )


def _shard_key(manifest: ShardManifest | dict) -> str:
    """A shard's key from its manifest, or from the dict form Prefect tasks pass around."""
    return manifest.shard if isinstance(manifest, ShardManifest) else manifest["shard"]


def chain_shard_keys(chains: list[dict], reject_shard: ShardManifest | dict) -> set[str]:
    """The shard keys the run's current config reads: its chains and the ingest rejects."""
    return {_shard_key(m) for chain in chains for m in chain.values()} | {_shard_key(reject_shard)}


def figure_shard_keys(ctx: RunContext, chains: list[dict], reject_shard: ShardManifest | dict) -> set[str]:
    """What a card, report or artifact counts: the current chains, the ingest rejects, and the run's
    review shards (pushed items, every pulled annotation version, rejected annotations)."""
    return chain_shard_keys(chains, reject_shard) | {m.shard for m in ctx.store.manifests(ctx.run, review.STAGE)}


def run_provenance(ctx: RunContext, chains: list[dict[str, ShardManifest]], reject_shard: ShardManifest) -> dict:
    """What the dataset card says about how the data was made: the run's key figures over exactly
    these chains (the DuckDB catalog restricted to their shards), the config, and the traffic."""
    from stepforge.flows.figures import run_figures

    # The run record's traffic is written after the export; the chains' manifests already hold it.
    traffic = shard_traffic([{slot: asdict(m) for slot, m in chain.items()} for chain in chains])
    figures = run_figures(ctx.store.root, ctx.run, figure_shard_keys(ctx, chains, reject_shard), traffic=traffic)
    return {"figures": figures, "config": ctx.config.model_dump(mode="json")}


def shard_traffic(chains: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Generation counts summed over the shards of these chains, from their manifests: what producing
    the run's data cost (requests, retries and give-ups by reason, tokens, cost), whichever process
    or Ray worker produced each shard, and however many times the run was resumed."""
    totals: dict[str, Counter] = {}
    for chain in chains:
        for manifest in chain.values():
            for client in ("generation", "judge_generation", "writer_generation"):
                if counts := (manifest.get("stats") or {}).get(client):
                    totals.setdefault(client, Counter()).update(counts)
    return {client: {k: round(v, 6) for k, v in sorted(counts.items())} for client, counts in totals.items()}


def record_run(
    ctx: RunContext, status: str, exports: list[dict] | None = None, traffic: dict | None = None,
    chains: list[dict] | None = None,
) -> dict:
    """The run's record: config, status, exported datasets, this process's generation counts, and the
    shard key of every chain slot (what a later backfill compares its labels with).

    ``stepforge export`` re-reads the config from it; the counts say what the last invocation
    paid for (generated) and replayed (cache_hits).
    """
    record = {
        "run": ctx.run, "created_at": time.time(), "status": status,
        "config": ctx.config.model_dump(mode="json"), "exports": exports or [],
        "generation": {**ctx._client.stats.as_dict(), **ctx._client.counters()} if ctx._client else {},
        "traffic": traffic or {},
        "chains": {
            _shard_key(c["ingest"]): {slot: _shard_key(m) for slot, m in c.items() if slot != "ingest"} for c in chains or []
        },
    }
    write_json_atomic(run_record_path(ctx.store.root, ctx.run), record)
    return record
