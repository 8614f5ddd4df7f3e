"""Consensus: a pure, versioned policy turns a node's evaluations into one label, or drops the node.

Labels are never generated, only derived: change the policy and re-derive without spending a
token. Each label carries its confidence, the reason in words, the evidence sources behind it
and the policy id (``name@version`` plus the rules that were on, e.g. ``vote@1+tool_veto+human``).

Policies (``ConsensusConfig.policy``) read different evidence:

- ``mc_hard`` / ``mc_soft``: Monte Carlo evidence (``mc``, ``mcts``, ``outcome``): +1 if any
  rollout through the step reached the gold answer (Math-Shepherd's hard label) / if the
  fraction that did is at least ``soft_threshold``.
- ``judge``: the LLM judge's verdicts, pooled by confidence-weighted vote.
- ``tool``: tool checks alone: -1 where a check failed, a weak +1 where every check held.
- ``agreement``: Qwen's consensus filter ("The Lessons of Developing PRMs"): keep a step only
  when the MC hard label and the judge agree; otherwise drop it with a reason.
- ``vote``: every available source's label weighted by ``weights[source]`` x its confidence.

Rules applied on top, in this order, each optional and visible in the policy id:

1. ``tool_veto``: a failed tool check (a false calculation, failing code, a wrong final answer,
   a malformed tool call) is decisive evidence of an error: the step is -1 whatever the other
   sources say. Checks whose failure is weaker evidence (an agent's repeated call or an
   environment error; confidence < 1) do not veto: they vote.
2. ``propagate_errors``: errors reach the steps below them, in one of two ways (``propagation``):

   - ``all_after`` (the default; rule ``propagate``): every step below a -1 step is -1
     (PRM800K phase 2; the strict reading of AgentProcessBench's rule). Human labels take no
     part: they replace the labels of their own steps afterwards (rule 3), propagating nothing.
   - ``until_recovered`` (rule ``propagate_until_recovered@1``): a step below a -1 step is -1
     until a step repairs the path, as AgentProcessBench's annotators label trajectories that
     recover (a failed tool call, then a good one: -1, +1, +1). Walking down each path from the
     first step, a step's *own* label is the policy's label from its own evidence (after the
     tool veto) or, with ``human_override``, its human label, which comes first. Then:
     a step whose own label is -1 is wrong and opens (or re-opens) an error; a step whose own
     label is +1 *repairs* an open error: it keeps its +1 (its reason names the error it
     repairs) and the steps below it are no longer below an error; any other step under an open
     error (no evidence of its own, a neutral 0, dropped by the policy) is -1, "propagated",
     citing the latest wrong step above it. A human-labelled step keeps its human label even
     then (a human 0 under an error stays 0 and repairs nothing). Any +1 repairs, whatever its
     confidence: a weak +1 from tool checks that all held (``tool_pass_confidence``) counts,
     because the step's own evidence is positive; a step with no positive evidence of its own
     stays -1. Branches sharing a prefix share its state up to where they part.
3. ``human_override``: human labels (the review loop, imported human annotations) replace
   everything. Several annotators vote; a split is flagged in the reason.

Dropped steps are ``Reject`` rows (stage ``consensus``) with the reason, so a filtered dataset
says what it left out. Neutral labels (0) are kept as 0 here; how a neutral step becomes a
bool is the export's ``neutral_as`` (one place, because PRM consumers disagree about it).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepforge.schemas.records import Label, Reject
from stepforge.stages.base import Stage, key_settings
from stepforge.stages.tree import EVIDENCE_SLOTS, TREE_SLOTS, StepTree

STAGE = "consensus"
VERSION = 2
# v2 (mc_*): tree-search evidence (``mcts``) is pooled too, and a search's inferred -1 verdict
# sets the confidence of a step no rollout through it has shown to succeed.
POLICY_VERSIONS = {"mc_hard": 2, "mc_soft": 2, "judge": 1, "tool": 1, "agreement": 1, "vote": 1}
# Every source whose n/successes count rollouts that continued the step: Monte Carlo
# completions (Math-Shepherd, binary search), tree-search backups, and the rollouts' own outcomes.
MC_SOURCES = ("mc", "mcts", "outcome")
VOTERS = ("mc", "judge", "tool")
Policy = Literal["mc_hard", "mc_soft", "judge", "tool", "agreement", "vote"]
Propagation = Literal["all_after", "until_recovered"]
# The rule each propagation mode adds to the policy id. ``all_after`` keeps the name it had before
# there was a choice (so existing labels keep their policy id); a new mode is versioned.
PROPAGATION_RULES = {"all_after": "propagate", "until_recovered": "propagate_until_recovered@1"}


class ConsensusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Settings added later, with the value that reproduces earlier stores: left out of the stage key.
    LEGACY: ClassVar[dict[str, object]] = {"propagation": "all_after"}

    policy: Policy = Field(
        default="mc_hard",
        description="mc_hard: +1 if any rollout through the step reached the gold answer (Math-Shepherd); mc_soft: +1 "
        "if the fraction that did is at least soft_threshold; judge: the LLM judge's vote; tool: tool checks "
        "alone; agreement: keep a step only where the MC hard label and the judge agree (Qwen's consensus "
        "filter), drop the rest with a reason; vote: confidence-weighted vote of mc, judge and tool.",
    )
    soft_threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="Cut-off of the mc_soft policy.")
    tool_veto: bool = Field(
        default=True,
        description="A failed tool check (false calculation, failing code, wrong final answer) makes the step -1 "
        "with confidence 1, whatever the policy's sources say.",
    )
    propagate_errors: bool = Field(
        default=False,
        description="Errors reach the steps below them, labelled or not, as propagation says (PRM800K phase 2 and "
        "AgentProcessBench's rule).",
    )
    propagation: Propagation = Field(
        default="all_after",
        description="With propagate_errors: all_after: every step below a -1 step is -1; until_recovered: a step "
        "below a -1 step is -1 until a step whose own label (its evidence, or its human label) is +1 repairs the "
        "path (AgentProcessBench's labels of trajectories that recover). Needs propagate_errors.",
    )
    human_override: bool = Field(
        default=True,
        description="Human labels (review loop, imported annotations) replace every other source; off, human "
        "evidence is ignored (e.g. when it is the reference an evaluation scores against).",
    )
    weights: dict[Literal["mc", "judge", "tool"], float] = Field(
        default_factory=lambda: {"mc": 1.0, "judge": 1.0, "tool": 1.0},
        description="vote policy: weight of each source's label (times the label's confidence).",
    )
    tool_pass_confidence: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="Confidence of the +1 a step gets when every tool check on it held: its arithmetic is right, "
        "which says little about its reasoning.",
    )

    @model_validator(mode="after")
    def _propagation_needs_propagate_errors(self) -> "ConsensusConfig":
        if self.propagation != "all_after" and not self.propagate_errors:
            raise ValueError(
                f"propagation: {self.propagation} has no effect with propagate_errors off: set propagate_errors: true "
                "too (or leave propagation at all_after)"
            )
        return self

    @property
    def policy_id(self) -> str:
        rules = [name for name, on in (("tool_veto", self.tool_veto), (PROPAGATION_RULES[self.propagation],
                                       self.propagate_errors), ("human", self.human_override)) if on]
        return "+".join([f"{self.policy}@{POLICY_VERSIONS[self.policy]}", *rules])


@dataclass(frozen=True)
class Opinion:
    """What one source (or a policy) concludes about a step."""

    label: int
    confidence: float
    value: float | None
    reason: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Dropped:
    reason: str
    detail: str


# -- what each source says -------------------------------------------------------------------
def mc_opinion(evidence: list[dict], config: ConsensusConfig, *, hard: bool) -> Opinion | None:
    pooled = [e for e in evidence if e["source"] in MC_SOURCES and e["n"]]
    if not pooled:
        return None
    n = sum(e["n"] for e in pooled)
    successes = sum(e["successes"] for e in pooled)
    value = successes / n
    sources = tuple(sorted({e["source"] for e in pooled}))
    names = "+".join(sources)
    if hard:
        # A success proves the step can lead to the answer; n failures only make it likely it
        # cannot — unless a search showed an earlier step of the same path cannot (its verdict).
        inferred = [e.get("confidence") or 0.0 for e in pooled if e.get("verdict") == -1]
        confidence = 1.0 if successes else max([n / (n + 1), *inferred])
        return Opinion(1 if successes else -1, confidence, value, f"{names}: {successes}/{n} reached the gold answer", sources)
    threshold = config.soft_threshold
    confidence = abs(value - threshold) / max(threshold, 1 - threshold)
    label = 1 if value >= threshold else -1
    return Opinion(label, confidence, value, f"{names}: value {value:.3f} vs threshold {threshold}", sources)


def _pooled_verdict(evidence: list[dict]) -> tuple[int, float]:
    """Confidence-weighted vote over verdicts; ties go to the more severe verdict.

    Each evaluation has one vote, split as its confidence says: confidence c for its verdict,
    1 - c against it. The label's confidence is its share of all votes, so one evaluation with
    confidence 2/3 gives 2/3, and two opposite certain ones give 1/2.
    """
    weight: dict[int, float] = defaultdict(float)
    for e in evidence:
        weight[int(e["verdict"])] += e.get("confidence") if e.get("confidence") is not None else 1.0
    label = min(weight, key=lambda v: (-weight[v], v))  # most weight, then the lowest verdict
    return label, weight[label] / len(evidence)


def judge_opinion(evidence: list[dict]) -> Opinion | None:
    judged = [e for e in evidence if e["source"] == "judge" and e.get("verdict") is not None]
    if not judged:
        return None
    label, confidence = _pooled_verdict(judged)
    n = sum(e["n"] for e in judged)
    value = sum(e["successes"] for e in judged) / n if n else None
    votes = ", ".join(f"{e['successes']}/{e['n']} fine" for e in judged)
    return Opinion(label, confidence, value, f"judge: verdict {label:+d} ({votes})", ("judge",))


def tool_opinion(evidence: list[dict], config: ConsensusConfig) -> Opinion | None:
    checked = [e for e in evidence if e["source"] == "tool" and e.get("verdict") is not None]
    if not checked:
        return None
    failed = [e for e in checked if e["verdict"] == -1]
    if failed:
        detail = "; ".join(e.get("rationale") or "a check failed" for e in failed)
        # A failed check is certain unless its checker says otherwise (an agent's repeated call, an
        # environment error: weaker evidence of a wrong step than a false calculation).
        confidence = max(e["confidence"] if e.get("confidence") is not None else 1.0 for e in failed)
        return Opinion(-1, confidence, None, f"tool: {detail}", ("tool",))
    claims = sum(e["n"] for e in checked)
    return Opinion(1, config.tool_pass_confidence, None, f"tool: {claims} checks held", ("tool",))


def human_opinion(evidence: list[dict]) -> Opinion | None:
    labelled = [e for e in evidence if e["source"] == "human" and e.get("verdict") is not None]
    if not labelled:
        return None
    # Every annotation counts once: a human's confidence is not read from the annotation.
    counts: dict[int, int] = defaultdict(int)
    for e in labelled:
        counts[int(e["verdict"])] += 1
    label = min(counts, key=lambda v: (-counts[v], v))
    agreeing, total = counts[label], len(labelled)
    split = "" if agreeing == total else f"; annotators disagree ({dict(sorted(counts.items()))})"
    return Opinion(label, agreeing / total, None, f"human: {agreeing}/{total} annotations say {label:+d}{split}", ("human",))


# -- policies --------------------------------------------------------------------------------
def policy_opinion(evidence: list[dict], config: ConsensusConfig) -> Opinion | Dropped | None:
    """The policy's label for one node from its evidence; None when the policy has nothing to read."""
    policy = config.policy
    if policy in ("mc_hard", "mc_soft"):
        return mc_opinion(evidence, config, hard=policy == "mc_hard")
    if policy == "judge":
        return judge_opinion(evidence)
    if policy == "tool":
        return tool_opinion(evidence, config)
    if policy == "agreement":
        mc, judge = mc_opinion(evidence, config, hard=True), judge_opinion(evidence)
        if mc is None and judge is None:
            return None
        if mc is None or judge is None:
            missing = "mc" if mc is None else "judge"
            return Dropped(f"missing_{missing}", f"agreement needs both mc and judge evidence; {missing} has none")
        if judge.label == 0:
            return Dropped("judge_neutral", f"the judge called the step neutral; {mc.reason}")
        if mc.label != judge.label:
            return Dropped("sources_disagree", f"mc says {mc.label:+d} ({mc.reason}), judge says {judge.label:+d}")
        return Opinion(
            mc.label, min(mc.confidence, judge.confidence), mc.value, f"mc and judge agree: {mc.reason}; {judge.reason}",
            tuple(sorted({*mc.sources, "judge"})),
        )
    return _vote(evidence, config)


