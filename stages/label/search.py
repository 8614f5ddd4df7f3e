"""What the search labellers share: one problem's step tree in memory while completions are spent on it.

Math-Shepherd spends K fresh completions on every step prefix. The search labellers (binary
search and OmegaPRM, MCTS) decide *where* to spend completions instead, and they count every
rollout as evidence for every prefix it passes through ("rollout reuse", OmegaPRM §3.2): a
completion sampled after step 2 that goes on through step 3 and reaches the answer proves
that step 3 can lead to the answer too, without a completion of its own.

Determinism is what makes a search resumable: its next move depends on these counts, so the
counts must not depend on the order in which the engine finishes samples. Within a problem,
a search is therefore sequential — each move awaits all of its samples and folds them in in
sample-index order — and problems run concurrently, which is where the engine's batch comes
from. Samples of one prefix are numbered across moves (``GenerationClient.generate_each``'s
``start``), so asking a prefix again draws new samples, and a re-run replays the same ones.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Origin, Problem, Record, Rollout
from stepforge.stages.llm.base import Generation, GenerationClient
from stepforge.stages.rollout.prompting import PromptConfig, SamplingConfig, build_request
from stepforge.stages.rollout.split import SplitConfig
from stepforge.stages.tree import PathPrefix, StepTree, TreeBuilder, first_occurrences

ROOT = ""  # the key of the problem itself (the empty prefix) in per-prefix counters


class AdaptiveConfig(BaseModel):
    """Stop sampling a prefix as soon as its label is decided."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Sample a prefix in rounds and stop once its label is decided.")
    batch: int = Field(default=2, ge=1, description="Completions per round; smaller saves more, larger keeps the engine busier.")
    target: Literal["hard", "soft"] = Field(
        default="hard",
        description="hard: stop at the first completion that reaches the answer (the Math-Shepherd hard label is "
        "then decided); soft: stop when the Wilson interval of the success rate is narrower than ci_half_width.",
    )
    ci_half_width: float = Field(default=0.15, gt=0.0, lt=0.5, description="Soft target: half-width of the 95% interval.")
    min_samples: int = Field(default=4, ge=1, description="Soft target: completions drawn before the interval is trusted.")

    def decided(self, successes: int, drawn: int) -> bool:
        if not self.enabled or drawn == 0:
            return False
        if self.target == "hard":
            return successes > 0
        return drawn >= self.min_samples and wilson_half_width(successes, drawn) <= self.ci_half_width


def wilson_half_width(successes: int, n: int, z: float = 1.96) -> float:
    """Half-width of the Wilson score interval: unlike the normal approximation it is not 0 at 0/n."""
    p = successes / n
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


