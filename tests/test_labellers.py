"""Each labeller's defining behaviour, on the synthetic world (whose right answers are known exactly).

The synthetic world is a measuring instrument (stages/instruments/synthetic.py), not a stand-in for a
model: its policy's mistakes and every prefix's true success probability are known in closed
form, so a labeller's answers can be checked, not just run.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.schemas.ids import node_id
from stepforge.schemas.records import TABLES, Evaluation, Problem, Reject
from stepforge.stages.label import binary_search
from stepforge.stages.label import mc_label
from stepforge.stages.label import mcts
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.llm import GenerationCache, GenerationClient
from stepforge.stages.llm.base import GenerationRequest
from stepforge.stages.instruments.synthetic import SyntheticBackend, WorldConfig, first_error, make_problems, prefix_value
from stepforge.stages.rollout.prompting import PromptConfig, SamplingConfig, build_request
from stepforge.stages.label.search import AdaptiveConfig, ProblemSearch, seed_policy_rollouts, wilson_half_width
from stepforge.stages.rollout.split import SplitConfig, split_steps
from stepforge.stages.tree import TreeBuilder
from stepforge.storage.catalog import Catalog

SAMPLING = SamplingConfig(temperature=1.0, max_tokens=400, seed=1)


@pytest.fixture(scope="module")
def checker():
    checker = AnswerChecker()
    yield checker
    checker.close()


def problem_from(row: dict, index: int = 0) -> Problem:
    from stepforge.schemas.ids import problem_id

    gold = row["answer"].split("####")[-1].strip()
    return Problem(problem_id=problem_id(row["question"], gold), source="synthetic", source_index=index,
                   question=row["question"], gold_answer=gold)


def solve(backend: SyntheticBackend, problem: Problem, prefix: list[str] = (), temperature: float = 0.0) -> list[str]:
    """The world's continuation of ``prefix`` as steps (temperature 0: no new mistakes)."""
    request = build_request(problem.question, list(prefix), 1, PromptConfig(), SplitConfig(),
                            SamplingConfig(temperature=temperature, max_tokens=400))
    generation = asyncio.run(backend.generate(request, 7))
    return [*prefix, *split_steps(generation.text, SplitConfig())]


def with_slip(step: str) -> str:
    """The step with its result off by one (and its boxed answer, if it is the last): an arithmetic slip."""
    result = re.search(r"= (\d+)", step).group(1)
    wrong = str(int(result) + 1)
    return re.sub(rf"= {result}\b", f"= {wrong}", step.replace(f"\\boxed{{{result}}}", f"\\boxed{{{wrong}}}"))


def rollout_rows(problem: Problem, steps: list[str], outcome: bool, rollout_id: str = "r0") -> tuple[dict, dict[str, dict]]:
    nodes, parent, ids = {}, None, []
    for depth, text in enumerate(steps, 1):
        nid = node_id(problem.problem_id, parent, text)
        nodes[nid] = {"node_id": nid, "problem_id": problem.problem_id, "parent_id": parent, "depth": depth,
                      "text": text, "origin": "policy", "num_tokens": len(text.split())}
        ids.append(nid)
        parent = nid
    rollout = {"rollout_id": rollout_id, "problem_id": problem.problem_id, "origin": "policy", "sample_index": 0, "node_ids": ids,
               "outcome": outcome, "num_tokens": sum(n["num_tokens"] for n in nodes.values())}
    return rollout, nodes


def new_search(problem, backend, checker, nodes, stage="binary_search", origin="mc", sampling=SAMPLING) -> ProblemSearch:
    client = GenerationClient(backend)
    builder = TreeBuilder(SplitConfig(), checker, backend.count_tokens, backend.model_id, frozenset(nodes))
    completion = binary_search.BinarySearchConfig(adaptive=AdaptiveConfig(), sampling=sampling)
    return ProblemSearch(stage, origin, problem, client, builder, completion, nodes)


