"""Peak memory does not grow with the number of problems: a big run against a small one.

Each size runs in a fresh child process (so its peak RSS is its own): the whole chain — ingest,
rollouts, binary-search labels, consensus, pairs, export — on the synthetic world's in-process
backend (a measuring instrument: no model, so the figure is the pipeline's own memory), with the
default ``concurrent_shards``. What the chains hold at once is bounded by the shards open, not
by the run: the ratio of peak RSS between the sizes should stay near 1 (target: ≤ 1.5 for 20,000
against 2,000 problems). Two peaks are reported: after the chains (``peak_rss_mb_chains``) and
after the export, which today reads the run's tables whole to build the datasets, so it grows
with the run.

    python benchmarks/memory.py --sizes 2000,20000
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


def child(problems: int, root: Path) -> dict:
    from stepforge.flows import runtime
    from stepforge.flows.config import RunConfig
    from stepforge.stages.instruments.synthetic import make_problems

    source = root / "problems.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in make_problems(problems, (3, 6), seed=0)))
    sampling = {"temperature": 1.0, "max_tokens": 400, "seed": 1}
    config = RunConfig.model_validate({
        "run": "memory", "store": str(root / "store"), "shard_size": 16,
        "backend": {"kind": "synthetic", "world": {"slip_rate": 0.1, "wrong_op_rate": 0.1}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 2, "sampling": {**sampling, "seed": 0}},
        "binary_search": {"completions_per_prefix": 4, "sampling": sampling},
        "verify": {"sources": []},
        "export": {"out_dir": str(root / "export")},
    })
    ctx = runtime.RunContext(config)
    started = time.perf_counter()
    shards, rejects = runtime.ingest_shards(ctx)
    chains = runtime.run_shards(ctx, shards)
    chain_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runtime.export_run(ctx, chains, rejects)
    labels = sum(c["labels"].rows("labels") for c in chains)
    return {"problems": problems, "shards": len(shards), "labels": labels,
            "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb_chains": round(chain_peak, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, __file__, "--child", str(size), "--root", tmp],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"peak RSS ratio {rows[-1]['problems']} vs {rows[0]['problems']} problems: chains "
          f"{rows[-1]['peak_rss_mb_chains'] / rows[0]['peak_rss_mb_chains']:.2f}, with the export "
          f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