class CompletionConfig(BaseModel):
    """How a labeller samples continuations of a prefix: the base of every labeller's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling of the completions.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Must match the rollout stage's prompt.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Must match the rollout stage's splitting.")


@dataclass(frozen=True)
class Estimate:
    """The outcome of sampling completions of one prefix."""

    node_id: str
    drawn: int
    successes: int
    stopped_early: bool


class TextSampler:
    """How a labeller draws completions of a prefix for a problem solved in text: the policy continues
    the solution after the prefix's steps. (A live agent task continues an episode instead:
    ``stages.agent.episodes.EpisodeSampler``, with the same three methods.)"""

    def __init__(self, problem: Problem, client: GenerationClient, builder: TreeBuilder, completion: CompletionConfig):
        self.problem, self.client, self.builder, self.completion = problem, client, builder, completion

    async def draw(self, prefix: PathPrefix, n: int, start: int) -> list:
        """Samples ``start .. start+n-1`` after ``prefix``: generations, or ``GenerationError``s."""
        c = self.completion
        request = build_request(self.problem.question, list(prefix.texts), n, c.prompt, c.split, c.sampling)
        return await self.client.generate_each(request, start=start)

    def make(self, stage: str, prefix: PathPrefix, result, origin: Origin, index: int, item: str):
        """(rollout, new nodes, reject) of one drawn sample."""
        return self.builder.from_result(stage, self.problem.problem_id, self.problem.gold_answer, prefix, result,
                                        origin, index, item=item)

    @staticmethod
    def tokens(result) -> int | None:
        """Generated tokens of a sample; None for a failed one."""
        return result.num_tokens if isinstance(result, Generation) else None


def sampler_for(problem: Problem, client: GenerationClient, builder: TreeBuilder, completion: CompletionConfig,
                agent=None, nodes: dict[str, dict] | None = None):
    """The sampler of one problem: episodes for a live agent task when the run has an episode
    runner (``agent``), else text completions."""
    from stepforge.stages.agent.episodes import EpisodeBuilder, EpisodeSampler, live_environment

    if agent is not None and live_environment(problem):
        episodes = EpisodeBuilder(builder.checker, client.model_id, builder.known_node_ids)
        tokens = {nid: n["num_tokens"] for nid, n in (nodes or {}).items()}
        return EpisodeSampler(agent, problem, completion.sampling, episodes, tokens)
    return TextSampler(problem, client, builder, completion)


class ProblemSearch:
    """One problem's step tree and its rollout counts, and the sampler that grows it."""

    def __init__(
        self,
        stage: str,
        origin: Origin,
        problem: Problem,
        client: GenerationClient,
        builder: TreeBuilder,
        completion: CompletionConfig,
        nodes: dict[str, dict],
        agent=None,
    ):
        self.stage, self.origin, self.problem = stage, origin, problem
        self.client, self.builder, self.completion = client, builder, completion
        self.sampler = sampler_for(problem, client, builder, completion, agent, nodes)
        self.text: dict[str, str] = {nid: n["text"] for nid, n in nodes.items()}
        self.tree = StepTree(nodes.values())
        self.parent: dict[str, str | None] = self.tree.parent  # grows with the completions' steps
        self.num_tokens: dict[str, int] = {nid: n["num_tokens"] for nid, n in nodes.items()}
        # Rollouts passing through each node (ROOT: all of them), and how many of those succeeded.
        self.visits: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        # Next steps the policy itself chose after each prefix: (prefix, child) -> count. Selection
        # never enters these, so they estimate the policy's own next-step distribution.
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.children: dict[str, set[str]] = {}
        self.rollout_ends: Counter[str] = Counter()  # rollouts whose last step is the node
        self.passed_through: set[str] = set()  # nodes some rollout continues past
        self.drawn: Counter[str] = Counter()  # samples taken from each prefix so far
        self.tokens_from: Counter[str] = Counter()  # generated tokens spent after each prefix
        self.rollouts_from: dict[str, list[Rollout]] = {}  # completions of each prefix, in sample order
        self.completions = 0
        self.tokens = 0
        self._outputs: dict[tuple[str, int], list[Record]] = {}

    # -- the tree ------------------------------------------------------------------------
    def path(self, nid: str | None) -> PathPrefix:
        ids = self.tree.path(nid or None)  # ROOT or None: the problem itself
        if ids is None:
            raise KeyError(nid)  # a prefix the search sampled from is always in its tree
        return PathPrefix(ids, tuple(self.text[i] for i in ids))

    def add_rollout(self, node_ids: list[str], outcome: bool | None, start: str | None) -> None:
        """Count a rollout as evidence for the root and every node on its path.

        ``start`` is the prefix the generation continued (None: the problem); the steps after
        it were the policy's own choices.
        """
        success = bool(outcome)
        for key in (ROOT, *node_ids):
            self.visits[key] += 1
            self.successes[key] += success
        previous = ROOT
        generated = start is None
        for nid in node_ids:
            self.children.setdefault(previous, set()).add(nid)
            if generated:
                self.transitions[(previous, nid)] += 1
            generated = generated or nid == start
            previous = nid
        if node_ids:
            self.rollout_ends[node_ids[-1]] += 1
            self.passed_through.update(node_ids[:-1])

    def is_terminal(self, nid: str) -> bool:
        """A step that rollouts end at and none continues past: a final answer (or a dead end)."""
        return self.rollout_ends[nid] > 0 and nid not in self.passed_through

    def value(self, nid: str) -> float | None:
        return self.successes[nid] / self.visits[nid] if self.visits[nid] else None

    # -- sampling ------------------------------------------------------------------------
    async def sample(self, nid: str | None, n: int) -> list[Rollout | None]:
        """``n`` new completions after the prefix ending at ``nid``, folded into the counts in index order.

        A failed or empty completion is a failed attempt for the prefix (as in Math-Shepherd)
        and a reject row; it returns None in its place.
        """
        return self.fold(await self.fetch(nid, n))

    async def fetch(self, nid: str | None, n: int) -> tuple:
        """The generation half of ``sample``: draw ``n`` completions after ``nid`` (their sample
        indices are taken now, in call order) without folding them in. Searches that run several
        fetches at once fold the results in their own order, so the tree never depends on which
        answer arrived first."""
        prefix = self.path(nid)
        key = nid or ROOT
        start = self.drawn[key]
        self.drawn[key] += n
        return nid, prefix, start, await self.sampler.draw(prefix, n, start)

    def fold(self, fetched: tuple) -> list[Rollout | None]:
        """Fold a ``fetch``'s completions into the counts, in index order."""
        nid, prefix, start, generated = fetched
        key = nid or ROOT
        results: list[Rollout | None] = []
        for index, result in enumerate(generated, start):
            rollout, new_nodes, reject = self.sampler.make(self.stage, prefix, result, self.origin, index, f"{key}#{index}")
            if (spent := self.sampler.tokens(result)) is not None:
                self.completions += 1
                self.tokens += spent
                self.tokens_from[key] += spent
            for node in new_nodes:
                self.text.setdefault(node.node_id, node.text)
                self.tree.link(node.node_id, node.parent_id)
                self.num_tokens.setdefault(node.node_id, node.num_tokens)
            self._outputs[(key, index)] = [*new_nodes, rollout or reject]
            if rollout is None:
                self.add_rollout(list(prefix.node_ids), False, nid)
            else:
                self._register_path(rollout)
                self.add_rollout(rollout.node_ids, rollout.outcome, nid)
                self.rollouts_from.setdefault(key, []).append(rollout)
            results.append(rollout)
        return results

    def _register_path(self, rollout: Rollout) -> None:
        previous = None
        for nid in rollout.node_ids:
            self.tree.link(nid, previous)
            previous = nid

    async def estimate(self, nid: str, k: int, adaptive: AdaptiveConfig) -> Estimate:
        """Up to ``k`` completions of a prefix, in rounds when adaptive sampling is on."""
        return (await self.estimate_together([nid], k, adaptive))[nid]

    async def estimate_together(self, nids: list[str], k: int, adaptive: AdaptiveConfig) -> dict[str, Estimate]:
        """``estimate`` for several prefixes at once: their rounds in step, each round's completions
        fetched together and folded in the order of ``nids``, so no estimate depends on which
        answer arrived first."""
        counts = {nid: [0, 0] for nid in nids}  # drawn, successes
        batch = adaptive.batch if adaptive.enabled else k
        open_ = list(nids)
        while open_:
            fetched = await asyncio.gather(*(self.fetch(nid, min(batch, k - counts[nid][0])) for nid in open_))
            still = []
            for nid, got in zip(open_, fetched):
                results = self.fold(got)
                counts[nid][0] += len(results)
                counts[nid][1] += sum(bool(r and r.outcome) for r in results)
                drawn, successes = counts[nid]
                if drawn < k and not adaptive.decided(successes, drawn):
                    still.append(nid)
            open_ = still
        return {nid: Estimate(nid, drawn, successes, stopped_early=drawn < k) for nid, (drawn, successes) in counts.items()}

    def records(self) -> list[Record]:
        """The rollouts, nodes and rejects made, in (prefix, sample index) order, each node once."""
        ordered = [record for key in sorted(self._outputs) for record in self._outputs[key]]
        return first_occurrences(ordered, set())