def _vote(evidence: list[dict], config: ConsensusConfig) -> Opinion | None:
    opinions = {
        "mc": mc_opinion(evidence, config, hard=True), "judge": judge_opinion(evidence),
        "tool": tool_opinion(evidence, config),
    }
    present = {name: o for name, o in opinions.items() if o is not None and config.weights.get(name, 0.0) > 0}
    if not present:
        return None
    score = sum(config.weights[name] * o.confidence * o.label for name, o in present.items())
    total = sum(config.weights[name] * o.confidence for name, o in present.items())
    if total == 0 or (score == 0 and all(o.label == 0 for o in present.values())):
        label = 0
    else:
        label = 1 if score > 0 else -1  # a tie is not a vouch: -1
    confidence = abs(score) / total if total else 0.0
    value = next((o.value for o in present.values() if o.value is not None), None)
    reason = "vote " + f"{score:+.2f}/{total:.2f}: " + "; ".join(o.reason for o in present.values())
    sources = tuple(sorted({s for o in present.values() for s in o.sources}))
    return Opinion(label, confidence, value, reason, sources)


# -- the stage -------------------------------------------------------------------------------
def run(
    evaluations: Iterable[dict], config: ConsensusConfig, nodes: Iterable[dict] = ()
) -> Iterator[Label | Reject]:
    """One label per node the policy has evidence for (node_id order), and a reject per dropped node.

    ``nodes`` (with ``parent_id``) are needed only for ``propagate_errors``: the rule reaches the
    steps below a wrong one, evidence or not.
    """
    by_node: dict[str, list[dict]] = defaultdict(list)
    for evaluation in evaluations:
        by_node[evaluation["node_id"]].append(evaluation)
    problem_of = {nid: ev[0]["problem_id"] for nid, ev in by_node.items()}
    decided: dict[str, Opinion] = {}
    dropped: dict[str, Dropped] = {}
    for nid in sorted(by_node):
        evidence = by_node[nid]
        opinion = policy_opinion(evidence, config)
        tool = tool_opinion(evidence, config) if config.tool_veto else None
        if tool is not None and tool.label == -1 and tool.confidence >= 1.0:  # only a decisive check vetoes
            found = tool.reason[len("tool: "):]
            if isinstance(opinion, Opinion) and opinion.label == -1:  # agreed: the check makes it certain
                opinion = Opinion(-1, 1.0, opinion.value, f"{opinion.reason}; tool agrees: {found}",
                                  tuple(sorted({*opinion.sources, "tool"})))
            else:
                value = opinion.value if isinstance(opinion, Opinion) else None
                opinion = Opinion(-1, 1.0, value, f"tool veto: {found}", ("tool",))
        if isinstance(opinion, Opinion):
            decided[nid] = opinion
        elif isinstance(opinion, Dropped):
            dropped[nid] = opinion
    humans = {}
    if config.human_override:
        humans = {nid: human for nid, evidence in by_node.items() if (human := human_opinion(evidence)) is not None}
    # until_recovered reads a human label as the step's own label (it can open or repair an error),
    # so humans come first there; all_after propagates before humans replace their steps' labels.
    humans_first = config.propagate_errors and config.propagation == "until_recovered"
    if humans_first:
        _override(decided, dropped, humans)
    if config.propagate_errors and config.propagation == "all_after":
        _propagate(decided, dropped, problem_of, list(nodes))
    elif config.propagate_errors:
        _propagate_until_recovered(decided, dropped, problem_of, list(nodes), keep=set(humans))
    if not humans_first:
        _override(decided, dropped, humans)
    for nid in sorted(decided):
        o = decided[nid]
        yield Label(
            node_id=nid, problem_id=problem_of[nid], label=o.label, value=o.value,
            confidence=round(min(max(o.confidence, 0.0), 1.0), 6), reason=o.reason, policy=config.policy_id,
            sources="+".join(o.sources),
        )
    for nid in sorted(set(dropped) - set(decided)):
        yield Reject(stage=STAGE, item=nid, reason=dropped[nid].reason, detail=dropped[nid].detail)


