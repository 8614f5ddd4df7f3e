"""Binary search for the first error, and the OmegaPRM search that chooses what to search (Luo et al. 2024).

A solution whose final answer is wrong has a first step after which the answer can no longer
be reached (Monte Carlo value 0). Instead of K completions after *every* step (Math-Shepherd,
O(K·M) for M steps), binary search estimates the midpoint prefix: value 0 → the first error
is at or before it, otherwise after it — O(K·log M). Rollout reuse (``stages.label.search``) makes
many midpoints free: a prefix some earlier rollout passed through on its way to the right
answer needs no completion at all, and correct solutions cost nothing.

Two selections:

- ``every_wrong_rollout``: binary-search each wrong policy rollout, in rollout-id order. Every
  step of every policy rollout gets a label; the like-for-like replacement of Math-Shepherd MC.
- ``omegaprm``: OmegaPRM's tree search. States are prefixes with an MC value and a visit count
  N; the candidates are (state, wrong rollout from it) pairs, scored
  Q = α^(1−MC(s))·β^(len(r)/L) plus U = c_puct·√(ΣN)/(1+N(s)); the best is binary-searched,
  every midpoint it measures becomes a state, and that state's wrong completions become new
  candidates while its value is strictly between 0 and 1. Stops at the search or completion
  budget. Question screening skips problems whose policy rollouts are all right or all wrong.

What is written: an ``mc`` evaluation for every step whose label the search decided — a step
some rollout passed through on its way to the right answer (successes > 0), and every step
from a searched rollout's first error on (``verdict`` −1, confidence from the completions
that showed the error) — with the search path in ``meta``. A step the search did not reach
gets no evaluation rather than a guess.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Problem, Record, Reject
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.label.labeller import labeller_stage
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient
from stepforge.stages.label.search import (
    AdaptiveConfig,
    CompletionConfig,
    ProblemSearch,
    labeller_inputs,
    seed_policy_rollouts,
)

STAGE = "binary_search"
VERSION = 1


class BinarySearchConfig(CompletionConfig):
    """Sampling, prompt and split (shared with the rollout stage) come from ``CompletionConfig``."""

    completions_per_prefix: int = Field(default=8, ge=1, description="k: completions that estimate one midpoint prefix.")
    adaptive: AdaptiveConfig = Field(
        default_factory=lambda: AdaptiveConfig(enabled=True),
        description="Stop a midpoint's sampling at its first success (the search only asks 'is the value 0?'); on by "
        "default.",
    )
    selection: Literal["every_wrong_rollout", "omegaprm"] = Field(
        default="every_wrong_rollout",
        description="every_wrong_rollout: search each wrong policy rollout (labels every policy step); "
        "omegaprm: OmegaPRM's Q+U selection over (state, rollout) candidates within a budget.",
    )
    alpha: float = Field(default=0.5, gt=0.0, le=1.0, description="OmegaPRM Q = alpha^(1-MC) * beta^(len/L): prefers states with high MC.")
    beta: float = Field(default=0.9, gt=0.0, le=1.0, description="OmegaPRM Q: prefers short rollouts (errors easier to locate).")
    length_scale: float = Field(default=500.0, gt=0.0, description="OmegaPRM L: rollout length (tokens) normaliser in Q.")
    c_puct: float = Field(default=0.125, ge=0.0, description="OmegaPRM exploration weight of U = c_puct*sqrt(sum N)/(1+N(s)).")
    max_searches: int = Field(default=100, ge=1, description="OmegaPRM: binary searches per problem at most.")
    max_completions: int | None = Field(
        default=None, ge=1, description="OmegaPRM: completions per problem at most (checked before each search); None = no cap."
    )
    screen_questions: bool = Field(
        default=True, description="OmegaPRM: skip problems whose policy rollouts are all right or all wrong."
    )
    lockstep: bool = Field(
        default=True,
        description="every_wrong_rollout: search all of a problem's wrong rollouts at once, in rounds (their unknown "
        "midpoints estimated together), so many prefixes are in flight; false searches one rollout after another "
        "(each search may then reuse what the earlier ones estimated, at the cost of round trips).",
    )

    # Settings added after stores existed, with the value that reproduces those stores (left out of
    # the key at that value; given to an old run's recorded config that lacks it).
    LEGACY: ClassVar[dict[str, object]] = {"lockstep": False}


@dataclass
class SearchResult:
    """One binary search over one rollout: where the first error is and what it looked at."""

    rollout_id: str
    node_ids: list[str]
    first_error: int  # position in node_ids
    probes: list[dict] = field(default_factory=list)  # in search order: position, node, drawn, successes, reused
    error_evidence: int = 0  # completions that showed the first error's prefix cannot succeed


async def search_first_error(
    search: ProblemSearch, rollout_id: str, node_ids: list[str], start: int, config: BinarySearchConfig
) -> SearchResult:
    """The first position p ≥ start whose prefix has Monte Carlo value 0; the last step is known to be 0.

    Invariant: every prefix before ``lo`` can reach the answer, the prefix through ``hi``
    cannot. A prefix some rollout already passed through on its way to the answer is positive
    without a completion (rollout reuse).
    """
    lo, hi = start, len(node_ids) - 1
    result = SearchResult(rollout_id, node_ids, hi)
    evidence = {hi: 1}  # the rollout itself failed through its last step
    while lo < hi:
        mid = (lo + hi) // 2
        nid = node_ids[mid]
        # Known already: a rollout went through the prefix to the answer, or an earlier search
        # of this problem spent its k completions on the prefix and none succeeded.
        known_zero = search.drawn[nid] >= config.completions_per_prefix and not search.successes[nid]
        probe = {"position": mid, "node_id": nid, "drawn": 0, "successes": 0,
                 "reused": search.successes[nid] > 0 or known_zero}
        if not probe["reused"]:
            estimate = await search.estimate(nid, config.completions_per_prefix, config.adaptive)
            probe["drawn"], probe["successes"] = estimate.drawn, estimate.successes
        positive = search.successes[nid] > 0
        result.probes.append(probe)
        if positive:
            lo = mid + 1
        else:
            hi = mid
            evidence[mid] = search.drawn[nid]
    result.first_error = lo
    result.error_evidence = evidence.get(lo, 0)
    return result


def _screen(policy: list[dict]) -> str | None:
    outcomes = [bool(r["outcome"]) for r in policy]
    if all(outcomes):
        return "screened_all_correct"
    if not any(outcomes):
        return "screened_all_wrong"
    return None


async def _every_wrong_rollout(search: ProblemSearch, policy: list[dict], config: BinarySearchConfig) -> list[SearchResult]:
    wrong = [r for r in policy if r["outcome"] is False]
    if config.lockstep:
        return await _lockstep(search, wrong, config)
    results = []
    for rollout in wrong:
        results.append(await search_first_error(search, rollout["rollout_id"], rollout["node_ids"], 0, config))
    return results


class _Bisection:
    """One rollout's binary search as a state machine, for ``_lockstep`` (same invariant as
    ``search_first_error``: every prefix before ``lo`` can reach the answer, the one through ``hi`` cannot)."""

    def __init__(self, rollout: dict):
        node_ids = rollout["node_ids"]
        self.lo, self.hi = 0, len(node_ids) - 1
        self.result = SearchResult(rollout["rollout_id"], node_ids, self.hi)
        self.evidence = {self.hi: 1}

    @property
    def mid(self) -> int:
        return (self.lo + self.hi) // 2

    def decide(self, search: ProblemSearch, probe: dict) -> None:
        self.result.probes.append(probe)
        if search.successes[probe["node_id"]] > 0:
            self.lo = self.mid + 1
        else:
            self.evidence[self.mid] = search.drawn[probe["node_id"]]
            self.hi = self.mid

    def finish(self) -> SearchResult:
        self.result.first_error = self.lo
        self.result.error_evidence = self.evidence.get(self.lo, 0)
        return self.result


async def _lockstep(search: ProblemSearch, wrong: list[dict], config: BinarySearchConfig) -> list[SearchResult]:
    """Every wrong rollout's binary search at once, in rounds: each round, every open search walks
    past the midpoints already known (rollout reuse, or k completions spent without success) to
    its first unknown one; the unknown midpoints of all searches are then estimated together —
    one estimate per distinct prefix, its adaptive rounds in step with the others', each round's
    completions folded in the searches' order — and every search takes its decision. Decisions
    depend only on results, never on arrival order; a search meeting a prefix another search
    estimated this round reuses it, as it would have searching after it."""
    k = config.completions_per_prefix
    bisections = [_Bisection(r) for r in wrong]
    while True:
        waiting: dict[str, list[_Bisection]] = {}
        for b in bisections:
            while b.lo < b.hi:
                nid = b.result.node_ids[b.mid]
                known_zero = search.drawn[nid] >= k and not search.successes[nid]
                if not (search.successes[nid] > 0 or known_zero):
                    waiting.setdefault(nid, []).append(b)
                    break
                b.decide(search, {"position": b.mid, "node_id": nid, "drawn": 0, "successes": 0, "reused": True})
        if not waiting:
            return [b.finish() for b in bisections]
        for nid, estimate in (await search.estimate_together(list(waiting), k, config.adaptive)).items():
            first, *others = waiting[nid]
            first.decide(search, {"position": first.mid, "node_id": nid, "drawn": estimate.drawn,
                                  "successes": estimate.successes, "reused": False})
            for b in others:
                b.decide(search, {"position": b.mid, "node_id": nid, "drawn": 0, "successes": 0, "reused": True})


async def _omegaprm(search: ProblemSearch, policy: list[dict], config: BinarySearchConfig) -> list[SearchResult]:
    """OmegaPRM's selection loop (Algorithm 1): pick the best (state, rollout), binary-search it, grow the pool."""
    visits: dict[str, int] = defaultdict(int)  # N(s): times a state was selected
    mc: dict[str, float] = {"": search.value("") or 0.0}
    # candidate: (state key, state position in the rollout, rollout id, node ids, generated tokens)
    pool: list[tuple[str, int, str, list[str], int]] = [
        ("", 0, r["rollout_id"], r["node_ids"], r["num_tokens"]) for r in policy if r["outcome"] is False
    ]
    results: list[SearchResult] = []
    while pool and len(results) < config.max_searches:
        if config.max_completions is not None and search.completions >= config.max_completions:
            break
        total_visits = sum(visits.values())

        def score(candidate: tuple[str, int, str, list[str], int]) -> float:
            state, _, _, _, length = candidate
            q = config.alpha ** (1 - mc[state]) * config.beta ** (length / config.length_scale)
            u = config.c_puct * math.sqrt(total_visits) / (1 + visits[state])
            return q + u

        best = max(pool, key=lambda c: (score(c), c[2]))
        pool.remove(best)
        state, start, rollout_id, node_ids, _ = best
        visits[state] += 1
        result = await search_first_error(search, rollout_id, node_ids, start, config)
        results.append(result)
        for probe in result.probes:
            nid = probe["node_id"]
            if probe["drawn"] == 0 or nid in mc:
                continue
            mc[nid] = search.value(nid) or 0.0
            if 0.0 < mc[nid] < 1.0:
                # The state's wrong completions are where the next errors hide.
                position = node_ids.index(nid) + 1
                for completion in search.rollouts_from.get(nid, []):
                    if completion.outcome is False and len(completion.node_ids) > position:
                        pool.append((nid, position, completion.rollout_id, completion.node_ids, completion.num_tokens))
    return results


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: BinarySearchConfig,
    client: GenerationClient,
    checker: AnswerChecker,
    on_problem_done: Callable[[], None] | None = None,
    agent=None,
) -> Iterator[Record]:
    """Evaluations for the steps each search decided, the completions (``mc`` rollouts and nodes), rejects."""
    nodes_by_problem, by_problem, builder = labeller_inputs(rollouts, nodes, config, client, checker)
    config_hash = content_hash(config.model_dump())

    async def label_problem(problem: Problem) -> list[Record]:
        search = ProblemSearch(
            STAGE, "mc", problem, client, builder, config, nodes_by_problem.get(problem.problem_id, {}), agent
        )
        policy = seed_policy_rollouts(search, by_problem.get(problem.problem_id, []))
        records: list[Record] = []
        screened = _screen(policy) if config.selection == "omegaprm" and config.screen_questions and policy else None
        if screened:
            records.append(
                Reject(stage=STAGE, item=problem.problem_id, reason=screened,
                       detail=f"{len(policy)} policy rollouts, none to search (OmegaPRM question screening)")
            )
            results: list[SearchResult] = []
        elif config.selection == "omegaprm":
            results = await _omegaprm(search, policy, config)
        else:
            results = await _every_wrong_rollout(search, policy, config)
        if not screened:
            records.extend(_evaluations(search, problem, policy, results, config, client.model_id, config_hash))
        records.extend(search.records())
        if on_problem_done:
            on_problem_done()
        return records

    yield from run_in_order(problems, label_problem)


