"""The ``synthesize`` flow: ingest → rollout → label (mc / binary_search / mcts / none) → verify → consensus → pairs
and filter (agent trajectories) → export.

Shards run one after another in this process, or, with a ``ray`` section, as tasks on a Ray
cluster through Prefect's Ray task runner (a subflow, so the same flow and parameters serve
both): each shard's chain waits only for its own upstream, and every worker process loads
the model once and keeps it for the shards it is given.

Thin by design: every task body is a function of ``flows.shards``. Tasks pass shard
manifests (small dicts naming Parquet files), never data. Each task's Prefect cache key is
the run name plus the shard's content key (input shard hash + config hash + model + stage
version), its result is persisted under the store, and the shard's own completion marker
makes the work idempotent even outside Prefect.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, task
from prefect.futures import PrefectFuture

from stepforge.flows import shards
from stepforge.flows.artifacts import publish_artifacts
from stepforge.flows.figures import run_figures
from stepforge.flows.config import RayConfig, RunConfig
from stepforge.storage.shards import ShardManifest

_contexts: dict[str, shards.RunContext] = {}


def _context(config: dict) -> shards.RunContext:
    """One RunContext per run config per process: the model and caches load once."""
    cfg = RunConfig.model_validate(config)
    key = cfg.model_dump_json()
    if key not in _contexts:
        _contexts[key] = shards.RunContext(cfg)
    return _contexts[key]


def _manifest(data: dict) -> ShardManifest:
    return ShardManifest(**data)




@task(name="rollout")
def rollout_task(config: dict, key: str, problem_shard: dict) -> dict:
    return asdict(shards.rollout_shard(_context(config), key, _manifest(problem_shard)))


@task(name="label")
def label_task(config: dict, key: str, problem_shard: dict, rollout_shard: dict) -> dict:
    ctx = _context(config)
    return asdict(shards.label_shard(ctx, key, _manifest(problem_shard), _manifest(rollout_shard)))


@task(name="verify")
def verify_task(config: dict, key: str, problem_shard: dict, rollout_shard: dict, label_shard: dict) -> dict:
    ctx = _context(config)
    return asdict(
        shards.verify_shard(ctx, key, _manifest(problem_shard), _manifest(rollout_shard), _manifest(label_shard))
    )


@task(name="consensus")
def consensus_task(
    config: dict, key: str, problem_shard: dict, rollout_shard: dict, label_shard: dict, verify_shard: dict
) -> dict:
    ctx = _context(config)
    manifests = (_manifest(m) for m in (problem_shard, rollout_shard, label_shard, verify_shard))
    return asdict(shards.consensus_shard(ctx, key, *manifests))


@task(name="pairs")
def pairs_task(config: dict, key: str, problem_shard: dict, rollout_shard: dict, mc_shard: dict, label_shard: dict) -> dict:
    ctx = _context(config)
    return asdict(
        shards.pairs_shard(
            ctx, key, _manifest(problem_shard), _manifest(rollout_shard), _manifest(mc_shard), _manifest(label_shard)
        )
    )


@task(name="filter")
def filter_task(
    config: dict, key: str, problem_shard: dict, rollout_shard: dict, mc_shard: dict, verify_shard: dict, label_shard: dict
) -> dict:
    ctx = _context(config)
    manifests = (_manifest(m) for m in (problem_shard, rollout_shard, mc_shard, verify_shard, label_shard))
    return asdict(shards.filter_shard(ctx, key, *manifests))


@task(name="ingest")
def ingest_task(config: dict) -> tuple[list[dict], dict]:
    problem_shards, reject_shard = shards.ingest_shards(_context(config))
    return [asdict(m) for m in problem_shards], asdict(reject_shard)


@task(name="export")
def export_task(config: dict, chains: list[dict[str, dict]], reject_shard: dict) -> list[dict]:
    loaded = [{stage: _manifest(m) for stage, m in chain.items()} for chain in chains]
    return shards.export_run(_context(config), loaded, _manifest(reject_shard))


def _cached(task_fn, ctx: shards.RunContext):
    """The task with a persisted, explicitly keyed result under the run's store.

    The key is ``<run>-<shard key>`` (content hashes; the run name partitions the store, so it
    partitions the cache too), offered only while the shard's completion marker exists: a
    cached manifest must never point at shards someone has deleted. So the first run of a
    shard persists its result unkeyed, and Prefect serves it from its cache from the next run on.
    """
    stage, store, run = task_fn.name, ctx.store, ctx.run  # not ctx: Ray pickles the task, ctx holds locks

    def cache_key(_task_context, parameters: dict) -> str | None:
        if store.manifest(run, stage, parameters["key"]) is None:
            return None
        return f"{run}-{parameters['key']}"

    # A Path (not an unsaved block) is Prefect's way to say "local directory" without a server-side block.
    return task_fn.with_options(
        cache_key_fn=cache_key, persist_result=True, result_storage=store.root / "prefect-results",
    )


def _chains(config: dict, problem_shards: list[dict], submit: bool) -> list[dict[str, dict]]:
    """Every stage over every problem shard. With ``submit`` the tasks go to the flow's task runner
    (Ray), each waiting only for its own shard's upstream; otherwise they run one after another here."""
    ctx = _context(config)
    # The label task takes its labeller's stage name: its shards and cache keys live under it.
    labeller_task = label_task.with_options(name=shards.label_stage(ctx))
    tasks = [_cached(t, ctx) for t in (rollout_task, labeller_task, verify_task, consensus_task, pairs_task, filter_task)]
    rollout_t, label_t, verify_t, consensus_t, pairs_t, filter_t = (t.submit if submit else t for t in tasks)
    chains = []
    for problem_shard in problem_shards:
        keys = shards.chain_keys(ctx, problem_shard["shard"])
        rollout_m = rollout_t(config, keys["rollout"], problem_shard)
        evidence_m = label_t(config, keys["label"], problem_shard, rollout_m)
        verify_m = verify_t(config, keys["verify"], problem_shard, rollout_m, evidence_m)
        label_m = consensus_t(config, keys["consensus"], problem_shard, rollout_m, evidence_m, verify_m)
        pairs_m = pairs_t(config, keys["pairs"], problem_shard, rollout_m, evidence_m, label_m)
        filter_m = filter_t(config, keys["filter"], problem_shard, rollout_m, evidence_m, verify_m, label_m)
        chains.append(
            {"ingest": problem_shard, "rollout": rollout_m, "label": evidence_m, "verify": verify_m,
             "consensus": label_m, "pairs": pairs_m, "filter": filter_m}
        )
    return [{slot: (m.result() if isinstance(m, PrefectFuture) else m) for slot, m in chain.items()} for chain in chains]