def _override(decided: dict[str, Opinion], dropped: dict[str, Dropped], humans: dict[str, Opinion]) -> None:
    for nid, human in humans.items():
        decided[nid] = human
        dropped.pop(nid, None)


def _propagate(
    decided: dict[str, Opinion], dropped: dict[str, Dropped], problem_of: dict[str, str], nodes: list[dict]
) -> None:
    """Label every node below a -1 node -1, naming the first wrong ancestor."""
    tree = StepTree(nodes)
    for n in nodes:
        problem_of.setdefault(n["node_id"], n["problem_id"])
    first_wrong: dict[str, str | None] = {}

    def wrong_ancestor(nid: str) -> str | None:
        # Iterative walk up to the first memoised or root node (paths can be hundreds of steps).
        chain: list[str] = []
        found = None
        for ancestor in tree.ancestors(nid):
            if ancestor in first_wrong:
                found = first_wrong[ancestor]
                break
            chain.append(ancestor)
        for node in reversed(chain):
            if found is None and node in decided and decided[node].label == -1:
                found = node
            first_wrong[node] = found
        return found

    for nid in sorted(tree.parent):
        ancestor = wrong_ancestor(nid)
        if ancestor is None or (nid in decided and decided[nid].label == -1):
            continue
        source = decided[ancestor]
        decided[nid] = Opinion(
            -1, source.confidence, decided[nid].value if nid in decided else None,
            f"below the wrong step {ancestor[:12]} (errors propagate): {source.reason}", (*source.sources, "propagated"),
        )
        dropped.pop(nid, None)


