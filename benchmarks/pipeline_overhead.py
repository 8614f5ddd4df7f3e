"""Pipeline overhead and engine saturation, measured in one run on the real model.

1. Live run (SmolLM2 on llama.cpp): rollout → mc_label → consensus → pairs over the bundled
   GSM8K sample, as one shard. Reports the time-weighted mean number of samples in flight
   relative to the configured ``max_in_flight`` (1.0 = the engine's queue never ran dry).
2. Replays: the same stages again from the generation cache (shards deleted, cache kept), in
   this process, for all the problems and for the first half of them. Reports the pipeline's
   own CPU time per labelled step — everything that is not the model: cache reads, step
   splitting, hashing, answer checks, Parquet writes and reads — as a total per step at each
   size and as the marginal cost of one more labelled step (the difference of the two runs
   divided by the difference in steps), which leaves out the fixed cost of a shard.

Usage: python benchmarks/pipeline_overhead.py [--problems 6] [--rollouts 3] [--k 4] [--replays 5]
       [--store DIR (kept; a second call replays its cache)] [--profile (cProfile of one replay)]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gsm8k_sample.jsonl"


def make_context(root: Path, problems: int, args: argparse.Namespace) -> runtime.RunContext:
    return runtime.RunContext(RunConfig.model_validate({
        "run": f"bench-{problems}", "store": str(root), "shard_size": problems,
        "backend": {"model": "smollm2-135m", "n_ctx": 2048, "max_in_flight": args.max_in_flight},
        "ingest": {"source": str(FIXTURE), "format": "gsm8k", "limit": problems},
        "split": {"mode": "newline"},
        "rollout": {"samples_per_problem": args.rollouts, "sampling": {"max_tokens": 64, "temperature": 0.9}},
        "labeller": "mc",
        "mc_label": {"completions_per_step": args.k, "sampling": {"max_tokens": 48, "temperature": 0.9, "seed": 1}},
    }))


def run_stages(ctx: runtime.RunContext) -> int:
    """All per-shard stages over every problem shard; returns the number of labels written."""
    return sum(runtime.run_chain(ctx, shard)["labels"].rows("labels") for shard in runtime.ingest_shards(ctx)[0])


def clear_shards(root: Path) -> None:
    for folder in ("data", "markers"):
        shutil.rmtree(root / folder, ignore_errors=True)


def replay_cpu(ctx: runtime.RunContext, root: Path, times: int) -> tuple[float, int]:
    """Best CPU seconds of ``times`` replays from the cache, and the labelled steps they make."""
    best, labelled = float("inf"), 0
    for _ in range(times):
        clear_shards(root)
        generated_before = ctx.client().stats.generated
        # The replay runs entirely in this thread (event loop included; no backend call), so
        # this thread's CPU time is the pipeline's, without idle engine or OpenMP threads.
        cpu = time.thread_time()
        labelled = run_stages(ctx)
        best = min(best, time.thread_time() - cpu)
        assert ctx.client().stats.generated == generated_before, "a replay must not generate"
    return best, labelled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--rollouts", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-in-flight", type=int, default=32)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--store", type=Path, default=None, help="Keep the store (and its cache) here.")
    parser.add_argument("--profile", action="store_true", help="Print a cProfile of one more replay.")
    args = parser.parse_args()

    root = args.store.resolve() if args.store else Path(tempfile.mkdtemp(prefix="stepforge-bench-"))
    full = make_context(root, args.problems, args)
    client = full.client()  # loads the model before anything is timed

    clear_shards(root)  # a kept store starts from its cache, never from old shards
    wall = time.perf_counter()
    labelled = run_stages(full)
    wall = time.perf_counter() - wall
    live = client.stats.as_dict()
    print(f"live run: {labelled} labelled steps, {live['generated']} samples generated "
          f"({live['cache_hits']} from cache), {live['generated_tokens']} tokens in {wall:.1f} s")
    print(f"live run: mean samples in flight {client.stats.mean_in_flight:.2f} of max_in_flight "
          f"{client.max_in_flight} -> ratio {client.stats.mean_in_flight / client.max_in_flight:.3f}")

    half = make_context(root, args.problems // 2, args)
    cpu_full, steps_full = replay_cpu(full, root, args.replays)
    cpu_half, steps_half = replay_cpu(half, root, args.replays)
    print(f"replay, {args.problems} problems: {steps_full} labelled steps, "
          f"{cpu_full * 1000 / steps_full:.3f} ms CPU per labelled step (best of {args.replays})")
    print(f"replay, {args.problems // 2} problems: {steps_half} labelled steps, "
          f"{cpu_half * 1000 / steps_half:.3f} ms CPU per labelled step (best of {args.replays})")
    marginal = (cpu_full - cpu_half) * 1000 / (steps_full - steps_half)
    print(f"replay: marginal pipeline CPU per labelled step {marginal:.3f} ms (target <= 1 ms); "
          f"fixed cost per shard ~{(cpu_half * 1000 - marginal * steps_half):.0f} ms")
    if args.profile:
        import cProfile
        import pstats

        clear_shards(root)
        profiler = cProfile.Profile()
        profiler.runcall(run_stages, full)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    full.close()
    half.close()
    if args.store is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