def _evaluations(
    search: ProblemSearch,
    problem: Problem,
    policy: list[dict],
    results: list[SearchResult],
    config: BinarySearchConfig,
    model_id: str,
    config_hash: str,
) -> list[Evaluation]:
    """One ``mc`` evaluation per decided step: on the policy rollouts, the searched rollouts and the probes."""
    inferred: dict[str, tuple[SearchResult, int]] = {}  # node -> (search, its position) for steps at/after an error
    searched_by: dict[str, SearchResult] = {}
    for result in results:
        for position, nid in enumerate(result.node_ids):
            searched_by.setdefault(nid, result)
            if position >= result.first_error:
                inferred.setdefault(nid, (result, position))
    measured = {p["node_id"]: p for r in results for p in r.probes if p["drawn"]}
    candidates = {nid for r in policy for nid in r["node_ids"]} | set(searched_by) | set(measured)
    k = config.completions_per_prefix
    evaluations = []
    for nid in sorted(candidates):
        successes, visits = search.successes[nid], search.visits[nid]
        verdict = confidence = None
        meta: dict = {"labeller": f"{STAGE}/{config.selection}", "k": k, "visits": visits,
                      "completions_from_here": search.drawn[nid]}
        if successes:
            verdict, confidence = 1, 1.0  # a rollout through the step reached the answer: proof, not estimate
        elif nid in inferred:
            result, position = inferred[nid]
            # Value 0 was shown at the first error (by its completions, or the rollout's own
            # failure at its last step); later steps of the same rollout inherit it.
            shown = max(result.error_evidence, 1)
            verdict, confidence = -1, shown / (shown + 1)
            meta["first_error_node"] = result.node_ids[result.first_error]
            meta["steps_after_first_error"] = position - result.first_error
        else:
            continue  # not reached by any search: no evidence either way
        result = searched_by.get(nid)
        if result is not None:
            meta["search"] = {"rollout_id": result.rollout_id, "first_error": result.first_error,
                              "probes": [[p["position"], p["drawn"], p["successes"], p["reused"]] for p in result.probes]}
        evaluations.append(
            Evaluation(
                evaluation_id=content_hash("eval", nid, "mc", model_id, STAGE, config_hash),
                node_id=nid, problem_id=problem.problem_id, source="mc", value=successes / visits if visits else None,
                n=visits, successes=successes, verdict=verdict, confidence=confidence, model=model_id,
                cost_tokens=search.tokens_from[nid], meta=json.dumps(meta, sort_keys=True),
            )
        )
    return evaluations


def _label(problems, rollouts, nodes, config, client, checker, advance, agent=None):
    return run(problems, rollouts, nodes, config, client, checker, on_problem_done=advance, agent=agent)


SPEC = labeller_stage(
    STAGE, VERSION, "binary_search", "binary_search", _label,
    doc="OmegaPRM first-error binary search with rollout reuse (labeller: binary_search).",
)