def _propagate_until_recovered(
    decided: dict[str, Opinion], dropped: dict[str, Dropped], problem_of: dict[str, str], nodes: list[dict],
    keep: set[str],
) -> None:
    """Label -1 every node under an open error, up to the first node whose own label is +1 (see the
    module's rule 2). ``decided`` holds the own labels (policy, tool veto, humans); ``keep`` are
    nodes whose label nothing replaces (the human-labelled ones)."""
    tree = StepTree(nodes)
    for n in nodes:
        problem_of.setdefault(n["node_id"], n["problem_id"])
    own = dict(decided)  # read-only: a propagated -1 opens nothing and repairs nothing
    open_below: dict[str, str | None] = {}  # node -> the wrong step still open below it (None: none)

    def state_below(nid: str) -> str | None:
        # Iterative: walk up to the first memoised node or the root, then settle the chain downwards.
        if nid in open_below:
            return open_below[nid]
        chain = [nid]
        for ancestor in tree.ancestors(nid):
            if ancestor in open_below:
                break
            chain.append(ancestor)
        above = open_below.get(tree.parent.get(chain[-1]))
        for node in reversed(chain):
            mine = own.get(node)
            if mine is not None and mine.label == -1:
                above = node
            elif mine is not None and mine.label == 1:
                above = None
            open_below[node] = above
        return open_below[nid]

    for nid in sorted(tree.parent):
        parent = tree.parent.get(nid)
        error = state_below(parent) if parent is not None else None
        if error is None:
            continue
        mine = own.get(nid)
        if mine is not None and mine.label == 1:
            decided[nid] = Opinion(mine.label, mine.confidence, mine.value,
                                   f"{mine.reason}; repairs the wrong step {error[:12]} above", mine.sources)
            continue
        if (mine is not None and mine.label == -1) or nid in keep:
            continue
        source = own[error]
        decided[nid] = Opinion(
            -1, source.confidence, mine.value if mine is not None else None,
            f"below the wrong step {error[:12]}, not repaired since (errors propagate until recovered): {source.reason}",
            (*source.sources, "propagated"),
        )
        dropped.pop(nid, None)