# -- binary search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [2, 3, 5, 8])
def test_binary_search_finds_the_first_error_in_at_most_ceil_log2_m_probes(length, checker):
    """An error-free world continues right prefixes correctly and wrong ones wrongly: V is 1 then 0."""
    backend = SyntheticBackend(WorldConfig(slip_rate=0.0, wrong_op_rate=0.0))
    problem = problem_from(make_problems(1, length, seed=length)[0])
    right = solve(backend, problem)
    assert len(right) == length
    config = binary_search.BinarySearchConfig(adaptive=AdaptiveConfig(), completions_per_prefix=4, sampling=SAMPLING)
    probe_counts = []
    for error_at in range(length):
        prefix = right[:error_at] + [with_slip(right[error_at])]
        steps = solve(backend, problem, prefix) if error_at < length - 1 else prefix
        assert first_error(problem.question, steps) == error_at
        rollout, nodes = rollout_rows(problem, steps, False)
        search = new_search(problem, backend, checker, nodes)
        seed_policy_rollouts(search, [rollout])
        result = asyncio.run(binary_search.search_first_error(search, "r0", rollout["node_ids"], 0, config))
        assert result.first_error == error_at
        assert len(result.probes) <= math.ceil(math.log2(length))
        probe_counts.append(len(result.probes))
        # Only probes that no earlier rollout answered cost completions: k each, nothing else.
        paid = [p for p in result.probes if not p["reused"]]
        assert search.completions == 4 * len(paid)
        positions = [p["position"] for p in result.probes]
        assert positions == sorted(set(positions), key=positions.index), "no prefix is probed twice"
    assert max(probe_counts) == math.ceil(math.log2(length)), "some first error needs all ⌈log₂M⌉ probes (none is skipped)"


def test_binary_search_reuses_rollouts_a_correct_solution_costs_nothing(checker):
    backend = SyntheticBackend(WorldConfig(slip_rate=0.0, wrong_op_rate=0.0))
    problem = problem_from(make_problems(1, 6, seed=3)[0])
    right = solve(backend, problem)
    wrong = solve(backend, problem, right[:4] + [with_slip(right[4])])
    good, good_nodes = rollout_rows(problem, right, True, "r-good")
    bad, bad_nodes = rollout_rows(problem, wrong, False, "r-bad")
    search = new_search(problem, backend, checker, {**good_nodes, **bad_nodes})
    seed_policy_rollouts(search, [good, bad])
    config = binary_search.BinarySearchConfig(adaptive=AdaptiveConfig(), completions_per_prefix=4, sampling=SAMPLING)
    result = asyncio.run(binary_search.search_first_error(search, "r-bad", bad["node_ids"], 0, config))
    assert result.first_error == 4
    # Steps 1-4 are shared with the correct rollout, so every probe among them is free.
    assert all(p["reused"] for p in result.probes if p["position"] < 4)
    assert search.completions == 4 * sum(not p["reused"] for p in result.probes) < 4 * len(result.probes) + 1


def run_labeller(labeller, problems, policy_rows, nodes, config, backend, checker):
    client = GenerationClient(backend)
    records = list(labeller.run(problems, policy_rows, nodes, config, client, checker))
    return records, client


def sample_policy(backend, problems, checker, n=4, seed=0):
    """Policy rollouts for the problems, through the real rollout stage."""
    from stepforge.stages.rollout import sampling as rollout

    config = rollout.RolloutConfig(samples_per_problem=n, sampling=SamplingConfig(temperature=1.0, max_tokens=400, seed=seed))
    records = list(rollout.run(problems, config, GenerationClient(backend), checker))
    rollouts = [r.model_dump() for r in records if r.TABLE == "rollouts"]
    nodes = [r.model_dump() for r in records if r.TABLE == "nodes"]
    return rollouts, nodes


def first_errors_from_labels(evaluations, consensus_policy, rollouts, nodes):
    from stepforge.stages.consensus import policy as consensus

    labels = {lab.node_id: lab.label for lab in consensus.run(evaluations, consensus.ConsensusConfig(policy=consensus_policy))}
    out = {}
    for r in rollouts:
        if all(n in labels for n in r["node_ids"]):
            out[r["rollout_id"]] = next((j for j, n in enumerate(r["node_ids"]) if labels[n] < 0), -1)
    return out


