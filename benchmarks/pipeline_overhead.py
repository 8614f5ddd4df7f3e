"""Pipeline overhead and engine saturation, measured in one run on the real model.

1. Live run (SmolLM2 on llama.cpp): rollout → mc_label → consensus → pairs over the bundled
   GSM8K sample. Reports the time-weighted mean number of samples in flight relative to the
   configured ``max_in_flight`` (1.0 = the engine's queue never ran dry).
2. Replay: the same stages again from the generation cache (shards deleted, cache kept), in
   this process. Reports the pipeline's own CPU time per labelled step — everything that is
   not the model: cache reads, step splitting, hashing, answer checks, Parquet writes.

Usage: python benchmarks/pipeline_overhead.py [--problems 6] [--rollouts 3] [--k 4] [--replays 3]
       [--store DIR (kept; a second call replays its cache)] [--profile (cProfile of one replay)]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from stepforge.flows import shards
from stepforge.flows.config import RunConfig

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gsm8k_sample.jsonl"


def run_stages(ctx: shards.RunContext) -> int:
    """All per-shard stages over every problem shard; returns the number of labels written."""
    return sum(shards.run_chain(ctx, shard)["consensus"].rows("labels") for shard in shards.ingest_shards(ctx)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--rollouts", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-in-flight", type=int, default=32)
    parser.add_argument("--replays", type=int, default=3)
    parser.add_argument("--store", type=Path, default=None, help="Keep the store (and its cache) here.")
    parser.add_argument("--profile", action="store_true", help="Print a cProfile of one more replay.")
    args = parser.parse_args()

    root = args.store.resolve() if args.store else Path(tempfile.mkdtemp(prefix="stepforge-bench-"))
    config = RunConfig.model_validate({
        "run": "bench", "store": str(root), "shard_size": args.problems,
        "backend": {"model": "smollm2-135m", "n_ctx": 2048, "max_in_flight": args.max_in_flight},
        "ingest": {"source": str(FIXTURE), "format": "gsm8k", "limit": args.problems},
        "split": {"mode": "newline"},
        "rollout": {"samples_per_problem": args.rollouts, "sampling": {"max_tokens": 64, "temperature": 0.9}},
        "mc_label": {"completions_per_step": args.k, "sampling": {"max_tokens": 48, "temperature": 0.9, "seed": 1}},
    })
    ctx = shards.RunContext(config)
    client = ctx.client()  # loads the model before anything is timed

    for folder in ("data", "markers"):  # a kept store starts from its cache, never from old shards
        shutil.rmtree(root / folder, ignore_errors=True)
    wall = time.perf_counter()
    labelled = run_stages(ctx)
    wall = time.perf_counter() - wall
    live = client.stats.as_dict()
    saturation = client.stats.mean_in_flight / client.max_in_flight
    print(f"live run: {labelled} labelled steps, {live['generated']} samples, {live['generated_tokens']} tokens "
          f"in {wall:.1f} s ({live['generated_tokens'] / wall:.1f} tok/s)")
    print(f"live run: mean samples in flight {client.stats.mean_in_flight:.2f} of max_in_flight "
          f"{client.max_in_flight} -> ratio {saturation:.3f}")

    per_step = []
    for _ in range(args.replays):
        for folder in ("data", "markers"):
            shutil.rmtree(root / folder, ignore_errors=True)
        generated_before = client.stats.generated
        cpu = time.process_time()
        replayed = run_stages(ctx)
        cpu = time.process_time() - cpu
        assert client.stats.generated == generated_before, "a replay must not generate"
        assert replayed == labelled
        per_step.append(cpu / replayed * 1000)
    print(f"replay from cache: pipeline CPU per labelled step {min(per_step):.3f} ms "
          f"(best of {args.replays}; all: {', '.join(f'{x:.3f}' for x in per_step)}; target <= 1 ms)")
    if args.profile:
        import cProfile
        import pstats

        for folder in ("data", "markers"):
            shutil.rmtree(root / folder, ignore_errors=True)
        profiler = cProfile.Profile()
        profiler.runcall(run_stages, ctx)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    ctx.close()
    if args.store is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
