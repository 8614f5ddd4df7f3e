"""Export stage: the step tree and its labels and pairs as TRL-ready Hugging Face datasets.

Reads problems, rollouts, nodes, labels and pairs (Arrow tables with the schemas of
``stepforge.schemas.records``; for agent tasks also the step filter's decisions, the written
reasoning and the agent pairs) and writes one dataset per requested name, each validated against
its format in ``stepforge.schemas.formats`` before it is written, plus a ``README.md`` dataset card.

The datasets are the entries of ``DATASETS`` (``registry.ExportedDataset``: name, format,
features, builder, consumer, card text), declared once; the config's choices and their
description, the dispatch in ``run`` and the card are derived from them. The row builders below
document what each row is.

A rollout or pair that cannot be exported is counted under a stable snake_case reason in its
dataset's ``skipped``; it never stops the export.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from datasets import Dataset, Features, List, Value
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepforge.schemas.formats import DEFAULT_STEP_TAG, stepwise_to_math_shepherd, unpair_preference
from stepforge.schemas.records import Augmentation, Pair, StepDecision
from stepforge.stages.export import agent_datasets as agent_export
from stepforge.stages.export.registry import Built, ExportedDataset, ExportInputs, by_name, describe
from stepforge.stages.agent.trajectory import agent_meta
from stepforge.stages.label.progress_rewards import progress_rewards, solve_rate
from stepforge.stages.rollout.split import SplitConfig, join_prefix
from stepforge.stages.tree import path_to

STAGE = "export"
VERSION = 1

NeutralPolicy = Literal["negative", "positive", "drop"]
TrajectoryOrigin = Literal["policy", "mc", "mcts"]

# Explicit features, so every column keeps its type even when a dataset is empty or a
# column is all None.
PRM_FEATURES = Features(
    {
        "prompt": Value("string"),
        "completions": List(Value("string")),
        "labels": List(Value("bool")),
        "problem_id": Value("string"),
        "rollout_id": Value("string"),
        "node_ids": List(Value("string")),
        "values": List(Value("float64")),
        "confidences": List(Value("float64")),
        # Per step: the '+'-joined evidence sources behind its label (mc, judge, tool, human, ...).
        "label_sources": List(Value("string")),
        "label_policy": Value("string"),
        "outcome": Value("bool"),
        "final_answer": Value("string"),
        "gold_answer": Value("string"),
        "model": Value("string"),
        "origin": Value("string"),
        "root_value": Value("float64"),
        "progress": List(Value("float64")),
    }
)
MATH_SHEPHERD_FEATURES = Features(
    {
        "input": Value("string"),
        "label": Value("string"),
        "value": List(Value("string")),
        **{name: feature for name, feature in PRM_FEATURES.items() if name not in ("prompt", "completions", "labels")},
    }
)
_PAIR_PROVENANCE = {
    "pair_id": Value("string"),
    "problem_id": Value("string"),
    "kind": Value("string"),
    "margin": Value("float64"),
    "chosen_value": Value("float64"),
    "rejected_value": Value("float64"),
    "sources": Value("string"),
}
DPO_FEATURES = Features(
    {"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string"), **_PAIR_PROVENANCE}
)
KTO_FEATURES = Features(
    {"prompt": Value("string"), "completion": Value("string"), "label": Value("bool"), **_PAIR_PROVENANCE}
)
# No column may be called ``value`` (the math_shepherd format's key), hence ``step_value``.
STEP_KTO_FEATURES = Features(
    {
        "prompt": Value("string"),
        "completion": Value("string"),
        "label": Value("bool"),
        "problem_id": Value("string"),
        "node_id": Value("string"),
        "depth": Value("int32"),
        "origin": Value("string"),
        "step_label": Value("int8"),
        "step_value": Value("float64"),
        "confidence": Value("float64"),
        "label_sources": Value("string"),
        "label_policy": Value("string"),
    }
)
FULL_STEP_DPO_FEATURES = Features(
    {
        "prompt": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "chosen_step_rewards": List(Value("float64")),
        "rejected_step_rewards": List(Value("float64")),
        "chosen_steps": List(Value("string")),
        "rejected_steps": List(Value("string")),
        "chosen_node_id": Value("string"),
        "rejected_node_id": Value("string"),
        **_PAIR_PROVENANCE,
    }
)
# ---------------------------------------------------------------------------------------------
# The registry: one entry per dataset. Builders that share rows go through ``inputs.built``, so
# the shared rows are built once whichever of the datasets are asked for.


def _prm_stepwise(inputs: ExportInputs) -> Built:
    config = inputs.config
    return build_prm_rows(
        inputs.problems, inputs.rollouts, inputs.nodes, inputs.labels, config.neutral_as, config.trajectory_origins
    )


def _math_shepherd(inputs: ExportInputs) -> Built:
    # The prm_stepwise rows re-laid: a rollout that is not a prm_stepwise row is not one here either.
    prm_rows, prm_skipped = inputs.built(_prm_stepwise)
    rows, tag_skipped = build_math_shepherd_rows(prm_rows, inputs.config.step_tag)
    return rows, prm_skipped + tag_skipped


def _dpo(inputs: ExportInputs) -> Built:
    return build_dpo_rows(inputs.pairs)


def _kto(inputs: ExportInputs) -> Built:
    dpo_rows, dpo_skipped = inputs.built(_dpo)
    # A KTO row is half a pair, so its skips are the pairs' skips.
    return build_kto_rows(dpo_rows), dpo_skipped


def _step_kto(inputs: ExportInputs) -> Built:
    config = inputs.config
    return build_step_kto_rows(
        inputs.problems, inputs.rollouts, inputs.nodes, inputs.labels, config.neutral_as, config.trajectory_origins,
        config.split,
    )


def _full_step_dpo(inputs: ExportInputs) -> Built:
    return build_full_step_dpo_rows(inputs.pairs, inputs.nodes, inputs.labels)


DATASETS: dict[str, ExportedDataset] = by_name(
    [
        ExportedDataset(
            name="prm_stepwise",
            format="stepwise_supervision",
            features=PRM_FEATURES,
            build=_prm_stepwise,
            consumer="TRL-style PRM trainers (layout of trl-lib/math_shepherd)",
            card="one row per trajectory whose steps are all labelled: `prompt` is the question, `completions` the "
            "steps, `labels` one bool per step; `values`, `confidences` and `label_sources` give each step's soft "
            "label, consensus confidence and evidence, `progress` its progress reward (below).",
        ),
        ExportedDataset(
            name="math_shepherd",
            format="math_shepherd",
            features=MATH_SHEPHERD_FEATURES,
            build=_math_shepherd,
            format_options=lambda config: {"step_tag": config.step_tag},
            consumer="OpenRLHF-style PRM trainers (step-tag layout of peiyi9979/Math-Shepherd)",
            card="the `prm_stepwise` rows in the step-tag layout: `input` is the question and the steps, each "
            "followed by the step tag, `label` the same text with each tag replaced by `+` or `-`; a row whose text "
            "contains the tag is skipped (`step_tag_in_text`).",
        ),
        ExportedDataset(
            name="dpo",
            format="preference",
            features=DPO_FEATURES,
            build=_dpo,
            consumer="TRL DPOTrainer (standard preference, explicit prompt)",
            card="every stored pair (column `kind`: `step_dpo` = first wrong step vs a correct step from the same "
            "prefix, `sibling` = two steps from one prefix whose values differ by at least the configured margin, "
            "`trajectory` = a correct vs an incorrect complete solution).",
        ),
        ExportedDataset(
            name="kto",
            format="unpaired_preference",
            features=KTO_FEATURES,
            build=_kto,
            consumer="TRL KTOTrainer (unpaired preference)",
            card="every `dpo` pair as two unpaired rows: its chosen side with `label` true, then its rejected side "
            "with `label` false.",
        ),
        ExportedDataset(
            name="step_kto",
            format="unpaired_preference",
            features=STEP_KTO_FEATURES,
            build=_step_kto,
            consumer="TRL KTOTrainer (unpaired preference, one row per step: Step-KTO)",
            card="Step-KTO, one row per labelled step of the trajectories; `prompt` is the question and the "
            "previous steps, `completion` the step, `label` its label; a step shared by several trajectories "
            "appears once. Steps after a trajectory's first wrong step are included (they carry their own "
            "labels). `step_label` is the raw -1/0/+1 label, `step_value` the soft value.",
        ),
        ExportedDataset(
            name="full_step_dpo",
            format="preference",
            features=FULL_STEP_DPO_FEATURES,
            build=_full_step_dpo,
            consumer="Full-Step-DPO trainers (per-step rewards); TRL DPOTrainer reads the preference columns",
            card="Full-Step-DPO, the `trajectory` pairs, with `chosen_steps`/`rejected_steps` and "
            "`chosen_step_rewards`/`rejected_step_rewards`, each step's soft value, first step first.",
        ),
        *agent_export.AGENT_DATASETS,
    ]
)
"""Every dataset the export can write, in the default export order."""

# Derived views of the registry, for readers that want one aspect of every dataset.
DATASET_FORMATS: dict[str, str] = {name: entry.format for name, entry in DATASETS.items()}
DATASET_CONSUMERS: dict[str, str] = {name: entry.consumer for name, entry in DATASETS.items()}
FEATURES: dict[str, Features] = {name: entry.features for name, entry in DATASETS.items()}
# A Literal, so a config naming an unknown dataset is refused with the list of known ones.
ExportName = Literal[tuple(DATASETS)]


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: Path = Field(description="Directory the datasets and the README.md dataset card are written to.")
    formats: list[ExportName] = Field(
        default_factory=lambda: list(DATASETS),
        min_length=1,
        description=describe(DATASETS),
    )
    trajectory_origins: list[TrajectoryOrigin] = Field(
        default_factory=lambda: ["policy"],
        min_length=1,
        description="Origins of the rollouts exported as trajectories (prm_stepwise, math_shepherd rows and the "
        "steps of step_kto): policy samples by default; add mcts to export a tree search's complete paths, mc "
        "for Monte Carlo completions (whole path from step 1). A rollout with an unlabelled step is not a "
        "prm_stepwise row; its labelled steps still become step_kto rows.",
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="How step_kto prompts write the previous steps back (question + blank line + "
        "join_prefix(steps)), as the pairs do; the run's split, so prompts match the pairs'.",
    )
    step_tag: str = Field(
        default=DEFAULT_STEP_TAG,
        min_length=1,
        description="Marker ending each step in the math_shepherd layout; must not occur in the text.",
    )
    neutral_as: NeutralPolicy = Field(
        default="negative",
        description="How a neutral step (label 0) becomes a bool: negative -> False, positive -> True, "
        "drop -> the rollout is skipped (reason neutral_step; in step_kto only the neutral step is). Consumers "
        "disagree, so it is explicit.",
    )
    use_reasoning: bool = Field(
        default=True,
        description="agent_sft: a kept turn whose reasoning was written (augment) carries it as its content; the "
        "agent's own text stays in original_contents.",
    )
    parquet: bool = Field(default=True, description="Write each dataset as out_dir/<name>.parquet.")
    save_to_disk: bool = Field(
        default=True, description="Write each dataset with Dataset.save_to_disk to out_dir/<name>."
    )

    @model_validator(mode="after")
    def _writes_something(self) -> ExportConfig:
        if not (self.parquet or self.save_to_disk):
            raise ValueError("at least one of parquet and save_to_disk must be true")
        return self


def run(
    config: ExportConfig,
    problems: pa.Table,
    rollouts: pa.Table,
    nodes: pa.Table,
    labels: pa.Table,
    pairs: pa.Table,
    step_filter: pa.Table | None = None,
    augmentations: pa.Table | None = None,
    agent_pairs: pa.Table | None = None,
    provenance: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Write each requested dataset and yield its summary, then write the dataset card.

    A summary is ``{"dataset", "format", "rows", "path", "parquet_path", "skipped"}``; ``path``
    is the ``save_to_disk`` directory and ``parquet_path`` the Parquet file (None if not written).
    Formats that do not apply to the run's problems are left out: the agent datasets when no
    problem is an agent task, the math datasets when every problem is one. ``provenance``
    (``flows.figures.run_figures`` plus the run's config) fills the card's "How it was made".
    """
    config.out_dir.mkdir(parents=True, exist_ok=True)
    is_agent = [agent_meta(meta) is not None for meta in problems.column("meta").to_pylist()]
    applies = {"agent": any(is_agent), "math": not all(is_agent) or not is_agent}
    wanted = [  # de-duplicated, in the order asked, and only what applies to these problems
        DATASETS[name] for name in dict.fromkeys(config.formats) if applies[DATASETS[name].applies_to]
    ]
    inputs = ExportInputs(
        config=config, problems=problems, rollouts=rollouts, nodes=nodes, labels=labels, pairs=pairs,
        step_filter=step_filter if step_filter is not None else StepDecision.ARROW_SCHEMA.empty_table(),
        augmentations=augmentations if augmentations is not None else Augmentation.ARROW_SCHEMA.empty_table(),
        agent_pairs=agent_pairs if agent_pairs is not None else Pair.ARROW_SCHEMA.empty_table(),
    )

    summaries: list[dict[str, Any]] = []
    label_policies: set[str] = set()
    for entry in wanted:
        rows, skipped = inputs.built(entry.build)
        summary = _write(entry, rows, config)
        summary["skipped"] = dict(sorted(skipped.items()))
        summaries.append(summary)
        if "label_policy" in entry.features:  # the card names the policies behind the exported step labels
            label_policies.update(policy for row in rows for policy in row["label_policy"].split(","))
        yield summary

    (config.out_dir / "README.md").write_text(
        dataset_card(summaries, config, sorted(label_policies), provenance), encoding="utf-8"
    )