def test_every_wrong_rollout_search_labels_every_policy_step_like_mc(checker):
    """On a world where MC labels are exact (error-free continuations), both find the true first errors."""
    backend = SyntheticBackend(WorldConfig(slip_rate=0.15, wrong_op_rate=0.1))
    problems = [problem_from(row, i) for i, row in enumerate(make_problems(6, (3, 6), seed=11))]
    rollouts, nodes = sample_policy(backend, problems, checker)
    text = {n["node_id"]: n["text"] for n in nodes}
    question = {p.problem_id: p.question for p in problems}
    truth = {r["rollout_id"]: first_error(question[r["problem_id"]], [text[i] for i in r["node_ids"]]) for r in rollouts}
    assert -1 in truth.values() and any(v >= 0 for v in truth.values()), "the sample needs right and wrong rollouts"

    bs, bs_client = run_labeller(binary_search, problems, rollouts, nodes,
                                 binary_search.BinarySearchConfig(adaptive=AdaptiveConfig(), completions_per_prefix=8, sampling=SAMPLING),
                                 backend, checker)
    mc, mc_client = run_labeller(mc_label, problems, rollouts, nodes,
                                 mc_label.MCLabelConfig(completions_per_step=8, sampling=SAMPLING), backend, checker)
    bs_evals = [e.model_dump() for e in bs if isinstance(e, Evaluation)]
    mc_evals = [e.model_dump() for e in mc if isinstance(e, Evaluation)]
    assert {n for r in rollouts for n in r["node_ids"]} <= {e["node_id"] for e in bs_evals}, "every policy step decided"
    assert all(json.loads(e["meta"])["labeller"] == "binary_search/every_wrong_rollout" for e in bs_evals)
    bs_found = first_errors_from_labels(bs_evals, "mc_hard", rollouts, nodes)
    mc_found = first_errors_from_labels(mc_evals, "mc_hard", rollouts, nodes)
    bs_right = sum(bs_found[r] == truth[r] for r in truth)
    mc_right = sum(mc_found[r] == truth[r] for r in truth)
    assert bs_right >= mc_right - 1 and bs_right >= 0.8 * len(truth)
    assert bs_client.stats.generated < 0.6 * mc_client.stats.generated


def test_omegaprm_screens_questions_and_respects_its_budget(checker):
    backend = SyntheticBackend(WorldConfig(slip_rate=0.2, wrong_op_rate=0.1))
    problems = [problem_from(row, i) for i, row in enumerate(make_problems(8, (4, 6), seed=5))]
    rollouts, nodes = sample_policy(backend, problems, checker, n=4)
    config = binary_search.BinarySearchConfig(adaptive=AdaptiveConfig(), selection="omegaprm", max_searches=2, completions_per_prefix=4, sampling=SAMPLING)
    records, _ = run_labeller(binary_search, problems, rollouts, nodes, config, backend, checker)
    outcomes: dict[str, list[bool]] = {}
    for r in rollouts:
        outcomes.setdefault(r["problem_id"], []).append(bool(r["outcome"]))
    screened = {r.item: r.reason for r in records if isinstance(r, Reject) and r.reason.startswith("screened")}
    expected = {pid: "screened_all_correct" if all(o) else "screened_all_wrong"
                for pid, o in outcomes.items() if all(o) or not any(o)}
    assert screened == expected and len(expected) < len(problems), "the sample needs screened and searched problems"
    evaluations = [r for r in records if isinstance(r, Evaluation)]
    assert not {e.problem_id for e in evaluations} & set(screened), "screened problems are not labelled"
    per_problem = Counter()
    for e in evaluations:
        search = json.loads(e.meta).get("search")
        if search:
            per_problem[(e.problem_id, search["rollout_id"])] += 1
    searches = Counter(pid for pid, _ in per_problem)
    assert searches and max(searches.values()) <= 2, "at most max_searches binary searches per problem"


