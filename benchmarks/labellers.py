"""Labellers against ground truth: accuracy, and completions and tokens spent per labelled step.

Two worlds:

- ``synthetic``: the synthetic world (stages/instruments/synthetic.py), a measuring instrument whose
  policy's mistakes are known, over a grid of error rates and solution lengths with fixed
  seeds. Ground truth: a step is right iff no step up to it has erred (the PRM800K /
  ProcessBench convention); the first error is known exactly.
- ``real``: ProcessBench GSM8K rows (human first-error labels; ../shared/data, Apache-2.0)
  as the policy's solutions, with a real CPU model (llama.cpp) writing the completions.

Each labeller runs its stage function over the same policy rollouts, then the ``mc_hard``
consensus; predicted first error = the first step labelled -1. "completions" counts the
completions the labeller asked for (cache hits included: a labeller's cost must not depend on
what ran before it), "tokens" the tokens of those completions.

    python benchmarks/labellers.py synthetic            # ~1 min (--recover 0.3, --phrasings 4: variants)
    python benchmarks/labellers.py real --rows 4 --k 4  # ~30-60 min with Qwen2.5-Coder-1.5B on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stepforge.schemas.ids import node_id, problem_id
from stepforge.schemas.records import Evaluation, Problem
from stepforge.stages.label import binary_search
from stepforge.stages.consensus import policy as consensus
from stepforge.stages.label import mc_label
from stepforge.stages.label import mcts
from stepforge.stages.rollout import sampling as rollout
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.llm import GenerationCache, GenerationClient
from stepforge.stages.instruments.synthetic import SyntheticBackend, WorldConfig, first_error, make_problems
from stepforge.stages.rollout.prompting import PromptConfig, SamplingConfig
from stepforge.stages.label.search import AdaptiveConfig
from stepforge.stages.rollout.split import SplitConfig


@dataclass
class Score:
    labeller: str
    rollouts: int = 0
    first_error_right: int = 0
    steps: int = 0
    steps_right: int = 0
    labelled_steps: int = 0
    completions: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def row(self) -> dict:
        per = max(self.labelled_steps, 1)
        return {
            "labeller": self.labeller,
            "first_error_acc": round(self.first_error_right / max(self.rollouts, 1), 3),
            "step_acc": round(self.steps_right / max(self.steps, 1), 3),
            "rollouts_scored": self.rollouts,
            "completions_per_step": round(self.completions / per, 2),
            "tokens_per_step": round(self.tokens / per, 1),
            "completions": self.completions,
        }


def labellers(k: int, sampling: SamplingConfig, split: SplitConfig, prompt: PromptConfig, mcts_iterations: int) -> dict[str, tuple]:
    common = {"sampling": sampling, "split": split, "prompt": prompt}
    adaptive = AdaptiveConfig(enabled=True, batch=1)
    return {
        f"mc K={k}": (mc_label, mc_label.MCLabelConfig(completions_per_step=k, **common)),
        f"mc K={k} adaptive": (mc_label, mc_label.MCLabelConfig(completions_per_step=k, adaptive=adaptive, **common)),
        f"binary k={k}": (binary_search, binary_search.BinarySearchConfig(completions_per_prefix=k, adaptive=AdaptiveConfig(), **common)),
        f"binary k={k} adaptive": (
            binary_search, binary_search.BinarySearchConfig(completions_per_prefix=k, adaptive=adaptive, **common)
        ),
        f"mcts {mcts_iterations}x4": (mcts, mcts.MCTSConfig(iterations=mcts_iterations, breadth=4, **common)),
    }


def score(
    name: str,
    module,
    config,
    problems: list[Problem],
    rollouts: list[dict],
    nodes: list[dict],
    client: GenerationClient,
    checker: AnswerChecker,
    truth: Callable[[dict, list[str]], int],
) -> Score:
    before = client.stats.samples
    started = time.perf_counter()
    records = list(module.run(problems, rollouts, nodes, config, client, checker))
    result = Score(name, seconds=time.perf_counter() - started)
    result.completions = client.stats.samples - before
    result.tokens = sum(r.num_tokens for r in records if r.TABLE == "rollouts")
    evaluations = [r.model_dump() for r in records if isinstance(r, Evaluation)]
    labels = {lab.node_id: lab.label for lab in consensus.run(evaluations, consensus.ConsensusConfig(policy="mc_hard"))}
    text = {n["node_id"]: n["text"] for n in nodes}
    for r in rollouts:
        ids = r["node_ids"]
        if not all(nid in labels for nid in ids):
            continue
        true_first = truth(r, [text[nid] for nid in ids])
        predicted = next((j for j, nid in enumerate(ids) if labels[nid] < 0), -1)
        result.rollouts += 1
        result.first_error_right += predicted == true_first
        for j, nid in enumerate(ids):
            result.steps += 1
            result.steps_right += (labels[nid] > 0) == (true_first == -1 or j < true_first)
    result.labelled_steps = sum(1 for r in rollouts for nid in r["node_ids"] if nid in labels)
    return result


def synthetic(args) -> list[dict]:
    checker = AnswerChecker()
    sampling = SamplingConfig(temperature=1.0, max_tokens=600, seed=1)
    split, prompt = SplitConfig(), PromptConfig()
    out = []
    for slip, wrong_op in ((0.05, 0.05), (0.1, 0.1), (0.15, 0.15)):
        for lengths in ((3, 4), (6, 8), (10, 12)):
            world = WorldConfig(slip_rate=slip, wrong_op_rate=wrong_op, recover_rate=args.recover, phrasings=args.phrasings)
            backend = SyntheticBackend(world)
            rows = make_problems(args.problems, lengths, seed=args.seed)
            problems = [
                Problem(problem_id=problem_id(r["question"], r["answer"].split("####")[-1].strip()), source="synthetic",
                        source_index=i, question=r["question"], gold_answer=r["answer"].split("####")[-1].strip())
                for i, r in enumerate(rows)
            ]
            question = {p.problem_id: p.question for p in problems}
            records = list(rollout.run(
                problems, rollout.RolloutConfig(samples_per_problem=4, sampling=sampling.model_copy(update={"seed": 0})),
                GenerationClient(backend), checker,
            ))
            rollouts = [r.model_dump() for r in records if r.TABLE == "rollouts"]
            nodes = [r.model_dump() for r in records if r.TABLE == "nodes"]
            truth = lambda r, steps: first_error(question[r["problem_id"]], steps)  # noqa: E731
            for name, (module, config) in labellers(args.k, sampling, split, prompt, args.mcts_iterations).items():
                s = score(name, module, config, problems, rollouts, nodes, GenerationClient(backend), checker, truth)
                row = {"slip": slip, "wrong_op": wrong_op, "steps": f"{lengths[0]}-{lengths[1]}", **s.row()}
                out.append(row)
                print(json.dumps(row), flush=True)
    checker.close()
    return out


def real(args) -> list[dict]:
    """ProcessBench GSM8K rows as policy solutions; completions from a real CPU model."""
    from stepforge.stages.llm.llamacpp import LlamaCppBackend

    data = Path(args.shared) / "data"
    bench = json.loads((data / "processbench_gsm8k_dev40.json").read_text())
    gold = {}
    for line in (data / "gsm8k_test.jsonl").read_text().splitlines():
        row = json.loads(line)
        gold[row["question"].strip()] = row["answer"].split("####")[-1].strip()
    # The shortest solutions first (CPU time), half with an error and half without.
    bench = sorted(bench, key=lambda r: sum(len(s) for s in r["steps"]))
    erroneous = [r for r in bench if r["label"] >= 0][: (args.rows + 1) // 2]
    clean = [r for r in bench if r["label"] < 0][: args.rows // 2]
    problems, rollouts, nodes, human = [], [], [], {}
    for index, row in enumerate(erroneous + clean):
        answer = gold[row["problem"].strip()]
        problem = Problem(problem_id=problem_id(row["problem"], answer), source="processbench", source_index=index,
                          question=row["problem"], gold_answer=answer)
        problems.append(problem)
        parent, ids = None, []
        for depth, step in enumerate(row["steps"], 1):
            nid = node_id(problem.problem_id, parent, step)
            nodes.append({"node_id": nid, "problem_id": problem.problem_id, "parent_id": parent, "depth": depth,
                          "text": step, "origin": "policy", "num_tokens": len(step.split())})
            ids.append(nid)
            parent = nid
        rid = row["id"]
        rollouts.append({"rollout_id": rid, "problem_id": problem.problem_id, "origin": "policy", "sample_index": 0,
                         "node_ids": ids,
                         "outcome": bool(row["final_answer_correct"]), "num_tokens": sum(len(s.split()) for s in row["steps"])})
        human[rid] = row["label"]
    backend = LlamaCppBackend(args.model, n_ctx=4096, max_in_flight=64)
    cache = GenerationCache(Path(args.store) / "generations.sqlite")
    checker = AnswerChecker()
    sampling = SamplingConfig(temperature=0.8, max_tokens=args.max_tokens, seed=1)
    # The demo's prompt: short steps keep a 1.5B model on two cores within minutes per row.
    prompt = PromptConfig(user_template="{question}\n\nSolve it step by step, one short step per paragraph, "
                          "writing only the arithmetic needed. End with the final answer in \\boxed{{}}.")
    out = []
    truth = lambda r, steps: human[r["rollout_id"]]  # noqa: E731
    chosen = labellers(args.k, sampling, SplitConfig(), prompt, args.mcts_iterations)
    for name in args.only or list(chosen):
        module, config = chosen[name]
        client = GenerationClient(backend, cache)
        s = score(name, module, config, problems, rollouts, nodes, client, checker, truth)
        row = {"model": backend.model_id, "rows": len(rollouts), **s.row(), "generated_now": client.stats.generated,
               "seconds": round(s.seconds)}
        out.append(row)
        print(json.dumps(row), flush=True)
    checker.close()
    backend.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="world", required=True)
    syn = sub.add_parser("synthetic")
    syn.add_argument("--problems", type=int, default=40)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--k", type=int, default=8)
    syn.add_argument("--recover", type=float, default=0.0)
    syn.add_argument("--phrasings", type=int, default=1, help="wordings per step (1: equal steps are equal text)")
    syn.add_argument("--mcts-iterations", type=int, default=20)
    rl = sub.add_parser("real")
    rl.add_argument("--model", default="qwen2.5-coder-1.5b")
    rl.add_argument("--rows", type=int, default=4)
    rl.add_argument("--k", type=int, default=4)
    rl.add_argument("--max-tokens", type=int, default=160)
    rl.add_argument("--mcts-iterations", type=int, default=3)
    rl.add_argument("--store", default="/tmp/stepforge-bench-labellers")
    rl.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    rl.add_argument("--only", nargs="*", help="labeller names to run (default: all)")
    rl.add_argument("--out", default=None)
    syn.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = synthetic(args) if args.world == "synthetic" else real(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
