"""Live agents on GSM8K: the Python tool against plain chain of thought, and what the agent pipeline yields.

Both arms run the same GSM8K test problems with the same policy and the same token budget per
answer (chain of thought: one sample of ``--budget`` tokens; tool: an episode of at most
``--budget`` tokens over its turns):

- **cot**: the rollout stage's text solutions (labeller none): final-answer accuracy.
- **tool**: ``ingest.environment: python`` episodes, labelled by binary search over continued
  episodes, tool checks, consensus, the WebSTAR filter and executed agent pairs: final-answer
  accuracy, labelled agent steps per hour (labels / the arm's wall time), the share of steps the
  filter keeps, and the number of executed agent pairs.

Each arm runs in-process (the runtime without Prefect) on its own fresh store, one after the other
(two model-heavy jobs at once would thrash two cores)::

    python benchmarks/agent_episodes.py --model qwen2.5-coder-1.5b --problems 20 --episodes 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.storage.catalog import Catalog

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k_test.jsonl"


def config(arm: str, store: Path, args) -> RunConfig:
    base = {
        "run": f"bench-{arm}", "store": str(store), "shard_size": 2, "concurrent_shards": 4,
        "backend": {"model": args.model, "n_ctx": 4096, "max_in_flight": 32},
        "ingest": {"source": str(args.source), "format": "gsm8k", "limit": args.problems, "offset": args.offset},
    }
    if arm == "cot":
        return RunConfig.model_validate({
            **base,
            "prompt": {"user_template": "{question}\n\nSolve it step by step. End with the final answer in \\boxed{{}}."},
            "rollout": {"samples_per_problem": args.episodes, "sampling": {"temperature": 0.8, "max_tokens": args.budget, "seed": 0}},
            "labeller": "none",
        })
    sampling = {"temperature": 0.8, "max_tokens": args.turn_tokens}
    return RunConfig.model_validate({
        **base,
        "ingest": {**base["ingest"], "environment": "python"},
        "rollout": {"samples_per_problem": args.episodes, "sampling": {**sampling, "seed": 0}},
        "agent": {"max_steps": args.max_steps, "max_tokens": args.budget, "python": {"max_observation_chars": 600}},
        "labeller": "binary_search",
        "binary_search": {"completions_per_prefix": args.k, "sampling": {**sampling, "seed": 1}},
        "verify": {"sources": ["tool"]},
        "consensus": {"policy": "mc_hard"},
        "filter": {"min_label": 1},
        "agent_pairs": {"enabled": True, "alternatives": 2, "continuations": args.k, "max_tokens": args.turn_tokens},
    })


def run_arm(arm: str, args) -> dict:
    if args.store_root:  # reusing a store replays its cached samples: its wall time then says nothing
        store = args.store_root / arm
    else:
        store = Path(tempfile.mkdtemp(prefix=f"agentbench-{arm}-"))
    ctx = runtime.RunContext(config(arm, store, args))
    started = time.monotonic()
    runtime.run_shards(ctx, runtime.ingest_shards(ctx)[0])
    wall = time.monotonic() - started
    with Catalog(store) as catalog:
        catalog.refresh()

        def one(sql: str):
            return catalog.query(sql).to_pylist()[0]

        out = {"arm": arm, "wall_seconds": round(wall, 1), "store": str(store)}
        out.update(one("select count(*) as episodes, avg(case when outcome then 1.0 else 0.0 end) as accuracy, "
                       "sum(num_tokens) as policy_tokens from rollouts where origin = 'policy'"))
        out["generation"] = {k: v for k, v in ctx.client().counters().items() if k in ("generated", "generated_tokens", "cache_hits")}
        if arm == "tool":
            out.update(one("select count(*) as labelled_steps, sum(case when label = 1 then 1 else 0 end) as positive, "
                           "sum(case when label = -1 then 1 else 0 end) as negative from labels"))
            out["labelled_steps_per_hour"] = round(out["labelled_steps"] / wall * 3600, 1)
            out.update(one("select count(*) as decisions, avg(case when kept then 1.0 else 0.0 end) as filter_keep_share "
                           "from step_filter"))
            out.update(one("select count(*) as executed_pairs from pairs where kind = 'agent_step'"))
            out.update(one("select count(*) as tool_calls_steps from nodes where origin = 'policy' and text like '%\"role\":\"tool\"%'"))
            out["finish_reasons"] = {r["finish_reason"]: r["n"] for r in catalog.query(
                "select finish_reason, count(*) as n from rollouts where origin = 'policy' group by 1").to_pylist()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--source", type=Path, default=DATA)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=2, help="episodes (tool) / samples (cot) per problem")
    parser.add_argument("--budget", type=int, default=1024, help="tokens per answer: an episode's budget, a CoT sample's max_tokens")
    parser.add_argument("--turn-tokens", type=int, default=384, help="one turn's max_tokens (tool arm)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--k", type=int, default=2, help="continued episodes per probed step and per executed alternative")
    parser.add_argument("--arms", default="cot,tool")
    parser.add_argument("--store-root", type=Path, help="keep each arm's store in DIR/<arm> (default: fresh temporary stores)")
    args = parser.parse_args()
    results = [run_arm(arm, args) for arm in args.arms.split(",")]
    for result in results:
        print(json.dumps(result, default=str))
    by = {r["arm"]: r for r in results}
    if {"cot", "tool"} <= set(by):
        print(f"accuracy: tool {by['tool']['accuracy']:.3f} vs cot {by['cot']['accuracy']:.3f} "
              f"({args.problems} problems x {args.episodes}, budget {args.budget} tokens)")


if __name__ == "__main__":
    main()
