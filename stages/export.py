"""Export stage: the step tree and its labels and pairs as TRL-ready Hugging Face datasets.

Reads problems, rollouts, nodes, labels and pairs (Arrow tables with the schemas of
``stepforge.schemas.records``) and writes one dataset per requested format, each validated
against ``stepforge.schemas.formats`` before it is written, plus a ``README.md`` dataset card.

- ``prm_stepwise``: one row per policy rollout, ``{prompt, completions, labels}`` (the layout
  of trl-lib/math_shepherd) plus provenance (soft values, confidences, outcome, ...).
- ``math_shepherd``: the same rollouts with step tags and ``+``/``-`` marks (OpenRLHF PRM).
- ``dpo``: one row per pair, ``{prompt, chosen, rejected}`` plus provenance (TRL DPOTrainer).
- ``kto``: each pair as a desirable and an undesirable row (TRL KTOTrainer).

A rollout or pair that cannot be exported is counted under a stable snake_case reason in its
dataset's ``skipped``; it never stops the export.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from datasets import Dataset, Features, List, Value
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepforge.schemas.formats import (
    DEFAULT_STEP_TAG,
    VALIDATORS,
    stepwise_to_math_shepherd,
    unpair_preference,
    validate_math_shepherd,
)

STAGE = "export"
VERSION = 1

ExportName = Literal["prm_stepwise", "math_shepherd", "dpo", "kto"]
NeutralPolicy = Literal["negative", "positive", "drop"]

DATASET_FORMATS: dict[str, str] = {
    "prm_stepwise": "stepwise_supervision",
    "math_shepherd": "math_shepherd",
    "dpo": "preference",
    "kto": "unpaired_preference",
}
"""Which ``stepforge.schemas.formats`` format each exported dataset is in."""

DATASET_CONSUMERS: dict[str, str] = {
    "prm_stepwise": "TRL-style PRM trainers (layout of trl-lib/math_shepherd)",
    "math_shepherd": "OpenRLHF-style PRM trainers (step-tag layout of peiyi9979/Math-Shepherd)",
    "dpo": "TRL DPOTrainer (standard preference, explicit prompt)",
    "kto": "TRL KTOTrainer (unpaired preference)",
}

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
        "label_policy": Value("string"),
        "outcome": Value("bool"),
        "final_answer": Value("string"),
        "gold_answer": Value("string"),
        "model": Value("string"),
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
FEATURES: dict[str, Features] = {
    "prm_stepwise": PRM_FEATURES,
    "math_shepherd": MATH_SHEPHERD_FEATURES,
    "dpo": DPO_FEATURES,
    "kto": KTO_FEATURES,
}


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: Path = Field(description="Directory the datasets and the README.md dataset card are written to.")
    formats: list[ExportName] = Field(
        default_factory=lambda: list(DATASET_FORMATS),
        min_length=1,
        description="Datasets to export: prm_stepwise ({prompt, completions, labels}), math_shepherd "
        "(step-tagged input, +/- label), dpo ({prompt, chosen, rejected}), kto ({prompt, completion, label}).",
    )
    step_tag: str = Field(
        default=DEFAULT_STEP_TAG,
        min_length=1,
        description="Marker ending each step in the math_shepherd layout; must not occur in the text.",
    )
    neutral_as: NeutralPolicy = Field(
        default="negative",
        description="How a neutral step (label 0) becomes a bool: negative -> False, positive -> True, "
        "drop -> the rollout is skipped (reason neutral_step). Consumers disagree, so it is explicit.",
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
) -> Iterator[dict[str, Any]]:
    """Write each requested dataset and yield its summary, then write the dataset card.

    A summary is ``{"dataset", "format", "rows", "path", "parquet_path", "skipped"}``; ``path``
    is the ``save_to_disk`` directory and ``parquet_path`` the Parquet file (None if not written).
    """
    config.out_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(config.formats))  # de-duplicated, in the order asked
    prm_rows: list[dict[str, Any]] = []
    prm_skipped: Counter[str] = Counter()
    if {"prm_stepwise", "math_shepherd"} & set(wanted):
        prm_rows, prm_skipped = build_prm_rows(problems, rollouts, nodes, labels, config.neutral_as)
    dpo_rows: list[dict[str, Any]] = []
    dpo_skipped: Counter[str] = Counter()
    if {"dpo", "kto"} & set(wanted):
        dpo_rows, dpo_skipped = build_dpo_rows(pairs)

    summaries: list[dict[str, Any]] = []
    for name in wanted:
        if name == "prm_stepwise":
            rows, skipped = prm_rows, prm_skipped
        elif name == "math_shepherd":
            rows, tag_skipped = build_math_shepherd_rows(prm_rows, config.step_tag)
            skipped = prm_skipped + tag_skipped
        elif name == "dpo":
            rows, skipped = dpo_rows, dpo_skipped
        else:
            # A KTO row is half a pair, so its skips are the pairs' skips.
            rows, skipped = build_kto_rows(dpo_rows), dpo_skipped

        summary = _write(name, rows, config)
        summary["skipped"] = dict(sorted(skipped.items()))
        summaries.append(summary)
        yield summary

    label_policies = sorted({policy for row in prm_rows for policy in row["label_policy"].split(",")})
    (config.out_dir / "README.md").write_text(dataset_card(summaries, config, label_policies), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Row builders: pure functions of the input tables, deterministic in order.


def build_prm_rows(
    problems: pa.Table,
    rollouts: pa.Table,
    nodes: pa.Table,
    labels: pa.Table,
    neutral_as: NeutralPolicy,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One stepwise-supervision row per policy rollout, sorted by (problem_id, rollout_id)."""
    problem_rows = problems.select(["problem_id", "question", "gold_answer"]).to_pylist()
    problem_by_id = {problem["problem_id"]: problem for problem in problem_rows}
    text_by_node = dict(zip(nodes.column("node_id").to_pylist(), nodes.column("text").to_pylist()))
    label_by_node = _labels_by_node(labels)

    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    rollout_rows = rollouts.select(
        ["rollout_id", "problem_id", "origin", "node_ids", "final_answer", "outcome", "model"]
    ).to_pylist()
    for rollout in sorted(rollout_rows, key=lambda r: (r["problem_id"], r["rollout_id"])):
        # MC completions are evidence for labels, not trajectories to train on.
        if rollout["origin"] != "policy":
            continue
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
        rows.append(
            {
                "prompt": problem["question"],
                "completions": [text_by_node[node_id] for node_id in node_ids],
                "labels": [_label_to_bool(label["label"], neutral_as) for label in step_labels],
                "problem_id": rollout["problem_id"],
                "rollout_id": rollout["rollout_id"],
                "node_ids": node_ids,
                "values": [label["value"] for label in step_labels],
                "confidences": [label["confidence"] for label in step_labels],
                "label_policy": ",".join(sorted({label["policy"] for label in step_labels})),
                "outcome": rollout["outcome"],
                "final_answer": rollout["final_answer"],
                "gold_answer": problem["gold_answer"],
                "model": rollout["model"],
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


def _labels_by_node(labels: pa.Table) -> dict[str, dict[str, Any]]:
    by_node: dict[str, dict[str, Any]] = {}
    duplicated: set[str] = set()
    for label in labels.select(["node_id", "label", "value", "confidence", "policy"]).to_pylist():
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


def _write(name: str, rows: list[dict[str, Any]], config: ExportConfig) -> dict[str, Any]:
    format_name = DATASET_FORMATS[name]
    features = FEATURES[name]
    # Column-wise, because from_list drops every column of an empty list of rows.
    dataset = Dataset.from_dict({column: [row[column] for row in rows] for column in features}, features=features)
    if format_name == "math_shepherd":
        validate_math_shepherd(dataset, step_tag=config.step_tag)
    else:
        VALIDATORS[format_name](dataset)

    path = config.out_dir / name
    parquet_path = config.out_dir / f"{name}.parquet"
    if config.save_to_disk:
        # datasets writes an empty dataset as zero shards, which load_from_disk cannot read back.
        dataset.save_to_disk(str(path), num_shards=None if len(dataset) else 1)
    if config.parquet:
        dataset.to_parquet(str(parquet_path))
    return {
        "dataset": name,
        "format": format_name,
        "rows": len(dataset),
        "path": str(path) if config.save_to_disk else None,
        "parquet_path": str(parquet_path) if config.parquet else None,
    }


def dataset_card(summaries: list[dict[str, Any]], config: ExportConfig, label_policies: list[str]) -> str:
    """A README.md for out_dir: what each dataset is, how many rows, and how labels were made."""
    neutral = {
        "negative": "mapped to `False` (treated as a wrong step)",
        "positive": "mapped to `True` (treated as correct)",
        "drop": "not exported: a rollout with any neutral step is skipped (`neutral_step`)",
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
        consumer = DATASET_CONSUMERS[name]
        lines.append(f"| `{name}` | `{summary['format']}` | {summary['rows']} | {skipped} | {consumer} |")
    lines += [
        "",
        "## Labels",
        "",
        f"- Label policy: {', '.join(f'`{policy}`' for policy in label_policies) or 'n/a (no step labels exported)'}.",
        "- Step labels: `+1` -> `True`, `-1` -> `False`.",
        f"- Neutral steps (label `0`): {neutral}.",
        "- `values` holds each step's soft label (e.g. the Monte Carlo fraction of correct completions) "
        "and `confidences` the consensus confidence, beside the boolean `labels`.",
        *([f"- Math-Shepherd step tag: `{config.step_tag}`."] if "math_shepherd" in exported else []),
        "",
        "## Formats",
        "",
        "- `stepwise_supervision`: `prompt: str`, `completions: list[str]`, `labels: list[bool]`.",
        "- `math_shepherd`: `input` (steps each followed by the step tag), `label` (the tags replaced by "
        "`+`/`-`), `value: list[str]`.",
        "- `preference`: `prompt`, `chosen`, `rejected` (explicit prompt, standard text).",
        "- `unpaired_preference`: `prompt`, `completion`, `label: bool`; each pair gives one `True` "
        "and one `False` row.",
        "",
    ]
    return "\n".join(lines)
