"""Monte Carlo tree search over steps (AlphaMath, MCTS-DPO): Q and N for every step it reaches.

One iteration: *select* a path from the problem down the expanded steps by PUCT,
Q(s,a) + c_puct·P(s,a)·√N(s)/(1+N(s,a)); *expand* the step it stops at by sampling ``breadth``
completions after it — each completion's first step is a candidate next step, and the rest
of it is that candidate's *simulation* to a final answer, so expansion and simulation cost
one generation; *back up* each completion's outcome (1 or 0) along its whole path. A final
step is re-scored without generating; a step at ``max_depth`` is evaluated by one more
simulation instead of being expanded. The policy rollouts seed the tree: they are the
root's first expansion. Optional progressive widening (Coulom 2007) gives an expanded step
one more sample whenever its samples fall below N^exponent: a step's possible next steps are
unbounded, so a fixed breadth leaves its prior at whatever the first few samples said.

The prior P(s,a) is the share of the policy's own samples after s that continued with a
(``ProblemSearch.transitions``: selection never adds to it), so with exploration dominant
(large c_puct) and widening on, visits follow the policy and Q converges to the policy's
success probability (tests/test_labellers.py measures it against the synthetic world);
with the papers' c_puct (1.5) visits concentrate on the best continuations and Q estimates
the value of the search policy, which is what AlphaMath trains its value head on.

Writes an ``mcts`` evaluation per step in the tree: value = Q = W/N, n = N, successes = W.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar

from pydantic import Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Problem, Record, Rollout
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.label.labeller import labeller_stage
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient
from stepforge.stages.label.search import (
    ROOT,
    CompletionConfig,
    ProblemSearch,
    labeller_inputs,
    seed_policy_rollouts,
)

STAGE = "mcts"
VERSION = 1


class MCTSConfig(CompletionConfig):
    """Sampling, prompt and split (shared with the rollout stage) come from ``CompletionConfig``."""

    # Settings added after stores existed, with the value that reproduces what those stores hold:
    # left out of the stage key at that value, and given it when an old run's recorded config
    # lacks them (``flows.runtime.context.upgrade_recorded``), so an old run resumes without regenerating.
    LEGACY: ClassVar[dict[str, object]] = {"parallel_simulations": 1}

    iterations: int = Field(default=40, ge=1, description="Select-expand-backup iterations per problem.")
    breadth: int = Field(default=5, ge=1, description="Completions sampled when a step is expanded (candidate next steps).")
    max_depth: int = Field(default=8, ge=1, description="Steps deeper than this are simulated once more instead of expanded.")
    c_puct: float = Field(default=1.5, ge=0.0, description="Exploration weight of the PUCT selection rule.")
    parallel_simulations: int = Field(
        default=8, ge=1,
        description="Simulations expanded at once per problem: each round selects up to this many leaves (with a "
        "virtual loss on each selected path, so they spread out), samples them all concurrently, then backs them "
        "up in selection order. Keeps a batching server busy; 1 is sequential MCTS (the papers').",
    )
    widening_exponent: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Progressive widening: an expanded step visited N times gets one more sample whenever the "
        "policy's samples after it number fewer than N^exponent, so its prior keeps converging to the policy's "
        "next-step distribution. None = the papers' fixed breadth.",
    )


class TreeStats:
    """N (visits) and W (total reward) per step as MCTS backs them up; ROOT is the problem."""

    def __init__(self) -> None:
        self.n: Counter[str] = Counter()
        self.w: Counter[str] = Counter()

    def backup(self, path: Iterable[str], reward: int) -> None:
        for nid in path:
            self.n[nid] += 1
            self.w[nid] += reward

    def unvisit(self, path: Iterable[str]) -> None:
        """Take back a virtual loss (a visit with reward 0) along ``path``."""
        for nid in path:
            self.n[nid] -= 1

    def q(self, nid: str) -> float:
        return self.w[nid] / self.n[nid] if self.n[nid] else 0.0


def policy_samples(search: ProblemSearch, parent: str) -> int:
    """How many of the policy's own samples continued after ``parent`` (the evidence behind its prior)."""
    return sum(search.transitions[(parent, c)] for c in search.children.get(parent, ()))


def prior(search: ProblemSearch, parent: str, child: str) -> float:
    """The policy's own share of samples after ``parent`` that continued with ``child``."""
    total = policy_samples(search, parent)
    if not total:
        return 1.0 / max(len(search.children.get(parent, ())), 1)
    return search.transitions[(parent, child)] / total


def select_child(search: ProblemSearch, stats: TreeStats, parent: str, c_puct: float) -> str:
    """PUCT: the child maximising Q + c·P·√N(parent)/(1+N(child)); ties go to the smaller id."""
    sqrt_n = math.sqrt(stats.n[parent])
    return max(
        sorted(search.children[parent]),
        key=lambda c: stats.q(c) + c_puct * prior(search, parent, c) * sqrt_n / (1 + stats.n[c]),
    )


