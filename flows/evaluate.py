"""The ``evaluate`` flow: gather evidence on an imported benchmark once, score every method on it.

``synthesize`` runs as a subflow over the imported trajectories with the evidence the methods
need (Monte Carlo from the policy model, tool checks, the judge); then each method — a
consensus policy with its rules, e.g. ``judge``, ``mc_hard``, ``vote+tool_veto`` — relabels that
evidence (no generation) and is scored against the imported reference. Per-row results are
stored as ``eval_results`` shards (stage ``eval``), one per method, so
``stepforge query "select method, avg(correct::int) from eval_results group by 1"`` works.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, task

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.flows.runtime.registry import LABELS
from stepforge.flows.synthesize import context_for, synthesize
from stepforge.schemas.ids import content_hash
from stepforge.stages.consensus import policy as consensus
from stepforge.stages.verify import evaluate
from stepforge.stages.consensus.policy import ConsensusConfig
from stepforge.stages.base import key_settings

EVAL_STAGE = "eval"
VERIFICATION = "verification"  # the slot whose shard keys name the evidence an eval shard scored
RULES = {"tool_veto": "tool_veto", "propagate": "propagate_errors"}
NEEDS = {
    "mc_hard": {"mc"}, "mc_soft": {"mc"}, "judge": {"judge"}, "tool": {"tool"},
    "agreement": {"mc", "judge"}, "vote": {"mc", "judge", "tool"},
}
DEFAULT_METHODS = ("tool", "judge", "mc_hard", "agreement", "vote", "vote+tool_veto+propagate")


def method_config(spec: str) -> ConsensusConfig:
    """``policy[+tool_veto][+propagate]`` as a consensus config that never reads the human reference."""
    name, *rules = spec.split("+")
    if name not in NEEDS:
        raise ValueError(f"unknown policy {name!r} in method {spec!r}: choose from {', '.join(NEEDS)}")
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown} in method {spec!r}: choose from {', '.join(RULES)}")
    settings = {field: rule in rules for rule, field in RULES.items()}
    return ConsensusConfig(policy=name, human_override=False, **settings)


def evidence_needed(methods: list[str]) -> set[str]:
    needed: set[str] = set()
    for spec in methods:
        config = method_config(spec)
        needed |= NEEDS[config.policy] | ({"tool"} if config.tool_veto else set())
    return needed


def evaluation_config(base: RunConfig, methods: list[str]) -> RunConfig:
    """``base`` set up to gather exactly the evidence ``methods`` read, on imported solutions only."""
    needed = evidence_needed(methods)
    labeller = (base.labeller if base.labeller != "none" else "mc") if "mc" in needed else "none"
    data = base.model_dump(mode="json")
    data["labeller"] = labeller
    data["rollout"]["samples_per_problem"] = 0
    data["verify"]["sources"] = [s for s in ("tool", "judge") if s in needed]
    data["consensus"] = method_config(methods[0]).model_dump(mode="json")
    return RunConfig.model_validate(data)


@task(name="score")
def score_task(config: dict, chains: list[dict[str, dict]], spec: str, benchmark: str, neutral_as: str) -> dict:
    """One method's labels over the run's stored evidence, scored and written as an eval shard."""
    ctx = context_for(config)
    loaded = [{slot: runtime.ShardManifest(**m) for slot, m in chain.items()} for chain in chains]
    method = method_config(spec)
    key = content_hash(
        EVAL_STAGE, benchmark, key_settings(method), neutral_as, consensus.VERSION,
        sorted(chain[VERIFICATION].shard for chain in loaded),
    )
    done = ctx.store.manifest(ctx.run, EVAL_STAGE, key)
    if done is None:
        def read(table: str, *slots: str) -> list[dict]:
            return ctx.store.read_rows(table, [chain[slot] for chain in loaded for slot in slots])

        evidence = ctx.chain.stage(LABELS).reads  # the evidence consensus would read, as it declares
        evaluations = read("evaluations", *evidence["evaluations"])
        nodes = read("nodes", *evidence["nodes"]) if method.propagate_errors else []
        labels = [r.model_dump() for r in consensus.run(evaluations, method, nodes) if r.TABLE == "labels"]
        policy_rollouts = [r for r in read("rollouts", runtime.ROOT, "rollouts") if r["origin"] == "policy"]
        results = list(
            evaluate.processbench_results(policy_rollouts, evaluations, labels, method.policy_id, neutral_as)
        )
        done = ctx.store.write_shard(
            ctx.run, EVAL_STAGE, key, {"eval_results": results}, inputs=[c[VERIFICATION].shard for c in loaded],
            stats={"method": spec, "policy": method.policy_id, **evaluate.processbench_metrics(results)},
        )
    return {"method": spec, "policy": method.policy_id, "shard": done.shard, **{
        k: done.stats.get(k) for k in ("rows", "erroneous", "correct_rows", "acc_error", "acc_correct", "f1", "coverage")
    }}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: dict, methods: list[str], benchmark: str = "processbench", neutral_as: str = "positive") -> dict:
    """Evidence once (``synthesize``), then every method scored on it; returns the metrics per method."""
    if benchmark != "processbench":
        raise ValueError(f"unknown benchmark {benchmark!r}: only processbench is implemented")
    for spec in methods:
        method_config(spec)  # fail on a typo before any generation
    summary = synthesize(config)
    ctx = context_for(config)
    chains, incomplete, rejects = runtime.completed_chains(ctx)
    if incomplete:
        raise RuntimeError(f"{incomplete} shard chain(s) did not complete; re-run to finish them")
    plain = [{slot: asdict(m) for slot, m in chain.items()} for chain in chains]
    scores = [score_task(config, plain, spec, benchmark, neutral_as) for spec in methods]
    # The benchmark rows ingest could not import are scored by no method: the caller must say so.
    dropped = dict(rejects.stats.get("reject_reasons") or {})
    return {"run": summary["run"], "store": summary["store"], "generation": summary["generation"], "scores": scores,
            "dropped": dropped}
