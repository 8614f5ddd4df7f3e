"""ProcessBench F1 of each evidence source and consensus policy, on the CPU; and the tool checker's precision.

    python benchmarks/verification.py [--store DIR] [--mc-rows 20] [--out results.json]

Runs ``stepforge eval processbench`` (the ``evaluate`` flow) on the 40 ProcessBench GSM8K dev rows
in tests/fixtures (Apache-2.0) with the settings of configs/processbench-qwen.yaml:

1. all 40 rows: tool checks alone, the judge alone (Qwen2.5-Coder-1.5B, critic prompt, greedy,
   JSON-constrained), and the judge with the tool veto;
2. a balanced subset of ``--mc-rows`` rows (the first half with an error, the first half without:
   the file is sorted by label): every policy, with Monte Carlo from the same model (~10 s per
   completion on two cores, hence the subset). The judge's answers replay from the generation
   cache of step 1.
3. with ``--stepwise``: the same subset with the ``stepwise`` judge (one request per step);
   Monte Carlo replays from the cache of step 2.

The tool checker's precision is measured on the steps it flags (verdict -1): a flag is right when
the step is at or after the human's earliest error (ProcessBench labels only the first error; later
steps of a wrong solution are usually wrong too, which is the error-propagation reading), and
exactly right when it is the labelled step itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "processbench_gsm8k_dev40.json"
GOLD = ROOT / "tests" / "fixtures" / "gsm8k_processbench40.jsonl"
CONFIG = ROOT / "configs" / "processbench-qwen.yaml"
ALL_ROWS_METHODS = ["tool", "judge", "judge+tool_veto"]
SUBSET_METHODS = ["tool", "judge", "mc_hard", "mc_soft", "agreement", "vote", "mc_hard+tool_veto",
                  "vote+tool_veto", "vote+tool_veto+propagate"]


def balanced_subset(store: Path, rows: int) -> Path:
    """The first rows/2 rows with an error and the first rows/2 without, as a file of their own."""
    data = json.loads(DATA.read_text())
    erroneous = [r for r in data if r["label"] >= 0][: rows // 2]
    clean = [r for r in data if r["label"] < 0][: rows - rows // 2]
    path = store / f"processbench_balanced{rows}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(erroneous + clean))
    return path


def run_eval(store: Path, run: str, methods: list[str], source: Path, judge_style: str = "critic") -> dict:
    from stepforge.flows.config import RunConfig
    from stepforge.flows.evaluate import evaluate_flow, evaluation_config

    ingest = {"source": str(source), "format": "processbench", "gold_source": str(GOLD)}
    base = RunConfig.from_yaml(CONFIG, run=run, store=store, ingest=ingest)
    if judge_style != base.verify.judge.style:
        data = base.model_dump(mode="json")
        data["verify"]["judge"]["style"] = judge_style
        base = RunConfig.model_validate(data)
    cfg = evaluation_config(base, methods)
    started = time.perf_counter()
    result = evaluate_flow(cfg.model_dump(mode="json"), methods, "processbench", "positive")
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def tool_precision(store: Path, run: str) -> dict:
    from stepforge.stages.verify.evaluate import reference_index
    from stepforge.stages.ingest.importers import import_evaluation_id
    from stepforge.storage.catalog import Catalog

    with Catalog(store) as catalog:
        catalog.refresh(run=run)
        q = lambda sql: catalog.query(sql).to_pylist()  # noqa: E731
        rollouts = q("select rollout_id, node_ids from rollouts where origin = 'policy' and stage = 'ingest'")
        human = {e["evaluation_id"]: e["verdict"] for e in q("select evaluation_id, verdict from evaluations where source = 'human'")}
        tool = {e["node_id"]: e for e in q("select node_id, verdict, meta from evaluations where source = 'tool'")}
    flagged = at_or_after = exact = before = checked_steps = 0
    by_kind: dict[str, list[int]] = {}
    for rollout in rollouts:
        path = rollout["node_ids"]
        reference = reference_index([human.get(import_evaluation_id("processbench", rollout["rollout_id"], i)) for i in range(len(path))])
        for i, nid in enumerate(path):
            if nid not in tool:
                continue
            checked_steps += 1
            if tool[nid]["verdict"] != -1:
                continue
            flagged += 1
            right = reference is not None and reference >= 0 and i >= reference
            at_or_after += right
            exact += reference == i
            before += not right
            for check in json.loads(tool[nid]["meta"])["checks"]:
                if check["status"] == "false":
                    by_kind.setdefault(check["kind"], [0, 0])
                    by_kind[check["kind"]][0] += 1
                    by_kind[check["kind"]][1] += right
    return {
        "steps_with_a_decided_check": checked_steps, "flagged": flagged, "at_or_after_error": at_or_after,
        "exactly_at_error": exact, "false_alarms": before,
        "precision": at_or_after / flagged if flagged else None,
        "false_checks_by_kind": {k: {"false": v[0], "on_wrong_steps": v[1]} for k, v in by_kind.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/tmp/stepforge-bench-verification"))
    parser.add_argument("--mc-rows", type=int, default=10)
    parser.add_argument("--stepwise", action="store_true", help="Also score the stepwise judge on the subset.")
    parser.add_argument("--skip-all-rows", action="store_true", help="Only the subsets (the 40-row run is done).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import datasets

    datasets.disable_progress_bars()
    report = {}
    if not args.skip_all_rows:
        report["all_rows"] = run_eval(args.store, "pb-all", ALL_ROWS_METHODS, DATA)
    report["tool_precision"] = tool_precision(args.store, "pb-all")
    if args.mc_rows:
        subset = balanced_subset(args.store, args.mc_rows)
        report["subset"] = run_eval(args.store, f"pb-mc{args.mc_rows}", SUBSET_METHODS, subset)
        if args.stepwise:
            report["stepwise"] = run_eval(args.store, f"pb-stepwise{args.mc_rows}", SUBSET_METHODS, subset, "stepwise")
    for part in ("all_rows", "subset", "stepwise"):
        if part not in report:
            continue
        result = report[part]
        print(f"\n{part}: {result['scores'][0]['rows']} rows, {result['seconds']} s, generation {result['generation']}")
        print(f"{'method':34} {'acc_err':>8} {'acc_ok':>8} {'F1':>6} {'cover':>6}")
        for s in result["scores"]:
            fmt = lambda v: "   -" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{s['policy']:34} {fmt(s['acc_error']):>8} {fmt(s['acc_correct']):>8} {fmt(s['f1']):>6} {fmt(s['coverage']):>6}")
    print("\ntool checker on the steps it flags:", json.dumps(report["tool_precision"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
