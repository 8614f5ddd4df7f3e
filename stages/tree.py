"""Turning generated text into step-tree records: the one place paths, nodes and rollouts are made."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from stepforge.schemas.ids import content_hash, node_id
from stepforge.schemas.records import Node, Origin, Record, Reject, Rollout
from stepforge.stages.rollout.answers import AnswerChecker, extract_final_answer
from stepforge.stages.llm.base import Generation, GenerationError
from stepforge.stages.rollout.split import SplitConfig, split_steps

# Where a shard chain keeps its step tree: imported trajectories travel with their problems, sampled
# ones are the rollouts slot's, and a labeller's completions hang below their prefixes in step_values.
# Stages that read the tree name these slots in their declarations (``reads``).
TREE_SLOTS = ("problems", "rollouts", "step_values")
EVIDENCE_SLOTS = ("problems", "step_values", "verification")
"""Where a chain keeps its evaluations: imported labels, the labeller's values, the verifiers' evidence."""


@dataclass(frozen=True)
class PathPrefix:
    """Where a generation starts in the tree: the node ids and texts above it (empty = the problem)."""

    node_ids: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()

    @property
    def leaf(self) -> str | None:
        return self.node_ids[-1] if self.node_ids else None

    def extend(self, new_id: str, text: str) -> "PathPrefix":
        return PathPrefix(self.node_ids + (new_id,), self.texts + (text,))


def path_to(leaf: str | None, parent_by_node: dict[str, str | None]) -> list[str] | None:
    """Node ids from the first step down to ``leaf``; None if a node on the way is missing (or a
    cycle), or if ``leaf`` is None. For callers holding only a parent map (``StepTree.path``)."""
    path = StepTree.over(parent_by_node).path(leaf)
    return list(path) if path else None


class StepTree:
    """The nodes table as a tree: nodes by id, parent links, children per prefix, root-to-node paths.

    Built from node rows (dicts with ``node_id``, ``parent_id``, ``problem_id``, ...) in table
    order. ``nodes`` keeps the last row stored for an id (as a dict built from the table would);
    the parent link and the place among its siblings come from the first (a step stored by two
    shards has one parent: its id hashes it). ``link`` adds a parent link known only from a
    rollout's path. Complete paths are memoised; links are never rewritten, so they stay valid
    as the tree grows.
    """

    def __init__(self, nodes: Iterable[Mapping[str, Any]] = ()):
        self.nodes: dict[str, Mapping[str, Any]] = {}
        self.parent: dict[str, str | None] = {}
        # problem -> prefix (parent node, None for the problem itself) -> children, in table order
        self._children: dict[str | None, dict[str | None, list[str]]] = {}
        self._paths: dict[str, tuple[str, ...]] = {}
        for node in nodes:
            self.add(node)

    @classmethod
    def over(cls, parent_by_node: dict[str, str | None]) -> "StepTree":
        """A tree of parent links only, sharing ``parent_by_node`` (not copied: read it, do not grow it)."""
        tree = cls()
        tree.parent = parent_by_node
        return tree

    def add(self, node: Mapping[str, Any]) -> None:
        nid = node["node_id"]
        self.nodes[nid] = node
        if nid in self.parent:
            return  # the same step stored twice
        parent = node.get("parent_id")
        self.parent[nid] = parent
        self._children.setdefault(node.get("problem_id"), {}).setdefault(parent, []).append(nid)

    def link(self, nid: str, parent: str | None) -> None:
        """Record ``nid``'s parent if it is not known yet (a step met on a rollout's path)."""
        self.parent.setdefault(nid, parent)

    def __contains__(self, nid: object) -> bool:
        return nid in self.nodes

    def children(self, problem_id: str) -> dict[str | None, list[str]]:
        """One problem's prefixes (None: the problem) -> their child steps, in table order."""
        return self._children.get(problem_id, {})

    def ancestors(self, nid: str) -> Iterator[str]:
        """The ids above ``nid``, its parent first, up to the first step (or to an id whose own
        parent is unknown: that id is the last one yielded)."""
        cursor = self.parent.get(nid)
        while cursor is not None:
            yield cursor
            cursor = self.parent.get(cursor)

    def path(self, nid: str | None) -> tuple[str, ...] | None:
        """Node ids from the first step down to ``nid`` (inclusive; ``()`` for None, the problem);
        None if a node on the way is missing (or the links form a cycle)."""
        if nid is None:
            return ()
        if nid in self._paths:
            return self._paths[nid]
        chain: list[str] = []
        cursor: str | None = nid
        while cursor is not None and cursor not in self._paths:
            if cursor not in self.parent or len(chain) > len(self.parent):  # missing, or a cycle
                return None
            chain.append(cursor)
            cursor = self.parent[cursor]
        above = self._paths[cursor] if cursor is not None else ()
        path = above + tuple(reversed(chain))
        self._paths[nid] = path
        return path

    def above(self, nid: str) -> tuple[str, ...]:
        """The ids of the steps above ``nid``, first step first; empty when a node on the way is
        missing (the step is then taken on its own)."""
        path = self.path(nid)
        return path[:-1] if path else ()

    def depth(self, nid: str) -> int | None:
        """1 for a first step; None if a node on the way is missing."""
        path = self.path(nid)
        return None if path is None else len(path)

    def texts(self, ids: Iterable[str]) -> list[str]:
        """The stored texts of ``ids``, in order."""
        return [self.nodes[i]["text"] for i in ids]