def _key(ctx, shard) -> tuple:
    """Human review evidence enters only where there is some: a shard nobody reviewed keeps its key,
    and a new annotation re-labels just the shard of its problem. Settings added later enter only
    when they differ from what earlier stores were made with (``ConsensusConfig.LEGACY``)."""
    parts: list = [key_settings(ctx.config.consensus)]
    if human := ctx.human_evidence(shard):
        parts.append(sorted((row["evaluation_id"], row["verdict"], json.loads(row["meta"])["version"]) for row in human))
    return parts


def _run_shard(inputs, ctx) -> Iterator[Label | Reject]:
    """Labels from every piece of evidence on the shard's tree: imported, labeller's, verifiers', humans'."""
    config: ConsensusConfig = ctx.config.consensus
    evaluations = inputs.rows("evaluations") + ctx.human_evidence(inputs.shard)
    return run(evaluations, config, inputs.rows("nodes") if config.propagate_errors else [])


SPEC = Stage(
    name=STAGE, version=VERSION, slot="labels", after="verification", kind="derive",
    reads={"evaluations": EVIDENCE_SLOTS, "nodes": TREE_SLOTS},
    writes=("labels", "rejects"), run=_run_shard, key=_key, config_field="consensus",
    doc="A pure, versioned policy turns each step's evidence into one label (or drops the step, with a reason).",
)
