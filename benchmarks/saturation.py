"""Does the pipeline keep a batching server full? Measured against the simulated batching server.

The server is ``stepforge world serve`` (a measuring instrument: the synthetic world's policy
behind the OpenAI protocol, with a continuous-batching latency model: at most ``--capacity``
running, each holding its slot ``ttft + tokens × tpot × (1 + running / S)``; it meters its own
time-weighted occupancy at ``/metrics``). It runs in its own process (one core); stepforge runs
here (the other core) exactly as ``stepforge run --backend openai --server vllm`` would: the
runtime's concurrent shards, the HTTP backend, the cache, the Parquet shards.

Per labeller and capacity, one run from an empty store, reported in one table:

- mean running requests at the server over the run's whole wall time (server slot-seconds /
  the client's wall time from its first stage to its last shard) and that over the capacity;
- wall time over the ideal (the server's slot-seconds / capacity: the run with the server full);
- client CPU per HTTP request (this process's CPU time, user + system, over requests sent:
  everything but the server: stages, cache, Parquet, HTTP);
- labelled steps per hour (all of them, and the policy rollouts' steps alone: MCTS also labels
  the steps of its own completions) and first-error accuracy against the world's known first errors.

    python benchmarks/saturation.py --problems 500                     # the issue's check, cap. 256
    python benchmarks/saturation.py --problems 500 --capacity 16,64,256,1024 --labellers binary_search
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.stages.instruments.synthetic import first_error, make_problems
from stepforge.storage.catalog import Catalog


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorldServer:
    def __init__(self, args: argparse.Namespace, capacity: int):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "stepforge.stages.instruments.synthetic", "serve", "--port", str(self.port),
            "--capacity", str(capacity), "--ttft-ms", str(args.ttft_ms), "--tpot-ms", str(args.tpot_ms),
            "--batch-slowdown", str(args.batch_slowdown),
            "--slip-rate", str(args.slip), "--wrong-op-rate", str(args.wrong_op), "--recover-rate", "0",
        ]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.metrics()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("world server did not start: " + (self.process.stderr.read() or ""))
                time.sleep(0.1)

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as response:
            return json.load(response)

    def close(self) -> str:
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err.strip().splitlines()[-1] if err and err.strip() else ""


def config(args: argparse.Namespace, root: Path, source: Path, labeller: str, capacity: int, port: int) -> RunConfig:
    sampling = {"temperature": 1.0, "max_tokens": 400, "seed": 1}
    return RunConfig.model_validate({
        "run": f"sat-{labeller}-{capacity}", "store": str(root), "shard_size": args.shard_size,
        "concurrent_shards": args.concurrent_shards, "labeller": labeller,
        "backend": {"kind": "openai", "model": "world", "max_in_flight": capacity,
                    "http": {"base_url": f"http://127.0.0.1:{port}/v1", "server": "vllm", "timeout_seconds": 600}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": args.rollouts, "sampling": {**sampling, "seed": 0}},
        "mc_label": {"completions_per_step": args.k, "sampling": sampling},
        "binary_search": {"completions_per_prefix": args.k, "sampling": sampling, "adaptive": {"enabled": True}},
        "mcts": {"iterations": args.mcts_iterations, "breadth": args.mcts_breadth, "sampling": sampling},
        "verify": {"sources": []},
        "export": {"out_dir": str(root / "export")},
    })


def accuracy(store: Path, run: str) -> tuple[int, int, float]:
    """Labelled steps (every step with a label: policy steps and the steps of the labeller's own
    completions), labelled policy steps, and first-error accuracy over the policy rollouts whose
    steps are all labelled."""
    with Catalog(store) as catalog:
        catalog.refresh(run=run)
        rows = catalog.query(
            "select r.rollout_id, p.question, list(n.text order by n.depth) texts, "
            "list(l.label order by n.depth) labels, count(l.label) labelled, count(*) steps "
            "from rollouts r join problems p using (problem_id) "
            "join nodes n on list_contains(r.node_ids, n.node_id) "
            "left join labels l on l.node_id = n.node_id "
            "where r.origin = 'policy' group by all"
        ).to_pylist()
        labelled = catalog.query("select count(*) n from labels").to_pylist()[0]["n"]
    scored = right = 0
    policy_labelled = sum(row["labelled"] for row in rows)
    for row in rows:
        if row["labelled"] != row["steps"]:
            continue
        predicted = next((j for j, label in enumerate(row["labels"]) if label < 0), -1)
        scored += 1
        right += predicted == first_error(row["question"], row["texts"])
    return labelled, policy_labelled, (right / scored if scored else float("nan"))


def measure(args: argparse.Namespace, labeller: str, capacity: int, source: Path) -> dict:
    server = WorldServer(args, capacity)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config(args, Path(tmp), source, labeller, capacity, server.port)
            ctx = runtime.RunContext(cfg)
            backend = ctx.client().backend
            cpu, started = cpu_seconds(), time.perf_counter()
            ctx.open_window()
            shards = runtime.ingest_shards(ctx)[0]
            runtime.run_shards(ctx, shards)
            wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
            sat = ctx.saturation()["generation"]
            metrics = server.metrics()
            requests = backend.counters()["http_requests"]
            labelled, policy_labelled, first_error_acc = accuracy(Path(tmp), cfg.run)
            ctx.close()
    finally:
        summary = server.close()
    mean_running = metrics["slot_seconds"] / wall
    return {
        "labeller": labeller, "capacity": capacity, "problems": args.problems, "requests": requests,
        "wall_s": round(wall, 1), "ideal_s": round(metrics["ideal_seconds"], 1),
        "wall_over_ideal": round(wall / metrics["ideal_seconds"], 2),
        "mean_running": round(mean_running, 1), "utilization": round(mean_running / capacity, 3),
        "server_window_utilization": round(metrics["utilization"], 3), "max_running": metrics["max_running"],
        "client_mean_in_flight": sat["mean_in_flight"],
        "client_cpu_ms_per_request": round(cpu * 1000 / max(requests, 1), 3),
        "requests_per_s": round(requests / wall, 1),
        "labelled_steps": labelled, "labelled_steps_per_hour": round(labelled * 3600 / wall),
        "policy_steps_labelled_per_hour": round(policy_labelled * 3600 / wall),
        "first_error_acc": round(first_error_acc, 3), "server_summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--steps", default="4-8", help="MIN-MAX operations per problem.")
    parser.add_argument("--capacity", default="256", help="Comma-separated server capacities.")
    parser.add_argument("--labellers", default="mc,binary_search,mcts")
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--k", type=int, default=8, help="mc K / binary search k.")
    parser.add_argument("--mcts-iterations", type=int, default=40)
    parser.add_argument("--mcts-breadth", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--concurrent-shards", type=int, default=16)
    parser.add_argument("--ttft-ms", type=float, default=30.0)
    parser.add_argument("--tpot-ms", type=float, default=15.0)
    parser.add_argument("--batch-slowdown", type=float, default=128.0)
    parser.add_argument("--slip", type=float, default=0.1)
    parser.add_argument("--wrong-op", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON lines here.")
    args = parser.parse_args()
    lo, _, hi = args.steps.partition("-")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "problems.jsonl"
        rows = make_problems(args.problems, (int(lo), int(hi or lo)), seed=0)
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"# {args.problems} world problems ({args.steps} operations), {args.rollouts} rollouts, shard_size "
              f"{args.shard_size}, concurrent_shards {args.concurrent_shards}; server ttft {args.ttft_ms} ms, tpot "
              f"{args.tpot_ms} ms × (1 + running/{args.batch_slowdown:g}); pid {os.getpid()}", flush=True)
        for capacity in (int(c) for c in args.capacity.split(",")):
            for labeller in args.labellers.split(","):
                row = measure(args, labeller, capacity, source)
                print(json.dumps(row), flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
