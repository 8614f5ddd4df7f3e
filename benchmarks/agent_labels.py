"""Step-label agreement with AgentProcessBench's human labels: tool checks, the rubric judge, consensus.

    python benchmarks/agent_labels.py [--data ../shared/data/agentprocessbench_hotpotqa_dev10.jsonl]
                                      [--model qwen2.5-coder-1.5b] [--store DIR] [--out results.json]
                                      [--no-judge]

The sample has no licence upstream, so it is read where it lies and never copied into the
project. Its trajectories are imported with ``ingest.format: agent_messages`` (the human step
labels become ``human`` evaluations, which are the reference here and are kept out of every
method), then:

- ``tool``: the tool-grounded checks (``stages.verify.agent_checks``; answers by ``cover`` match, since
  the agents answer in sentences) as labels (a -1 where a check failed, +1 where all held);
- ``judge``: the 1-10 rubric grader (``stages.verify.agent_judge``) on the CPU model, greedy,
  JSON-constrained; score >= 7 -> +1, <= 3 -> -1, else 0;
- consensus policies over both, without the human labels: ``vote`` (+ tool veto), and the same
  with errors propagated down the trajectory;
- the tool checks through consensus (``tool`` policy) under each error propagation: none,
  ``all_after`` (every step below a -1 is -1) and ``until_recovered`` (-1 until a step whose own
  evidence is +1). ``--no-judge`` runs these alone: no model is loaded.

Per method: steps with a label (coverage), ternary accuracy on those steps, and precision /
recall / F1 of the -1 class (the steps a filter must drop). Generations are cached in the
store, so a second run replays them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "agentprocessbench_hotpotqa_dev10.jsonl"


def scores(reference: dict[str, int], predicted: dict[str, int]) -> dict:
    common = [nid for nid in reference if nid in predicted]
    correct = sum(1 for nid in common if predicted[nid] == reference[nid])
    tp = sum(1 for nid in common if predicted[nid] == -1 and reference[nid] == -1)
    fp = sum(1 for nid in common if predicted[nid] == -1 and reference[nid] != -1)
    fn = sum(1 for nid in reference if reference[nid] == -1 and predicted.get(nid) != -1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "labelled": len(common), "steps": len(reference), "accuracy": round(correct / len(common), 3) if common else None,
        "neg_precision": round(precision, 3), "neg_recall": round(recall, 3),
        "neg_f1": round(2 * precision * recall / (precision + recall), 3) if precision + recall else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--n-ctx", type=int, default=6144)
    parser.add_argument("--store", type=Path, default=ROOT / "stepforge-data" / "bench-agent")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-judge", action="store_true",
                        help="Tool checks and their propagation modes only: no model is loaded.")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} not found: the AgentProcessBench sample lives in ../shared/data (not in the project)")

    from stepforge.schemas.records import Evaluation, Node, Problem, Reject, Rollout
    from stepforge.stages.verify import agent_checks
    from stepforge.stages.consensus import policy as consensus
    from stepforge.stages.rollout.answers import AnswerChecker
    from stepforge.stages.ingest.sources import IngestConfig, run as ingest

    records = list(ingest(IngestConfig(source=str(args.data), format="agent_messages")))
    problems = [r for r in records if isinstance(r, Problem)]
    nodes = [r.model_dump() for r in records if isinstance(r, Node)]
    rollouts = [r.model_dump() for r in records if isinstance(r, Rollout)]
    human = {r.node_id: r.verdict for r in records if isinstance(r, Evaluation) and r.source == "human"}
    print(f"{len(rollouts)} trajectories, {len(nodes)} steps, {len(human)} human labels "
          f"({sum(v == -1 for v in human.values())} of them -1)")

    def relabel(evidence: list[dict], cfg) -> dict[str, int]:
        return {r.node_id: r.label for r in consensus.run(evidence, cfg, nodes) if not isinstance(r, Reject)}

    checker = AnswerChecker()
    tool = list(agent_checks.run(problems, rollouts, nodes, agent_checks.AgentCheckConfig(answer_match="cover"), checker))
    tool_evidence = [e.model_dump() for e in tool]
    methods: dict[str, dict[str, int]] = {"tool": {e.node_id: e.verdict for e in tool}}
    # The tool checks' labels under each error propagation (consensus ``tool`` policy, humans left out).
    for name, settings in {
        "tool@1 (no propagation)": {}, "tool@1+propagate (all_after)": {"propagate_errors": True},
        "tool@1+propagate_until_recovered@1": {"propagate_errors": True, "propagation": "until_recovered"},
    }.items():
        methods[name] = relabel(tool_evidence, consensus.ConsensusConfig(policy="tool", human_override=False, **settings))
    results: dict = {"data": str(args.data)}
    if not args.no_judge:
        from stepforge.stages.llm import BackendConfig, GenerationCache, GenerationClient, load_backend
        from stepforge.stages.verify import agent_judge

        args.store.mkdir(parents=True, exist_ok=True)
        backend = BackendConfig(kind="llamacpp", model=args.model, n_ctx=args.n_ctx)
        client = GenerationClient(load_backend(backend), GenerationCache(args.store / "generations.sqlite"))
        started = time.perf_counter()
        judged = list(agent_judge.run(problems, rollouts, nodes, agent_judge.AgentJudgeConfig(), client))
        seconds = time.perf_counter() - started
        judge_evals = [r for r in judged if isinstance(r, Evaluation)]
        rejects = [r for r in judged if isinstance(r, Reject)]
        evidence = [e.model_dump() for e in [*tool, *judge_evals]]
        methods["judge"] = {e.node_id: e.verdict for e in judge_evals}
        for name, cfg in {
            "vote+tool_veto": consensus.ConsensusConfig(policy="vote", human_override=False),
            "vote+tool_veto+propagate": consensus.ConsensusConfig(policy="vote", human_override=False, propagate_errors=True),
            "vote+tool_veto+propagate_until_recovered": consensus.ConsensusConfig(
                policy="vote", human_override=False, propagate_errors=True, propagation="until_recovered"),
            "judge+tool_veto": consensus.ConsensusConfig(policy="judge", human_override=False),
        }.items():
            methods[name] = relabel(evidence, cfg)
        histogram: dict[str, int] = {}
        for e in judge_evals:
            key = str(int(json.loads(e.meta)["score"]))
            histogram[key] = histogram.get(key, 0) + 1
        results.update({
            "model": client.model_id, "judge_seconds": round(seconds, 1), "judge_generated": client.stats.as_dict(),
            "judge_rejects": [r.reason for r in rejects], "score_histogram": histogram,
        })
        print(f"judge: {len(judge_evals)} steps graded in {seconds:.0f} s, {len(rejects)} unreadable; "
              f"scores {dict(sorted(histogram.items(), key=lambda kv: int(kv[0])))}")
    majority = {nid: 1 for nid in human}  # the trivial baseline: every step helpful
    results["methods"] = {name: scores(human, predicted) for name, predicted in {**methods, "all_plus_one": majority}.items()}
    print(f"{'method':40} {'labelled':>9} {'accuracy':>9} {'P(-1)':>7} {'R(-1)':>7} {'F1(-1)':>7}")
    for name, s in results["methods"].items():
        print(f"{name:40} {s['labelled']:>4}/{s['steps']:<4} {s['accuracy'] if s['accuracy'] is not None else '-':>9} "
              f"{s['neg_precision']:>7} {s['neg_recall']:>7} {s['neg_f1']:>7}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    checker.close()


if __name__ == "__main__":
    main()