# -- adaptive sampling ---------------------------------------------------------------------------
def test_adaptive_sampling_keeps_hard_labels_and_spends_fewer_completions(checker):
    backend = SyntheticBackend(WorldConfig(slip_rate=0.2, wrong_op_rate=0.1))
    problems = [problem_from(row, i) for i, row in enumerate(make_problems(10, (4, 6), seed=2))]
    rollouts, nodes = sample_policy(backend, problems, checker)
    full = mc_label.MCLabelConfig(completions_per_step=8, sampling=SAMPLING)
    adaptive = full.model_copy(update={"adaptive": AdaptiveConfig(enabled=True, batch=1)})
    full_records, full_client = run_labeller(mc_label, problems, rollouts, nodes, full, backend, checker)
    fast_records, fast_client = run_labeller(mc_label, problems, rollouts, nodes, adaptive, backend, checker)
    hard = lambda records: {e.node_id: e.successes > 0 for e in records if isinstance(e, Evaluation) and e.source == "mc"}  # noqa: E731
    costs = [e for e in fast_records if isinstance(e, Evaluation) and e.source == "mc"]
    free = {e.node_id for e in costs if json.loads(e.meta).get("from_policy_rollouts")}
    assert free, "steps of correct policy rollouts are decided without completions"
    fast, full = hard(fast_records), hard(full_records)
    assert all(fast[n] for n in free), "a policy rollout through the step reached the answer: +1"
    assert {n: v for n, v in fast.items() if n not in free} == {n: v for n, v in full.items() if n not in free}, (
        "stopping at the first success never changes a hard label"
    )
    assert fast_client.stats.generated < 0.85 * full_client.stats.generated
    assert any(json.loads(e.meta)["stopped_early"] for e in costs if e.node_id not in free)
    assert all(e.n == 8 for e in costs if e.successes == 0), "a negative label still costs all K completions"
    # Its samples are the first ones the full run drew: the same cache entries.
    full_keys = {r.generation_key for r in full_records if r.TABLE == "rollouts"}
    assert {r.generation_key for r in fast_records if r.TABLE == "rollouts"} <= full_keys


def test_soft_target_stops_when_the_interval_is_narrow():
    config = AdaptiveConfig(enabled=True, target="soft", ci_half_width=0.2, min_samples=4)
    assert not config.decided(2, 3)
    assert wilson_half_width(0, 20) < 0.2 and config.decided(0, 20)
    assert not config.decided(5, 10), "half the completions right after 10: still too uncertain"


# -- MCTS ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [4, 6])
def test_mcts_values_converge_to_the_true_success_probability(seed, checker):
    """Exploration dominant + progressive widening: visits follow the policy and Q → V (the closed form).

    The error shrinks with the budget because each step's prior is estimated from more of the
    policy's samples; measured here (seeds 4-6): root error 0.02-0.11 at 100 iterations,
    0.002-0.045 at 3000. With the papers' c_puct (1.5) the same runs give Q ≈ 0.95 at a root
    whose true value is 0.48: the search's value, not the policy's.
    """
    world = WorldConfig(slip_rate=0.2, wrong_op_rate=0.1, recover_rate=0.3)
    backend = SyntheticBackend(world)
    problem = problem_from(make_problems(1, 3, seed=seed)[0])
    rollouts, nodes = sample_policy(backend, [problem], checker, n=8)

    def errors(iterations: int) -> tuple[float, list[tuple[int, float]]]:
        config = mcts.MCTSConfig(iterations=iterations, breadth=4, c_puct=1e4, widening_exponent=0.7, sampling=SAMPLING)
        records, _ = run_labeller(mcts, [problem], rollouts, nodes, config, backend, checker)
        text = {n["node_id"]: n["text"] for n in nodes} | {r.node_id: r.text for r in records if r.TABLE == "nodes"}
        parent = {n["node_id"]: n["parent_id"] for n in nodes} | {r.node_id: r.parent_id for r in records if r.TABLE == "nodes"}

        def steps(nid):
            out = []
            while nid:
                out.append(text[nid])
                nid = parent[nid]
            return out[::-1]

        evaluations = [r for r in records if isinstance(r, Evaluation)]
        assert evaluations and all(e.source == "mcts" for e in evaluations)
        root = abs(json.loads(evaluations[0].meta)["root_q"] - prefix_value(problem.question, [], world))
        return root, [(e.n, abs(e.value - prefix_value(problem.question, steps(e.node_id), world))) for e in evaluations]

    root, per_node = errors(3000)
    assert root < 0.05
    busy = [err for n, err in per_node if n >= 300]
    assert len(busy) >= 3 and max(busy) < 0.1, per_node