@flow(name="shards-on-ray")
def _chains_on_ray(config: dict, problem_shards: list[dict]) -> list[dict[str, dict]]:
    ray = _context(config).config.ray
    if ray.task_gpus:
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=ray.task_gpus):
            return _chains(config, problem_shards, submit=True)
    return _chains(config, problem_shards, submit=True)


def ray_task_runner(ray: RayConfig):
    """Prefect's Ray task runner for ``ray``: a local cluster when no address is given."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ImportError("running on Ray needs prefect-ray: pip install 'stepforge[ray]'") from exc
    init: dict = {"include_dashboard": False, "ignore_reinit_error": True}
    if ray.address is None:
        init["num_cpus"] = ray.num_cpus
        init["num_gpus"] = ray.num_gpus
    if ray.runtime_env:
        init["runtime_env"] = ray.runtime_env
    return RayTaskRunner(address=ray.address, init_kwargs={k: v for k, v in init.items() if v is not None})


@flow(name="synthesize", log_prints=True)
def synthesize(config: dict) -> dict:
    """Run every stage over every shard of the configured problems; return a summary of the run."""
    ctx = _context(config)
    shards.record_run(ctx, "running")
    try:
        problem_shards, reject_shard = ingest_task(config)
        if ctx.config.ray is not None:
            # Workers open the store by path: a relative one would resolve against their own directory.
            config = {**config, "store": str(ctx.store.root)}
            chains = _chains_on_ray.with_options(task_runner=ray_task_runner(ctx.config.ray))(config, problem_shards)
        else:
            chains = _chains(config, problem_shards, submit=False)
        exports = export_task(config, chains, reject_shard)
    except BaseException:
        shards.record_run(ctx, "failed")
        raise
    traffic = shards.shard_traffic(chains)
    record = shards.record_run(ctx, "completed", exports, traffic, chains=chains)
    shard_keys = sorted(shards.figure_shard_keys(ctx, chains, reject_shard))
    publish_artifacts(run_figures(ctx.store.root, ctx.run, set(shard_keys)), ctx.run)
    return {
        "run": ctx.run, "store": str(ctx.store.root), "exports": exports, "generation": record["generation"],
        "traffic": traffic, "shards": shard_keys,
    }