def failed_generation(stage: str, item: str, result: Generation | BaseException) -> Reject | None:
    """A failed sample of ``GenerationClient.generate_each`` (a ``GenerationError``) as a
    ``generation_failed`` reject of ``stage`` named ``item``; None for a generation. Any other
    exception is a bug and propagates."""
    if isinstance(result, GenerationError):
        return Reject(stage=stage, item=item, reason="generation_failed", detail=str(result))
    if isinstance(result, BaseException):
        raise result
    return None


def first_occurrences(records: list[Record], seen: set[str]) -> list[Record]:
    """Drop nodes already in ``seen`` (and record the rest), so each node is stored once.

    Applied to one item's records in their deterministic order, never in completion order,
    so which duplicate is kept does not depend on engine scheduling.
    """
    kept: list[Record] = []
    for record in records:
        if isinstance(record, Node):
            if record.node_id in seen:
                continue
            seen.add(record.node_id)
        kept.append(record)
    return kept


class TreeBuilder:
    """Makes rollouts and the nodes along their paths that are not already stored."""

    def __init__(
        self,
        split: SplitConfig,
        checker: AnswerChecker,
        count_tokens: Callable[[str], int],
        model: str,
        known_node_ids: frozenset[str] = frozenset(),
    ):
        self.split = split
        self.checker = checker
        self.count_tokens = count_tokens
        self.model = model
        self.known_node_ids = known_node_ids

    def from_result(
        self,
        stage: str,
        problem_id: str,
        gold_answer: str,
        prefix: PathPrefix,
        result: Generation | BaseException,
        origin: Origin,
        sample_index: int,
        item: str,
    ) -> tuple[Rollout | None, list[Node], Reject | None]:
        """Like ``from_generation``, for one entry of ``GenerationClient.generate_each``: a failed
        sample (``GenerationError``) becomes a ``generation_failed`` reject named ``item``; any other
        exception is a bug and propagates."""
        if (reject := failed_generation(stage, item, result)) is not None:
            return None, [], reject
        return self.from_generation(stage, problem_id, gold_answer, prefix, result, origin, sample_index)

    def from_generation(
        self,
        stage: str,
        problem_id: str,
        gold_answer: str,
        prefix: PathPrefix,
        generation: Generation,
        origin: Origin,
        sample_index: int,
    ) -> tuple[Rollout | None, list[Node], Reject | None]:
        """The rollout a generation makes below ``prefix``, its nodes not yet stored, or a reject.

        In ``confidence`` split mode the steps come from the generation's own logprobs and are
        stored unstripped (ids still hash the normalised text), so the node texts along a
        path concatenate to exactly what the policy wrote.
        """
        rollout_id = content_hash("rollout", problem_id, prefix.leaf, generation.key)
        if self.split.mode == "confidence" and (generation.logprobs is None or generation.token_bytes is None):
            # A backend that does not report token scores cannot be split by confidence; the
            # sample becomes a reject so that it does not end the shard.
            missing = "logprobs" if generation.logprobs is None else "token_bytes"
            reject = Reject(
                stage=stage, item=rollout_id, reason="no_logprobs",
                detail=f"split mode 'confidence' needs per-token logprobs and token_bytes; the generation has no {missing}",
                payload=generation.text[:2000],
            )
            return None, [], reject
        steps = split_steps(
            generation.text, self.split, token_bytes=generation.token_bytes, logprobs=generation.logprobs
        )
        if not steps:
            reject = Reject(
                stage=stage, item=rollout_id, reason="empty_generation",
                detail=f"finish_reason={generation.finish_reason}, {generation.num_tokens} tokens, no step text",
                payload=generation.text[:2000],
            )
            return None, [], reject
        new_nodes: list[Node] = []
        path_ids = list(prefix.node_ids)
        parent = prefix.leaf
        encoded, cursor = generation.text.encode("utf-8"), 0
        for step in steps:
            nid = node_id(problem_id, parent, step)
            step_bytes = step.encode("utf-8")
            start = encoded.find(step_bytes, cursor)
            if start >= 0:
                cursor = start + len(step_bytes)
            if nid not in self.known_node_ids:
                # The tokens the policy actually spent on the step; re-tokenize only when the
                # backend did not report them (or max_steps merged steps across a separator).
                num_tokens = generation.tokens_in(start, cursor) if start >= 0 else None
                new_nodes.append(
                    Node(
                        node_id=nid, problem_id=problem_id, parent_id=parent, depth=len(path_ids) + 1,
                        text=step, origin=origin,
                        num_tokens=self.count_tokens(step) if num_tokens is None else num_tokens,
                    )
                )
            path_ids.append(nid)
            parent = nid
        final_answer = extract_final_answer(generation.text)
        outcome, reason = self.checker.check(gold_answer, final_answer)
        if outcome is None and reason == "no_answer":
            outcome = False  # a solution that never states an answer did not reach the right one
        rollout = Rollout(
            rollout_id=rollout_id, problem_id=problem_id, origin=origin, prefix_node_id=prefix.leaf,
            sample_index=sample_index, node_ids=path_ids, text=generation.text, final_answer=final_answer,
            outcome=outcome, outcome_reason=reason, finish_reason=generation.finish_reason,
            num_tokens=generation.num_tokens, model=self.model, generation_key=generation.key,
        )
        return rollout, new_nodes, None