def test_mcts_with_small_c_puct_concentrates_on_the_best_continuation(checker):
    world = WorldConfig(slip_rate=0.2, wrong_op_rate=0.2)
    backend = SyntheticBackend(world)
    problem = problem_from(make_problems(1, 4, seed=9)[0])
    rollouts, nodes = sample_policy(backend, [problem], checker, n=4)
    config = mcts.MCTSConfig(iterations=60, breadth=3, c_puct=0.5, sampling=SAMPLING)
    records, client = run_labeller(mcts, [problem], rollouts, nodes, config, backend, checker)
    assert client.stats.generated <= 60 * 3
    evaluations = {e.node_id: e for e in records if isinstance(e, Evaluation)}
    depth = {n["node_id"]: n["depth"] for n in nodes} | {r.node_id: r.depth for r in records if r.TABLE == "nodes"}
    first_steps = [e for nid, e in evaluations.items() if depth[nid] == 1]
    best = max(first_steps, key=lambda e: e.n)
    assert best.value == max(e.value for e in first_steps if e.n >= 5), "the most visited first step is the best one"
    assert best.value > prefix_value(problem.question, [], world), "search values exceed the policy's average"


# -- resume: a labeller killed part-way replays its completions and makes the same labels -----------
class InjectedCrash(BaseException):
    """Stands in for a killed process (an injected fault; BaseException so no stage turns it into a row)."""


class CrashAfter:
    """Wraps a backend and raises InjectedCrash after ``limit`` generations (an injected fault)."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.count = inner, limit, 0
        self.model_id, self.max_in_flight = inner.model_id, inner.max_in_flight

    async def generate(self, request: GenerationRequest, seed: int):
        self.count += 1
        if self.count > self.limit:
            raise InjectedCrash()
        return await self.inner.generate(request, seed)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def close(self) -> None:
        pass


def synthetic_config(tmp: Path, store: str, labeller: str) -> RunConfig:
    source = tmp / "problems.jsonl"
    if not source.exists():
        source.write_text("".join(json.dumps(r) + "\n" for r in make_problems(12, (3, 6), seed=21)))
    sampling = {"temperature": 1.0, "max_tokens": 400, "seed": 1}
    return RunConfig.model_validate({
        "run": "resume", "store": str(tmp / store), "shard_size": 4, "labeller": labeller,
        "backend": {"kind": "synthetic", "world": {"slip_rate": 0.15, "wrong_op_rate": 0.1, "recover_rate": 0.2}},
        "ingest": {"source": str(source), "format": "gsm8k"},
        "rollout": {"samples_per_problem": 4, "sampling": {**sampling, "seed": 0}},
        "mc_label": {"completions_per_step": 4, "sampling": sampling},
        "binary_search": {"completions_per_prefix": 4, "selection": "omegaprm", "max_searches": 3, "sampling": sampling},
        "mcts": {"iterations": 12, "breadth": 3, "sampling": sampling},
        "pairs": {"kinds": ["step_dpo"]},
    })


def run_all(config: RunConfig, crash_after: int | None = None) -> runtime.RunContext:
    ctx = runtime.RunContext(config)
    if crash_after is not None:
        from stepforge.stages.llm import load_backend

        cache = GenerationCache(ctx.store.root / "cache" / "generations.sqlite")
        ctx.clients["generation"] = GenerationClient(CrashAfter(load_backend(config.backend), crash_after), cache)
    for problem_shard in runtime.ingest_shards(ctx)[0]:
        runtime.run_chain(ctx, problem_shard)
    return ctx


def stored_rows(store: Path) -> dict[str, list[str]]:
    with Catalog(store) as catalog:
        catalog.refresh()
        return {t: sorted(json.dumps(r, sort_keys=True, default=str) for r in catalog.query(f"select * from {t}").to_pylist())
                for t in TABLES}


@pytest.mark.parametrize("labeller", ["mc", "binary_search", "mcts"])
def test_a_labeller_killed_part_way_resumes_to_the_same_labels_without_regenerating(tmp_path, labeller):
    whole = run_all(synthetic_config(tmp_path, "whole", labeller))
    total = whole.client().stats.generated
    assert total > 100

    crash_at = total * 2 // 3  # well inside the labelling stage (rollouts are 48 samples)
    with pytest.raises(InjectedCrash):
        run_all(synthetic_config(tmp_path, "killed", labeller), crash_after=crash_at)
    resumed = run_all(synthetic_config(tmp_path, "killed", labeller))
    assert resumed.client().stats.generated == total - crash_at, "nothing generated before the crash is generated again"

    expected, got = stored_rows(tmp_path / "whole"), stored_rows(tmp_path / "killed")
    for table in TABLES:
        assert got[table] == expected[table], f"{table} differs after resume"
    assert expected["labels"], "the run made labels"


def test_mcts_widening_at_the_root_never_redraws_a_policy_rollout(checker):
    """With the rollout stage's own sampling, root sample i is policy rollout i: widening must draw new ones."""
    backend = SyntheticBackend(WorldConfig(slip_rate=0.2, wrong_op_rate=0.1))
    problem = problem_from(make_problems(1, 3, seed=8)[0])
    rollouts, nodes = sample_policy(backend, [problem], checker, n=4, seed=0)
    same_sampling = SamplingConfig(temperature=1.0, max_tokens=400, seed=0)
    config = mcts.MCTSConfig(iterations=30, breadth=2, c_puct=2.0, widening_exponent=0.7, sampling=same_sampling)
    records, _ = run_labeller(mcts, [problem], rollouts, nodes, config, backend, checker)
    policy_keys = {r["generation_key"] for r in rollouts}
    mcts_rollouts = [r for r in records if r.TABLE == "rollouts"]
    assert any(r.prefix_node_id is None for r in mcts_rollouts), "widening sampled at the root"
    assert not policy_keys & {r.generation_key for r in mcts_rollouts}
    assert len({r.rollout_id for r in mcts_rollouts}) == len(mcts_rollouts)


