"""The ``synthesize`` flow: ingest, then every slot of the run's chain over every problem shard, then export.

Shards run ``concurrent_shards`` at a time on threads of this process, sharing the engine's
bound on samples in flight, or, with a ``ray`` section, as tasks on a Ray cluster through
Prefect's Ray task runner (a subflow, so the same flow and parameters serve both): each
shard's chain waits only for its own upstream, and every worker process loads the model once
and keeps it for the shards it is given.

Thin by design: one Prefect task per stage, named after it, whose body is the runtime's
``run_stage``; the order comes from the chain (``flows.runtime.registry``). Tasks pass shard
manifests (small dicts naming Parquet files), never data. Each task's Prefect cache key is
the run name plus the shard's content key, its result is persisted under the store, and the
shard's own completion marker makes the work idempotent even outside Prefect.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from prefect import flow, task
from prefect.futures import PrefectFuture

from stepforge.flows import runtime
from stepforge.flows.artifacts import publish_artifacts
from stepforge.flows.config import RayConfig, RunConfig
from stepforge.flows.figures import run_figures
from stepforge.storage.shards import ShardManifest

_contexts: dict[str, runtime.RunContext] = {}


def context_for(config: dict) -> runtime.RunContext:
    """One RunContext per run config per process: the model and caches load once."""
    cfg = RunConfig.model_validate(config)
    key = cfg.model_dump_json()
    if key not in _contexts:
        _contexts[key] = runtime.RunContext(cfg)
    return _contexts[key]


def _manifests(chain: dict[str, dict]) -> dict[str, ShardManifest]:
    return {slot: ShardManifest(**m) for slot, m in chain.items()}


@task
def stage_task(config: dict, slot: str, key: str, upstream: dict[str, dict]) -> dict:
    """The slot's stage over one problem shard; ``upstream`` holds the manifests of the slots it needs."""
    return asdict(runtime.run_stage(context_for(config), slot, key, _manifests(upstream)))


@task(name="ingest")
def ingest_task(config: dict) -> tuple[list[dict], dict]:
    problem_shards, reject_shard = runtime.ingest_shards(context_for(config))
    return [asdict(m) for m in problem_shards], asdict(reject_shard)


@task(name="export")
def export_task(config: dict, chains: list[dict[str, dict]], reject_shard: dict) -> list[dict]:
    return runtime.export_run(context_for(config), [_manifests(c) for c in chains], ShardManifest(**reject_shard))


def _cached(stage: str, ctx: runtime.RunContext):
    """The stage's task with a persisted, explicitly keyed result under the run's store.

    The key is ``<run>-<shard key>`` (content hashes; the run name partitions the store, so it
    partitions the cache too), offered only while the shard's completion marker exists: a
    cached manifest must never point at shards someone has deleted. So the first run of a
    shard persists its result unkeyed, and Prefect serves it from its cache from the next run on.
    """
    store, run = ctx.store, ctx.run  # not ctx: Ray pickles the task, ctx holds locks

    def cache_key(_task_context, parameters: dict) -> str | None:
        if store.manifest(run, stage, parameters["key"]) is None:
            return None
        return f"{run}-{parameters['key']}"

    # A Path (not an unsaved block) is Prefect's way to say "local directory" without a server-side block.
    return stage_task.with_options(
        name=stage, cache_key_fn=cache_key, persist_result=True, result_storage=store.root / "prefect-results",
    )


def _chains(config: dict, problem_shards: list[dict], submit: bool) -> list[dict[str, dict]]:
    """Every slot over every problem shard. With ``submit`` the tasks go to the flow's task runner
    (Ray), each waiting only for the slots its stage needs; otherwise each shard's tasks run in
    order here, ``concurrent_shards`` shards at once on threads of this process (the runtime's
    ``run_concurrently``: each thread runs in a copy of the flow run's context, so the tasks are
    the flow run's)."""
    ctx = context_for(config)
    chain = ctx.chain
    tasks = {slot: _cached(chain.stage(slot).name, ctx) for slot in chain.stage_slots}

    def shard_chain(problem_shard: dict) -> dict:
        keys = runtime.chain_keys(ctx, problem_shard["shard"])
        done: dict = {runtime.ROOT: problem_shard}
        for slot in chain.stage_slots:
            if not submit:
                runtime.stop_if_interrupted()
            upstream = {s: done[s] for s in (runtime.ROOT, *chain.stage(slot).needs)}
            call = tasks[slot].submit if submit else tasks[slot]
            done[slot] = call(config, slot, keys[slot], upstream)
        return done

    if submit:
        chains = [shard_chain(problem_shard) for problem_shard in problem_shards]
    else:
        chains = runtime.run_concurrently(shard_chain, problem_shards, ctx.config.concurrent_shards)
    return [{slot: (m.result() if isinstance(m, PrefectFuture) else m) for slot, m in c.items()} for c in chains]


@flow(name="shards-on-ray")
def _chains_on_ray(config: dict, problem_shards: list[dict]) -> list[dict[str, dict]]:
    ray = context_for(config).config.ray
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
        # Ray starts workers at nice 15; on a local cluster they are this run's main work, and at that
        # niceness any other busy process on the machine starves them (measured: ~6% of a core each).
        os.environ.setdefault("RAY_worker_niceness", "0")
    if ray.runtime_env:
        init["runtime_env"] = ray.runtime_env
    return RayTaskRunner(address=ray.address, init_kwargs={k: v for k, v in init.items() if v is not None})


@flow(name="synthesize", log_prints=True)
def synthesize(config: RunConfig) -> dict:
    """Run every stage over every shard of the configured problems; return a summary of the run.

    Typed: a deployment's parameters are validated against ``RunConfig`` before a run starts."""
    config = RunConfig.model_validate(config).model_dump(mode="json")  # tasks take JSON (Ray pickles them)
    ctx = context_for(config)
    ctx.open_window()
    runtime.record_run(ctx, "running")
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
        runtime.record_run(ctx, "failed")
        raise
    traffic = runtime.shard_traffic(chains)
    record = runtime.record_run(ctx, "completed", exports, traffic, chains=chains, reject_shard=reject_shard)
    shard_keys = sorted(runtime.figure_shard_keys(ctx, chains, reject_shard))
    publish_artifacts(run_figures(ctx.store.root, ctx.run, set(shard_keys)), ctx.run)
    return {
        "run": ctx.run, "store": str(ctx.store.root), "exports": exports, "generation": record["generation"],
        "saturation": record["saturation"], "traffic": traffic, "shards": shard_keys,
    }