# ---------------------------------------------------------------------------------------------
# Row builders: pure functions of the input tables, deterministic in order.


def build_prm_rows(
    problems: pa.Table,
    rollouts: pa.Table,
    nodes: pa.Table,
    labels: pa.Table,
    neutral_as: NeutralPolicy,
    origins: list[TrajectoryOrigin] | tuple[str, ...] = ("policy",),
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One stepwise-supervision row per rollout of ``origins``, sorted by (problem_id, rollout_id).

    ``progress`` is ``progress_rewards(root_value, values, outcome)`` with ``root_value`` the
    problem's policy solve rate (``root_values``), whatever the exported origins.
    """
    problem_rows = problems.select(["problem_id", "question", "gold_answer"]).to_pylist()
    problem_by_id = {problem["problem_id"]: problem for problem in problem_rows}
    text_by_node = dict(zip(nodes.column("node_id").to_pylist(), nodes.column("text").to_pylist()))
    label_by_node = _labels_by_node(labels)
    root_by_problem = root_values(rollouts)

    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for rollout in _trajectories(rollouts, origins):
        node_ids = rollout["node_ids"] or []
        problem = problem_by_id.get(rollout["problem_id"])
        reason = None
        if problem is None:
            reason = "missing_problem"
        elif not node_ids:
            reason = "no_steps"
        elif any(node_id not in text_by_node for node_id in node_ids):
            reason = "missing_node"
        elif any(node_id not in label_by_node for node_id in node_ids):
            reason = "unlabelled_step"
        elif neutral_as == "drop" and any(label_by_node[node_id]["label"] == 0 for node_id in node_ids):
            reason = "neutral_step"
        if reason:
            skipped[reason] += 1
            continue

        step_labels = [label_by_node[node_id] for node_id in node_ids]
        values = [label["value"] for label in step_labels]
        root_value = root_by_problem.get(rollout["problem_id"])
        rows.append(
            {
                "prompt": problem["question"],
                "completions": [text_by_node[node_id] for node_id in node_ids],
                "labels": [_label_to_bool(label["label"], neutral_as) for label in step_labels],
                "problem_id": rollout["problem_id"],
                "rollout_id": rollout["rollout_id"],
                "node_ids": node_ids,
                "values": values,
                "confidences": [label["confidence"] for label in step_labels],
                "label_sources": [label.get("sources") or "" for label in step_labels],
                "label_policy": ",".join(sorted({label["policy"] for label in step_labels})),
                "outcome": rollout["outcome"],
                "final_answer": rollout["final_answer"],
                "gold_answer": problem["gold_answer"],
                "model": rollout["model"],
                "origin": rollout["origin"],
                "root_value": root_value,
                "progress": progress_rewards(root_value, values, rollout["outcome"]),
            }
        )
    return rows, skipped


def root_values(rollouts: pa.Table) -> dict[str, float]:
    """Each problem's solve rate under the policy: the mean outcome of its policy rollouts (None = wrong)."""
    outcomes: dict[str, list[bool | None]] = {}
    for rollout in rollouts.select(["problem_id", "origin", "outcome"]).to_pylist():
        if rollout["origin"] == "policy":
            outcomes.setdefault(rollout["problem_id"], []).append(rollout["outcome"])
    return {problem_id: solve_rate(values) for problem_id, values in outcomes.items()}


def _trajectories(rollouts: pa.Table, origins: list[TrajectoryOrigin] | tuple[str, ...]) -> list[dict[str, Any]]:
    """The rollouts exported as trajectories, sorted by (problem_id, rollout_id).

    By default only policy samples: MC completions are evidence for labels, not trajectories
    to train on (their paths repeat a policy prefix).
    """
    wanted = set(origins)
    rollout_rows = rollouts.select(
        ["rollout_id", "problem_id", "origin", "node_ids", "final_answer", "outcome", "model"]
    ).to_pylist()
    return sorted(
        (rollout for rollout in rollout_rows if rollout["origin"] in wanted),
        key=lambda r: (r["problem_id"], r["rollout_id"]),
    )


def build_step_kto_rows(
    problems: pa.Table,
    rollouts: pa.Table,
    nodes: pa.Table,
    labels: pa.Table,
    neutral_as: NeutralPolicy,
    origins: list[TrajectoryOrigin] | tuple[str, ...],
    split: SplitConfig,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One unpaired row per distinct labelled step of the trajectories of ``origins`` (Step-KTO).

    prompt = ``question + "\\n\\n" + join_prefix(previous steps, split)`` (the pairs' prompt),
    completion = the step, label = its label as a bool (``neutral_as``; ``drop`` skips the
    neutral step only). Rows follow the trajectories in (problem_id, rollout_id) order and
    each trajectory's steps in order; a step already exported from an earlier trajectory is
    not repeated. Steps after a trajectory's first wrong step are exported too (they are
    labelled in their own right). ``skipped`` counts distinct steps (``missing_node``,
    ``unlabelled_step``, ``neutral_step``, ``empty_text``) and, for ``missing_problem`` and
    ``no_steps``, rollouts.
    """
    problem_by_id = {row["problem_id"]: row for row in problems.select(["problem_id", "question"]).to_pylist()}
    node_rows = nodes.select(["node_id", "text", "origin"]).to_pylist()
    node_by_id = {node["node_id"]: node for node in node_rows}
    label_by_node = _labels_by_node(labels)

    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for rollout in _trajectories(rollouts, origins):
        node_ids = rollout["node_ids"] or []
        problem = problem_by_id.get(rollout["problem_id"])
        if problem is None or not node_ids:
            skipped["missing_problem" if problem is None else "no_steps"] += 1
            continue
        for position, nid in enumerate(node_ids):
            if nid in seen:
                continue
            seen.add(nid)
            path = node_ids[: position + 1]
            label = label_by_node.get(nid)
            reason = None
            if any(step not in node_by_id for step in path):
                reason = "missing_node"
            elif label is None:
                reason = "unlabelled_step"
            elif neutral_as == "drop" and label["label"] == 0:
                reason = "neutral_step"
            elif not node_by_id[nid]["text"]:
                reason = "empty_text"
            if reason:
                skipped[reason] += 1
                continue
            previous = [node_by_id[step]["text"] for step in node_ids[:position]]
            rows.append(
                {
                    "prompt": problem["question"] + "\n\n" + join_prefix(previous, split),
                    "completion": node_by_id[nid]["text"],
                    "label": _label_to_bool(label["label"], neutral_as),
                    "problem_id": rollout["problem_id"],
                    "node_id": nid,
                    "depth": position + 1,
                    "origin": node_by_id[nid]["origin"],
                    "step_label": label["label"],
                    "step_value": label["value"],
                    "confidence": label["confidence"],
                    "label_sources": label.get("sources") or "",
                    "label_policy": label["policy"],
                }
            )
    return rows, skipped


def build_math_shepherd_rows(
    prm_rows: list[dict[str, Any]], step_tag: str
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The stepwise rows in the step-tag layout; a row whose text contains the tag is skipped."""
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for prm_row in prm_rows:
        # A tag inside the text would be read as an extra step boundary.
        if step_tag in prm_row["prompt"] or any(step_tag in step for step in prm_row["completions"]):
            skipped["step_tag_in_text"] += 1
            continue
        rows.append(stepwise_to_math_shepherd(prm_row, step_tag))
    return rows, skipped


def build_dpo_rows(pairs: pa.Table) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One preference row per pair, sorted by (problem_id, pair_id)."""
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    columns = ["prompt", "chosen", "rejected", *_PAIR_PROVENANCE]
    for pair in sorted(pairs.select(columns).to_pylist(), key=lambda p: (p["problem_id"], p["pair_id"])):
        if not (pair["prompt"] and pair["chosen"] and pair["rejected"]):
            skipped["empty_text"] += 1
        elif pair["chosen"] == pair["rejected"]:
            skipped["identical_sides"] += 1
        else:
            rows.append(pair)
    return rows, skipped


def build_kto_rows(dpo_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair as its desirable (chosen) row followed by its undesirable (rejected) row."""
    return [row for pair in dpo_rows for row in unpair_preference(pair)]


def build_full_step_dpo_rows(
    pairs: pa.Table, nodes: pa.Table, labels: pa.Table
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One row per ``trajectory`` pair, sorted by (problem_id, pair_id), with a reward per step.

    Each side's steps are found by walking ``parent_id`` up from its leaf node
    (``chosen_node_id`` / ``rejected_node_id``); its step rewards are those steps' label
    values, first step first. Pairs of other kinds are not candidates (not counted). A pair
    is skipped as ``missing_node`` (a step is not in the nodes table), ``unlabelled_step`` (a
    step has no label), ``unvalued_step`` (a label without a value), ``empty_text`` or
    ``identical_sides``.
    """
    parent_by_node: dict[str, str | None] = {}
    text_by_node: dict[str, str] = {}
    for node in nodes.select(["node_id", "parent_id", "text"]).to_pylist():
        parent_by_node[node["node_id"]] = node["parent_id"]
        text_by_node[node["node_id"]] = node["text"]
    label_by_node = _labels_by_node(labels)

    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    columns = ["prompt", "chosen", "rejected", "chosen_node_id", "rejected_node_id", *_PAIR_PROVENANCE]
    candidates = [pair for pair in pairs.select(columns).to_pylist() if pair["kind"] == "trajectory"]
    for pair in sorted(candidates, key=lambda p: (p["problem_id"], p["pair_id"])):
        if not (pair["prompt"] and pair["chosen"] and pair["rejected"]):
            skipped["empty_text"] += 1
            continue
        if pair["chosen"] == pair["rejected"]:
            skipped["identical_sides"] += 1
            continue
        paths = [path_to(pair[f"{side}_node_id"], parent_by_node) for side in ("chosen", "rejected")]
        if any(path is None for path in paths):
            skipped["missing_node"] += 1
            continue
        steps = [step for path in paths for step in path]
        if any(step not in label_by_node for step in steps):
            skipped["unlabelled_step"] += 1
            continue
        if any(label_by_node[step]["value"] is None for step in steps):
            skipped["unvalued_step"] += 1
            continue
        chosen_path, rejected_path = paths
        rows.append(
            {
                **pair,
                "chosen_step_rewards": [label_by_node[step]["value"] for step in chosen_path],
                "rejected_step_rewards": [label_by_node[step]["value"] for step in rejected_path],
                "chosen_steps": [text_by_node[step] for step in chosen_path],
                "rejected_steps": [text_by_node[step] for step in rejected_path],
            }
        )
    return rows, skipped


def _labels_by_node(labels: pa.Table) -> dict[str, dict[str, Any]]:
    by_node: dict[str, dict[str, Any]] = {}
    duplicated: set[str] = set()
    columns = ["node_id", "label", "value", "confidence", "policy"]
    columns += ["sources"] if "sources" in labels.column_names else []  # labels made before sources existed lack it
    for label in labels.select(columns).to_pylist():
        if label["node_id"] in by_node and by_node[label["node_id"]] != label:
            duplicated.add(label["node_id"])
        by_node[label["node_id"]] = label
    if duplicated:
        raise ValueError(
            f"labels has conflicting rows for node_ids {sorted(duplicated)[:5]}: export expects the labels "
            "of one consensus run, one per node"
        )
    return by_node


def _label_to_bool(label: int, neutral_as: NeutralPolicy) -> bool:
    if label == 0:
        return neutral_as == "positive"
    return label > 0


# ---------------------------------------------------------------------------------------------
# Writing


def _write(entry: ExportedDataset, rows: list[dict[str, Any]], config: ExportConfig) -> dict[str, Any]:
    name, features = entry.name, entry.features
    # Column-wise, because from_list drops every column of an empty list of rows.
    dataset = Dataset.from_dict({column: [row[column] for row in rows] for column in features}, features=features)
    entry.validate(dataset, config)

    path = config.out_dir / name
    parquet_path = config.out_dir / f"{name}.parquet"
    if config.save_to_disk:
        # datasets writes an empty dataset as zero shards, which load_from_disk cannot read back.
        dataset.save_to_disk(str(path), num_shards=None if len(dataset) else 1)
    if config.parquet:
        dataset.to_parquet(str(parquet_path))
    return {
        "dataset": name,
        "format": entry.format,
        "rows": len(dataset),
        "path": str(path) if config.save_to_disk else None,
        "parquet_path": str(parquet_path) if config.parquet else None,
    }


def dataset_card(
    summaries: list[dict[str, Any]], config: ExportConfig, label_policies: list[str], provenance: dict[str, Any] | None = None
) -> str:
    """A README.md for out_dir: what each dataset is, how many rows, and how labels were made."""
    neutral = {
        "negative": "mapped to `False` (treated as a wrong step)",
        "positive": "mapped to `True` (treated as correct)",
        "drop": "not exported: a rollout with any neutral step is skipped (`neutral_step`); in `step_kto` "
        "only the neutral step is",
    }[config.neutral_as]
    exported = [summary["dataset"] for summary in summaries]
    lines = ["---"]
    if config.parquet:
        # Hub dataset-card configs, so `load_dataset(<out_dir or repo>, "<name>")` finds each file.
        lines.append("configs:")
        for summary in summaries:
            name = summary["dataset"]
            lines += [f"- config_name: {name}", f"  data_files: {name}.parquet"]
    lines += [
        "tags:",
        "- stepforge",
        "- process-supervision",
        "---",
        "",
        "# stepforge export",
        "",
        "Step-level supervision data exported by stepforge.",
        "",
        "| dataset | format | rows | skipped | consumer |",
        "|---|---|---|---|---|",
    ]
    for summary in summaries:
        name = summary["dataset"]
        skipped = ", ".join(f"{reason}: {count}" for reason, count in summary["skipped"].items()) or "none"
        consumer = DATASETS[name].consumer
        lines.append(f"| `{name}` | `{summary['format']}` | {summary['rows']} | {skipped} | {consumer} |")
    lines += [
        "",
        "## Labels",
        "",
        f"- Label policy: {', '.join(f'`{policy}`' for policy in label_policies) or 'n/a (no step labels exported)'}.",
        "- Step labels: `+1` -> `True`, `-1` -> `False`.",
        f"- Neutral steps (label `0`): {neutral}.",
        "- `values` holds each step's soft label (e.g. the Monte Carlo fraction of correct completions) "
        "and `confidences` the consensus confidence, beside the boolean `labels`; `label_sources` names the "
        "evidence behind each label (`mc`, `outcome`, `judge`, `tool`, `human`, `propagated`).",
        *([f"- Math-Shepherd step tag: `{config.step_tag}`."] if "math_shepherd" in exported else []),
        f"- Trajectories (`prm_stepwise`, `math_shepherd` rows and `step_kto` steps) are the rollouts of origin "
        f"{', '.join(f'`{origin}`' for origin in config.trajectory_origins)}.",
        "",
        "## Progress rewards",
        "",
        "`prm_stepwise` and `math_shepherd` rows carry `progress`, one per step (Rewarding Progress, "
        "Setlur et al. 2024): the change in the estimated probability of reaching the right answer that "
        "the step caused, `V(prefix through step i) - V(prefix before it)`. `V` before the first step is "
        "`root_value`, the problem's solve rate under the policy (mean outcome of its policy rollouts, an "
        "unchecked answer counting as wrong); after an internal step it is the step's soft value (`values`); "
        "after the last step it is the rollout's own outcome (1 or 0). So a row's progress sums to "
        "`outcome - root_value`. A step whose value or whose predecessor's value is unknown has `null`.",
        "",
        *(["## Datasets", "", *[f"- `{name}`: {DATASETS[name].card}" for name in exported], ""] if exported else []),
        *(_provenance_lines(provenance) if provenance else []),
        "## Formats",
        "",
        "- `stepwise_supervision`: `prompt: str`, `completions: list[str]`, `labels: list[bool]`.",
        "- `math_shepherd`: `input` (steps each followed by the step tag), `label` (the tags replaced by "
        "`+`/`-`), `value: list[str]`.",
        "- `preference`: `prompt`, `chosen`, `rejected` (explicit prompt, standard text).",
        "- `unpaired_preference`: `prompt`, `completion`, `label: bool`.",
        "- `conversational_sft`: `messages` (role, content, tool_calls, tool_call_id, name) and `train_mask: "
        "list[bool]`, one flag per message, true only on the assistant turns to train on.",
        "- `conversational_preference`: `prompt` (messages), `chosen` / `rejected` (one assistant message each).",
        "",
    ]
    return "\n".join(lines)


def _provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """'How it was made': config, models, label policy, counts per label and reject reason, cost."""
    figures = provenance.get("figures") or {}
    config = provenance.get("config") or {}
    backend = config.get("backend") or {}
    verify = config.get("verify") or {}
    judge = verify.get("judge_backend") or backend
    counts = figures.get("counts") or {}
    cost = figures.get("cost") or {}
    labels = figures.get("labels") or {}
    lines = [
        "## How it was made",
        "",
        f"- Run `{figures.get('run', config.get('run'))}`; source `{(config.get('ingest') or {}).get('source')}` "
        f"(format `{(config.get('ingest') or {}).get('format')}`).",
        f"- Policy model: `{backend.get('model')}` ({backend.get('kind')}); judge: `{judge.get('model')}` "
        f"({judge.get('kind')}), used by verifiers {', '.join(f'`{v}`' for v in verify.get('sources') or []) or 'none'}.",
        f"- Labeller: `{config.get('labeller')}`; consensus policy: "
        f"{', '.join(f'`{p}`' for p in figures.get('label_policies') or []) or 'none'}.",
        f"- Rows: {', '.join(f'{table} {n}' for table, n in counts.items())}.",
        "",
        "| label | steps |",
        "|---|---|",
        *[f"| {name} | {labels.get(key, 0)} |" for key, name in (("1", "+1"), ("0", "0"), ("-1", "-1"))],
        "",
    ]
    rejects = figures.get("rejects") or []
    if rejects:
        lines += ["| stage | reject reason | rows |", "|---|---|---|"]
        lines += [f"| {r['stage']} | `{r['reason']}` | {r['count']} |" for r in rejects]
        lines.append("")
    else:
        lines += ["No rows were rejected.", ""]
    if cost:
        lines += [
            f"- Cost: {cost.get('generated_tokens', 0)} generated tokens over {cost.get('generated', 0)} generations "
            f"({cost.get('cache_hits', 0)} replayed from the cache), {cost.get('seconds', 0)} s of stage time"
            + (f", ${cost['cost_usd']}" if cost.get("cost_usd") else "")
            + (f"; {cost['tokens_per_labelled_step']} tokens and {cost['seconds_per_labelled_step']} s per labelled step"
               if cost.get("tokens_per_labelled_step") is not None else "") + ".",
            "",
        ]
    lines += ["<details><summary>Full configuration</summary>", "", "```json",
              json.dumps(config, indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]
    return lines
