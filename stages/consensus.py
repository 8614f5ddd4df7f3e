"""Consensus: a pure, versioned policy turns a node's evaluations into one label.

Labels are never generated, only derived: change the policy and re-derive without
spending a token. A policy's name@version is stored on every label it makes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Label

STAGE = "consensus"
VERSION = 1
# v2: tree-search evidence (``mcts``) is pooled too, and a search's inferred -1 verdict sets
# the confidence of a step no rollout through it has shown to succeed.
POLICY_VERSIONS = {"mc_hard": 2, "mc_soft": 2}
# Every source whose n/successes count rollouts that continued the step: Monte Carlo
# completions (Math-Shepherd, binary search), tree-search backups, and the rollouts' own outcomes.
MC_SOURCES = ("mc", "mcts", "outcome")


class ConsensusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["mc_hard", "mc_soft"] = Field(
        default="mc_hard",
        description="mc_hard: +1 if any completion reached the gold answer (Math-Shepherd hard label); "
        "mc_soft: +1 if the fraction correct is at least `soft_threshold`, else -1.",
    )
    soft_threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Cut-off of the mc_soft policy.")

    @property
    def policy_id(self) -> str:
        return f"{self.policy}@{POLICY_VERSIONS[self.policy]}"


def run(evaluations: Iterable[dict], config: ConsensusConfig) -> Iterator[Label]:
    """One label per node that has Monte Carlo or outcome evidence, in node_id order."""
    pooled: dict[str, list[dict]] = defaultdict(list)
    for evaluation in evaluations:
        if evaluation["source"] in MC_SOURCES and evaluation["n"]:
            pooled[evaluation["node_id"]].append(evaluation)
    for nid in sorted(pooled):
        evidence = pooled[nid]
        n = sum(e["n"] for e in evidence)
        successes = sum(e["successes"] for e in evidence)
        value = successes / n
        sources = "+".join(sorted({e["source"] for e in evidence}))
        if config.policy == "mc_hard":
            label = 1 if successes else -1
            # A success proves the step can lead to the answer; n failures only make it likely it
            # cannot — unless a search showed an earlier step of the same path cannot (its verdict).
            inferred = [e.get("confidence") or 0.0 for e in evidence if e.get("verdict") == -1]
            confidence = 1.0 if successes else max([n / (n + 1), *inferred])
            reason = f"{sources}: {successes}/{n} reached the gold answer"
        else:
            label = 1 if value >= config.soft_threshold else -1
            confidence = abs(value - config.soft_threshold) / max(config.soft_threshold, 1 - config.soft_threshold)
            reason = f"{sources}: value {value:.3f} vs threshold {config.soft_threshold}"
        yield Label(
            node_id=nid, problem_id=evidence[0]["problem_id"], label=label, value=value,
            confidence=round(min(confidence, 1.0), 6), reason=reason, policy=config.policy_id,
        )