class FailEvery:
    """Wraps a backend and raises on every ``period``-th generation (an injected infrastructure fault)."""

    def __init__(self, inner, period: int):
        self.inner, self.period, self.count = inner, period, 0
        self.model_id, self.max_in_flight = inner.model_id, inner.max_in_flight

    async def generate(self, request: GenerationRequest, seed: int):
        self.count += 1
        if self.count % self.period == 0:
            raise RuntimeError("injected: connection reset")
        return await self.inner.generate(request, seed)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def close(self) -> None:
        pass


def test_failed_samples_become_generation_failed_rows_and_every_stage_goes_on(checker):
    from stepforge.stages.rollout import sampling as rollout

    backend = FailEvery(SyntheticBackend(WorldConfig(slip_rate=0.2, wrong_op_rate=0.1)), period=3)
    problems = [problem_from(row, i) for i, row in enumerate(make_problems(4, (3, 5), seed=6))]
    config = rollout.RolloutConfig(samples_per_problem=3, sampling=SamplingConfig(temperature=1.0, max_tokens=400))
    records = list(rollout.run(problems, config, GenerationClient(backend), checker))
    failed = [r for r in records if isinstance(r, Reject)]
    assert failed and all(r.reason == "generation_failed" and "connection reset" in r.detail for r in failed)
    rollouts = [r.model_dump() for r in records if r.TABLE == "rollouts"]
    assert len(rollouts) + len(failed) == 12, "every sample is a rollout or a reject"
    nodes = [r.model_dump() for r in records if r.TABLE == "nodes"]

    mc = list(mc_label.run(problems, rollouts, nodes, mc_label.MCLabelConfig(completions_per_step=3, sampling=SAMPLING),
                           GenerationClient(backend), checker))
    mc_failed = Counter(r.item.split("#")[0] for r in mc if isinstance(r, Reject) and r.reason == "generation_failed")
    assert mc_failed
    for e in (r for r in mc if isinstance(r, Evaluation) and r.source == "mc"):
        assert e.n == 3 - mc_failed[e.node_id], "a failed sample is drawn but is not evidence"

    searched = list(binary_search.run(problems, rollouts, nodes, binary_search.BinarySearchConfig(adaptive=AdaptiveConfig(),
        completions_per_prefix=3, sampling=SAMPLING), GenerationClient(backend), checker))
    assert any(isinstance(r, Reject) and r.reason == "generation_failed" for r in searched)
    assert any(isinstance(r, Evaluation) for r in searched)