def labeller_inputs(
    rollouts: Iterable[dict], nodes: Iterable[dict], config: CompletionConfig, client: GenerationClient, checker
) -> tuple[dict[str, dict[str, dict]], dict[str, list[dict]], TreeBuilder]:
    """What every labeller starts from: each problem's nodes by id and its policy rollouts, and a
    TreeBuilder that knows the stored nodes (so only new ones are written).

    Grouped by problem once, so a problem's search copies its own nodes, not the whole shard's.
    """
    nodes_by_problem: dict[str, dict[str, dict]] = {}
    for node in nodes:
        nodes_by_problem.setdefault(node["problem_id"], {})[node["node_id"]] = node
    by_problem: dict[str, list[dict]] = {}
    for rollout in rollouts:
        if rollout["origin"] == "policy":
            by_problem.setdefault(rollout["problem_id"], []).append(rollout)
    known = frozenset(nid for own in nodes_by_problem.values() for nid in own)
    builder = TreeBuilder(config.split, checker, client.backend.count_tokens, client.model_id, known)
    return nodes_by_problem, by_problem, builder


def seed_policy_rollouts(search: ProblemSearch, rollouts: Iterable[dict]) -> list[dict]:
    """Fold a problem's policy rollouts into the counts (sorted, so the order never matters)."""
    ordered = sorted(rollouts, key=lambda r: r["rollout_id"])
    for rollout in ordered:
        search.add_rollout(rollout["node_ids"], rollout["outcome"], None)
    # The policy rollouts are root samples 0..n-1 of the rollout stage's request: a search that
    # samples the root with the same sampling must continue after them, not draw them again.
    if ordered:
        search.drawn[ROOT] = max(search.drawn[ROOT], 1 + max(r["sample_index"] for r in ordered))
    return ordered