def _full_path(rollout: Rollout | None, prefix_path: list[str]) -> list[str]:
    return [ROOT, *(rollout.node_ids if rollout is not None else prefix_path[1:])]


def _select(search: ProblemSearch, stats: TreeStats, expanded: set[str], config: MCTSConfig) -> tuple[str, list[str], bool]:
    """Descend by PUCT through expanded steps: the step to grow, its path, and whether it is a widening."""
    node, path = ROOT, [ROOT]
    while node in expanded:
        if config.widening_exponent is not None and policy_samples(search, node) < stats.n[node] ** config.widening_exponent:
            return node, path, True
        if not search.children.get(node):
            break
        node = select_child(search, stats, node, config.c_puct)
        path.append(node)
    return node, path, False


async def search_problem(search: ProblemSearch, policy: list[dict], config: MCTSConfig) -> TreeStats:
    """``config.iterations`` select-expand-backup iterations, up to ``parallel_simulations`` of them
    per round: a round selects its leaves one after another, each selection adding a virtual visit
    (a loss) along its path so the next one spreads to other branches, then expands them all at
    once and backs the results up in selection order. Decisions depend only on results, never on
    which answer arrived first; with one simulation per round it is plain sequential MCTS."""
    stats = TreeStats()
    for rollout in policy:
        stats.backup([ROOT, *rollout["node_ids"]], int(bool(rollout["outcome"])))
    expanded = {ROOT} if policy else set()
    done, exhausted = 0, False
    while done < config.iterations and not exhausted:
        batch: list[tuple[str, list[str], int]] = []
        while done < config.iterations and len(batch) < config.parallel_simulations:
            node, path, widen = _select(search, stats, expanded, config)
            if any(node == pending for pending, _, _ in batch):
                break  # this round already grows it: select again once its results are in
            if node in expanded and not widen:
                exhausted = True  # every expansion of this step failed: nothing left to grow
                break
            done += 1
            if not widen and node != ROOT and search.is_terminal(node):
                # A final step: its reward is known; re-scoring it costs no generation.
                stats.backup(path, int(2 * search.successes[node] > search.visits[node]))
                continue
            simulations = 1 if widen or len(path) - 1 >= config.max_depth else config.breadth
            if not widen and simulations == config.breadth:
                expanded.add(node)
            batch.append((node, path, simulations))
            stats.backup(path, 0)  # the virtual loss, taken back before the real backup
        if not batch:
            continue
        fetched = await asyncio.gather(*(search.fetch(None if node == ROOT else node, k) for node, _, k in batch))
        for (node, path, _), got in zip(batch, fetched):
            stats.unvisit(path)
            for rollout in search.fold(got):
                stats.backup(_full_path(rollout, path), int(bool(rollout and rollout.outcome)))
    return stats


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: MCTSConfig,
    client: GenerationClient,
    checker: AnswerChecker,
    on_problem_done: Callable[[], None] | None = None,
    agent=None,
) -> Iterator[Record]:
    """``mcts`` evaluations for every step in each problem's tree, plus the expansions' rollouts and nodes."""
    nodes_by_problem, by_problem, builder = labeller_inputs(rollouts, nodes, config, client, checker)
    config_hash = content_hash(config.model_dump())

    async def label_problem(problem: Problem) -> list[Record]:
        search = ProblemSearch(
            STAGE, "mcts", problem, client, builder, config, nodes_by_problem.get(problem.problem_id, {}), agent
        )
        policy = seed_policy_rollouts(search, by_problem.get(problem.problem_id, []))
        stats = await search_problem(search, policy, config)
        records: list[Record] = []
        for nid in sorted(k for k in stats.n if k != ROOT):
            parent = search.parent.get(nid) or ROOT
            meta = {
                "labeller": STAGE, "iterations": config.iterations, "c_puct": config.c_puct,
                "prior": round(prior(search, parent, nid), 6), "terminal": search.is_terminal(nid),
                "completions_from_here": search.drawn[nid], "root_n": stats.n[ROOT], "root_q": round(stats.q(ROOT), 6),
            }
            records.append(
                Evaluation(
                    evaluation_id=content_hash("eval", nid, "mcts", client.model_id, config_hash),
                    node_id=nid, problem_id=problem.problem_id, source="mcts", value=stats.q(nid), n=stats.n[nid],
                    successes=stats.w[nid], model=client.model_id, cost_tokens=search.tokens_from[nid],
                    meta=json.dumps(meta, sort_keys=True),
                )
            )
        records.extend(search.records())
        if on_problem_done:
            on_problem_done()
        return records

    yield from run_in_order(problems, label_problem)


def _label(problems, rollouts, nodes, config, client, checker, advance, agent=None):
    return run(problems, rollouts, nodes, config, client, checker, on_problem_done=advance, agent=agent)


SPEC = labeller_stage(STAGE, VERSION, "mcts", "mcts", _label, doc="AlphaMath-style tree search: Q and N per step (labeller: mcts).")
