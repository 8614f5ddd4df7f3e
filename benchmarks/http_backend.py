"""The HTTP backend against a real OpenAI-compatible server (llama.cpp's; SmolLM2 or Qwen2.5-Coder-1.5B), measured in one run.

1. Saturation and throughput vs concurrency: Math-Shepherd MC labelling over the same problems
   at several ``max_in_flight`` values, each from an empty cache. Reports the time-weighted mean
   number of requests in flight at the server over the run relative to the limit (target ≥ 0.9),
   labelled steps per hour, and the pipeline's own CPU time per request (this process's CPU
   time — everything but the server — divided by the HTTP requests it sent).
2. Side by side with distilabel 1.5.3 (MathShepherdGenerator + MathShepherdCompleter through its
   OpenAILLM, in its own virtualenv: benchmarks/distilabel_side.py) on the same server, model
   and problems: labelled steps per hour and completions per labelled step, for stepforge's
   plain Math-Shepherd MC and for its binary-search recipe (OmegaPRM-style first-error search
   with rollout reuse and adaptive sampling).

The server runs one request at a time (llama-cpp-python's server), so concurrency cannot buy
throughput here; what it shows is that the client keeps the server's queue full.

Usage: python benchmarks/http_backend.py [--problems 4] [--rollouts 2] [--k 4]
       [--concurrency 1,4,16,64] [--skip-distilabel] [--distilabel-venv DIR]
       python benchmarks/http_backend.py --model qwen2.5-coder-1.5b --problems 6 --recipe-only --skip-gold
           # the peer comparison: stepforge's default recipe beside distilabel's Math-Shepherd recipe
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.stages.llm import unload_backends
from stepforge.stages.instruments.local_server import llamacpp_server

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "gsm8k_sample.jsonl"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_stepforge(server, root: Path, args: argparse.Namespace, *, labeller: str, max_in_flight: int) -> dict:
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.7, "seed": 1}
    config = RunConfig.model_validate({
        "run": f"bench-{labeller}-{max_in_flight}", "store": str(root), "shard_size": args.problems,
        "backend": {
            "kind": "openai", "model": server.model, "max_in_flight": max_in_flight,
            "http": {"base_url": server.base_url, "server": "llamacpp", "tokenizer": args.model, "timeout_seconds": 3600},
        },
        "ingest": {"source": str(FIXTURE), "format": "gsm8k", "limit": args.problems},
        "prompt": {"user_template": "{question}\n\nSolve it step by step, one step per line. "
                   "End with 'The answer is: <number>'."},
        "split": {"mode": "newline"},
        "labeller": labeller, "concurrent_shards": 8,
        "rollout": {"samples_per_problem": args.rollouts, "sampling": {**sampling, "seed": 0}},
        "mc_label": {"completions_per_step": args.k, "sampling": sampling},
        "binary_search": {"completions_per_prefix": args.k, "sampling": sampling, "adaptive": {"enabled": True}},
        "verify": {"sources": []},
    })
    ctx = runtime.RunContext(config)
    backend = ctx.client().backend
    cpu, wall = cpu_seconds(), time.perf_counter()
    ctx.open_window()
    chains = runtime.run_shards(ctx, runtime.ingest_shards(ctx)[0])
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    labelled = sum(chain["labels"].rows("labels") for chain in chains)
    generated = sum((c["step_values"].stats.get("generation") or {}).get("generated", 0) for c in chains)
    counters = backend.counters()
    saturation = ctx.saturation()["generation"]
    result = {
        "labeller": labeller, "max_in_flight": max_in_flight, "seconds": round(wall, 1), "labelled_steps": labelled,
        "steps_per_hour": round(labelled * 3600 / wall, 1),
        "labelling_completions": generated,
        "completions_per_labelled_step": round(generated / labelled, 2) if labelled else None,
        "http_requests": counters["http_requests"],
        "completion_tokens": counters["completion_tokens"],
        "completion_tokens_per_label": round(counters["completion_tokens"] / labelled, 1) if labelled else None,
        "mean_in_flight_ratio": saturation["ratio"],  # over the whole wall time
        "pipeline_cpu_ms_per_request": round(cpu * 1000 / max(1, counters["http_requests"]), 2),
    }
    ctx.close()
    unload_backends()
    return result


def run_distilabel(server, args: argparse.Namespace, source: str = "generator") -> dict:
    command = [
        sys.executable, str(REPO / "benchmarks" / "distilabel_side.py"), "--base-url", server.base_url,
        "--model", server.model, "--problems", str(FIXTURE), "--limit", str(args.problems),
        "--solutions", str(args.rollouts), "--completions", str(args.k),
        # Its generator writes all M solutions, and its completer all N completions, in ONE generation:
        # give that generation room for them, or distilabel is measured on truncated output.
        "--max-tokens", str(args.distilabel_max_tokens or args.max_tokens * max(args.rollouts, args.k)),
        "--temperature", "0.7", "--solutions-source", source,
    ]
    if args.distilabel_venv:
        command += ["--venv", str(args.distilabel_venv)]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=2, help="Solutions per problem (distilabel's M).")
    parser.add_argument("--k", type=int, default=4, help="Completions per step (distilabel's N).")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--skip-distilabel", action="store_true")
    parser.add_argument("--distilabel-venv", type=Path, default=None)
    parser.add_argument("--distilabel-max-tokens", type=int, default=None,
                        help="Default: --max-tokens times max(M, N), as distilabel asks for M or N answers in one generation.")
    parser.add_argument("--only-distilabel", action="store_true", help="Skip stepforge's runs.")
    parser.add_argument("--model", default="smollm2-135m", help="The served model: smollm2-135m, qwen2.5-coder-1.5b or a .gguf.")
    parser.add_argument("--recipe-only", action="store_true",
                        help="Only stepforge's default recipe (no MC concurrency sweep) beside distilabel's recipe proper.")
    parser.add_argument("--skip-gold", action="store_true", help="Skip distilabel's completer on the gold solutions.")
    args = parser.parse_args()

    results = []
    with llamacpp_server(args.model, n_ctx=4096) as server, tempfile.TemporaryDirectory() as tmp:
        sweep = [] if args.only_distilabel or args.recipe_only else [int(c) for c in args.concurrency.split(",")]
        for level in sweep:
            result = run_stepforge(server, Path(tmp) / f"mc-{level}", args, labeller="mc", max_in_flight=level)
            results.append(result)
            print(json.dumps(result), flush=True)
        recipe = None
        if results or args.recipe_only:
            best = max((r["max_in_flight"] for r in results), default=64)
            recipe = run_stepforge(server, Path(tmp) / "recipe", args, labeller="binary_search", max_in_flight=best)
            print(json.dumps(recipe), flush=True)
        distilabel = None if args.skip_distilabel else run_distilabel(server, args)
        # Its completer alone on the reference solutions: what a labelled step costs it when its
        # parser is given steps it can read (SmolLM2 rarely writes distilabel's "Step k:" format).
        distilabel_gold = None if args.skip_distilabel or args.skip_gold else run_distilabel(server, args, "gold")
        for r in (distilabel, distilabel_gold):
            if r:
                print(json.dumps(r), flush=True)

    print("\n| run | in flight (limit) | labelled steps | steps/hour | completions/labelled step | completion tokens/label | CPU ms/request |")
    print("|---|---|---|---|---|---|---|")
    for r in [*results, *([recipe] if recipe else [])]:
        print(f"| stepforge {r['labeller']} | {r['mean_in_flight_ratio'] * r['max_in_flight']:.1f} ({r['max_in_flight']}) "
              f"| {r['labelled_steps']} | {r['steps_per_hour']} | {r['completions_per_labelled_step']} "
              f"| {r['completion_tokens_per_label']} | {r['pipeline_cpu_ms_per_request']} |")
    if distilabel:
        for name, r in (("distilabel 1.5.3", distilabel), ("distilabel 1.5.3, completer on gold solutions", distilabel_gold)):
            if r is None:
                continue
            per_label = round(r["completion_tokens"] / r["labelled_steps"], 1) if r["labelled_steps"] and r.get("completion_tokens") else None
            print(f"| {name} | - | {r['labelled_steps']} | {r['steps_per_hour']} "
                  f"| {r['completions_per_labelled_step']} | {per_label} | - |")
        for name, r in (("plain MC", results[-1] if results else None), ("default recipe (binary search)", recipe)):
            for other, d in (("distilabel", distilabel), ("distilabel on gold solutions", distilabel_gold)):
                if r and d:
                    ratio = r["steps_per_hour"] / d["steps_per_hour"] if d["steps_per_hour"] else float("inf")
                    print(f"steps/hour, stepforge {name} / {other}: {ratio:.2f}")


if __name__ == "__main__":
    main()
