"""Export stage: hand-built step trees in, TRL-format datasets out, read back as consumers would."""

from __future__ import annotations

import copy
import json
import math
import typing
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pytest

from stepforge.schemas.formats import (
    CONFLICTING_KEYS,
    FORMAT_KEYS,
    VALIDATORS,
    validate_math_shepherd,
    validate_preference,
    validate_stepwise_supervision,
    validate_unpaired_preference,
)
from stepforge.schemas.records import Pair, Problem, to_arrow
from stepforge.stages.agent.trajectory import step_text
from stepforge.stages.export import datasets as export
from stepforge.stages.pairs import step_pairs as pairs
from stepforge.stages.export.datasets import ExportConfig
from stepforge.stages.export.registry import ExportedDataset, by_name, describe
from stepforge.stages.rollout.split import SplitConfig

POLICY = "mc_hard@1"
QUESTION_1 = "Natalia sold 48 clips in April and half as many in May. How many in total?"
QUESTION_2 = "Tom has 2 bags of 3 apples and finds 1 more. How many apples?"

# p1: r1 = a correct path ending in a neutral step; r2 = a wrong path; r3 = an MC completion.
# p2: r4 = a correct path; r5 = a path whose last step has no label.
NODES = {
    "n1": ("p1", None, 1, "48/2 = 24"),
    "n2": ("p1", "n1", 2, "24+48 = 72"),
    "n3": ("p1", "n1", 2, "24+48 = 82"),
    "n4": ("p1", "n2", 3, "The answer is 72"),
    "m1": ("p1", "n1", 2, "24*3 = 72"),
    "q1": ("p2", None, 1, "2*3 = 6"),
    "q2": ("p2", "q1", 2, "6+1 = 7"),
    "q3": ("p2", "q1", 2, "6+1 = 8"),
}
# node_id: (label, soft value, confidence)
LABELS = {
    "n1": (1, 0.75, 0.9),
    "n2": (1, 1.0, 0.8),
    "n4": (0, 0.5, 0.3),
    "n3": (-1, 0.0, 0.95),
    "m1": (1, 1.0, 0.5),
    "q1": (1, 1.0, 0.9),
    "q2": (1, None, 0.6),
}


def _problem(problem_id: str, question: str, gold: str) -> dict[str, Any]:
    return {
        "problem_id": problem_id, "source": "hand", "source_index": 0, "question": question,
        "gold_answer": gold, "gold_solution": None, "meta": "{}",
    }


def _rollout(rollout_id: str, problem_id: str, node_ids: list[str], answer: str, outcome: bool,
             origin: str = "policy") -> dict[str, Any]:
    return {
        "rollout_id": rollout_id, "problem_id": problem_id, "origin": origin,
        "prefix_node_id": node_ids[0] if origin == "mc" else None, "sample_index": 0, "node_ids": node_ids,
        "text": "\n\n".join(NODES[n][3] for n in node_ids), "final_answer": answer, "outcome": outcome,
        "outcome_reason": "correct" if outcome else "wrong", "finish_reason": "stop", "num_tokens": 10,
        "model": "tiny-policy", "generation_key": f"g-{rollout_id}",
    }


def _pair(pair_id: str, problem_id: str, kind: str, prompt: str, chosen: str, rejected: str,
          margin: float | None) -> dict[str, Any]:
    return {
        "pair_id": pair_id, "problem_id": problem_id, "kind": kind, "prompt": prompt, "chosen": chosen,
        "rejected": rejected, "prefix_node_id": None, "chosen_node_id": "c", "rejected_node_id": "r",
        "chosen_value": 1.0, "rejected_value": 0.0, "margin": margin, "sources": "mc",
    }


def build_tables(question_1: str = QUESTION_1) -> dict[str, pa.Table]:
    """Two problems' trees; rows deliberately out of order to check the export sorts them."""
    return {
        "problems": to_arrow("problems", [_problem("p2", QUESTION_2, "7"), _problem("p1", question_1, "72")]),
        "rollouts": to_arrow(
            "rollouts",
            [
                _rollout("r5", "p2", ["q1", "q3"], "8", False),
                _rollout("r4", "p2", ["q1", "q2"], "7", True),
                _rollout("r3", "p1", ["n1", "m1"], "72", True, origin="mc"),
                _rollout("r2", "p1", ["n1", "n3"], "82", False),
                _rollout("r1", "p1", ["n1", "n2", "n4"], "72", True),
            ],
        ),
        "nodes": to_arrow(
            "nodes",
            [
                {"node_id": node_id, "problem_id": problem_id, "parent_id": parent, "depth": depth, "text": text,
                 "origin": "mc" if node_id.startswith("m") else "policy", "num_tokens": 5}
                for node_id, (problem_id, parent, depth, text) in NODES.items()
            ],
        ),
        "labels": to_arrow(
            "labels",
            [
                {"node_id": node_id, "problem_id": NODES[node_id][0], "label": label, "value": value,
                 "confidence": confidence, "reason": "mc", "policy": POLICY}
                for node_id, (label, value, confidence) in LABELS.items()
            ],
        ),
        "pairs": to_arrow(
            "pairs",
            [
                _pair("pa", "p2", "trajectory", QUESTION_2 + "\n", "2*3 = 6\n\n6+1 = 7", "2*3 = 6\n\n6+1 = 8", None),
                _pair("pz", "p1", "step_dpo", question_1 + "\n48/2 = 24\n", "24+48 = 72", "24+48 = 82", 1.0),
            ],
        ),
    }


def run_export(out_dir: Path, tables: dict[str, pa.Table] | None = None, **config: Any) -> dict[str, dict]:
    summaries = export.run(ExportConfig(out_dir=out_dir, **config), **(tables or build_tables()))
    return {summary["dataset"]: summary for summary in summaries}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out_dir = tmp_path_factory.mktemp("export")
    return out_dir, run_export(out_dir)


def load_both(out_dir: Path, name: str) -> datasets.Dataset:
    """The dataset as written by save_to_disk, after checking the Parquet copy holds the same rows."""
    from_disk = datasets.load_from_disk(str(out_dir / name))
    from_parquet = datasets.load_dataset("parquet", data_files=str(out_dir / f"{name}.parquet"), split="train")
    assert from_parquet.to_list() == from_disk.to_list()
    return from_disk


def test_summaries(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, summaries = exported
    assert list(summaries) == ["prm_stepwise", "math_shepherd", "dpo", "kto", "step_kto", "full_step_dpo"]
    assert summaries["prm_stepwise"] == {
        "dataset": "prm_stepwise", "format": "stepwise_supervision", "rows": 3,
        "path": str(out_dir / "prm_stepwise"), "parquet_path": str(out_dir / "prm_stepwise.parquet"),
        "skipped": {"unlabelled_step": 1},
    }
    assert summaries["math_shepherd"]["rows"] == 3
    assert summaries["dpo"]["rows"] == 2 and summaries["dpo"]["skipped"] == {}
    assert summaries["kto"]["rows"] == 4
    assert summaries["step_kto"]["rows"] == 6 and summaries["step_kto"]["skipped"] == {"unlabelled_step": 1}
    # The fixture's one trajectory pair points at node ids that are not in the tree.
    assert summaries["full_step_dpo"]["rows"] == 0
    assert summaries["full_step_dpo"]["skipped"] == {"missing_node": 1}


def test_prm_stepwise_rows(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, _ = exported
    dataset = load_both(out_dir, "prm_stepwise")
    validate_stepwise_supervision(dataset)
    assert dataset.column_names == [
        "prompt", "completions", "labels", "problem_id", "rollout_id", "node_ids", "values", "confidences",
        "label_sources", "label_policy", "outcome", "final_answer", "gold_answer", "model", "origin", "root_value", "progress",
    ]
    assert dataset["rollout_id"] == ["r1", "r2", "r4"]  # sorted; MC rollout r3 and unlabelled r5 left out
    r1, r2, r4 = dataset.to_list()
    assert r1["prompt"] == QUESTION_1
    assert r1["completions"] == ["48/2 = 24", "24+48 = 72", "The answer is 72"]
    assert r1["labels"] == [True, True, False]  # the neutral last step maps to negative by default
    assert r1["values"] == [0.75, 1.0, 0.5]
    assert r1["confidences"] == [0.9, 0.8, 0.3]
    assert r1["node_ids"] == ["n1", "n2", "n4"]
    assert (r1["outcome"], r1["final_answer"], r1["gold_answer"]) == (True, "72", "72")
    assert (r1["label_policy"], r1["model"]) == (POLICY, "tiny-policy")
    assert r2["labels"] == [True, False] and r2["outcome"] is False
    assert r4["prompt"] == QUESTION_2 and r4["values"] == [1.0, None]
    assert {r1["origin"], r2["origin"], r4["origin"]} == {"policy"}
    # Root value = solve rate of the problem's policy rollouts: p1 r1 ok, r2 wrong; p2 r4 ok, r5 wrong.
    assert r1["root_value"] == 0.5 and r4["root_value"] == 0.5
    # V: 0.5 (root) -> 0.75 -> 1.0 -> outcome 1.0 (the last step's value 0.5 is replaced by the outcome)
    assert r1["progress"] == [0.25, 0.25, 0.0]
    assert r2["progress"] == [0.25, -0.75]  # 0.5 -> 0.75 -> outcome 0.0
    assert r4["progress"] == [0.5, 0.0]  # the unknown last value does not matter: the outcome replaces it
    for row in (r1, r2, r4):
        assert sum(row["progress"]) == pytest.approx(float(row["outcome"]) - row["root_value"])


@pytest.mark.parametrize(
    ("neutral_as", "r1_labels", "skipped"),
    [
        ("negative", [True, True, False], {"unlabelled_step": 1}),
        ("positive", [True, True, True], {"unlabelled_step": 1}),
        ("drop", None, {"neutral_step": 1, "unlabelled_step": 1}),
    ],
)
def test_neutral_mapping(tmp_path: Path, neutral_as: str, r1_labels: list[bool] | None, skipped: dict) -> None:
    summaries = run_export(tmp_path, formats=["prm_stepwise"], neutral_as=neutral_as)
    assert summaries["prm_stepwise"]["skipped"] == skipped
    rows = {row["rollout_id"]: row for row in datasets.load_from_disk(str(tmp_path / "prm_stepwise")).to_list()}
    assert rows.get("r1", {}).get("labels") == r1_labels
    assert rows["r2"]["labels"] == [True, False]


def test_math_shepherd_rows(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, _ = exported
    dataset = load_both(out_dir, "math_shepherd")
    validate_math_shepherd(dataset)
    r2 = dataset.to_list()[1]
    assert r2["rollout_id"] == "r2"
    assert r2["input"] == QUESTION_1 + " 48/2 = 24 ки\n24+48 = 82 ки"
    assert r2["label"] == QUESTION_1 + " 48/2 = 24 +\n24+48 = 82 -"
    assert r2["value"] == ["+", "-"]
    assert r2["progress"] == [0.25, -0.75] and r2["root_value"] == 0.5
    assert {"prompt", "completions", "labels"}.isdisjoint(dataset.column_names)


def test_math_shepherd_skips_text_containing_the_step_tag(tmp_path: Path) -> None:
    tables = build_tables(question_1="Сколько всего? (Russian text contains ки)")
    summaries = run_export(tmp_path, tables, formats=["math_shepherd"])
    # Both p1 rollouts carry the tag in their question; the unlabelled p2 rollout is counted upstream.
    assert summaries["math_shepherd"]["rows"] == 1
    assert summaries["math_shepherd"]["skipped"] == {"step_tag_in_text": 2, "unlabelled_step": 1}


def test_custom_step_tag(tmp_path: Path) -> None:
    run_export(tmp_path, formats=["math_shepherd"], step_tag="<step>")
    dataset = datasets.load_from_disk(str(tmp_path / "math_shepherd"))
    validate_math_shepherd(dataset, step_tag="<step>")
    assert dataset[0]["input"].endswith("The answer is 72 <step>")


def test_dpo_rows(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, _ = exported
    dataset = load_both(out_dir, "dpo")
    validate_preference(dataset)
    assert dataset.column_names == [
        "prompt", "chosen", "rejected", "pair_id", "problem_id", "kind", "margin", "chosen_value",
        "rejected_value", "sources",
    ]
    assert dataset["pair_id"] == ["pz", "pa"]  # by problem_id first
    first = dataset[0]
    assert (first["chosen"], first["rejected"], first["kind"], first["margin"]) == (
        "24+48 = 72", "24+48 = 82", "step_dpo", 1.0,
    )
    assert dataset[1]["margin"] is None


def test_kto_rows(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, _ = exported
    dataset = load_both(out_dir, "kto")
    validate_unpaired_preference(dataset)
    assert dataset["pair_id"] == ["pz", "pz", "pa", "pa"]
    assert dataset["label"] == [True, False, True, False]
    assert dataset["completion"][:2] == ["24+48 = 72", "24+48 = 82"]
    assert {"chosen", "rejected"}.isdisjoint(dataset.column_names)


def test_bad_pairs_are_skipped(tmp_path: Path) -> None:
    tables = build_tables()
    tables["pairs"] = to_arrow(
        "pairs",
        [
            _pair("p-empty", "p1", "sibling", "Q", "", "x", None),
            _pair("p-same", "p1", "sibling", "Q", "x", "x", 0.0),
            _pair("p-good", "p1", "sibling", "Q", "x", "y", 0.5),
        ],
    )
    summaries = run_export(tmp_path, tables, formats=["dpo", "kto"])
    assert summaries["dpo"]["rows"] == 1
    assert summaries["dpo"]["skipped"] == {"empty_text": 1, "identical_sides": 1}
    assert summaries["kto"] == {**summaries["kto"], "rows": 2, "skipped": summaries["dpo"]["skipped"]}


def test_dataset_card(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, _ = exported
    card = (out_dir / "README.md").read_text(encoding="utf-8")
    for line in [
        "| `prm_stepwise` | `stepwise_supervision` | 3 | unlabelled_step: 1 |",
        "| `math_shepherd` | `math_shepherd` | 3 |",
        "| `dpo` | `preference` | 2 | none |",
        "| `kto` | `unpaired_preference` | 4 | none |",
        "| `step_kto` | `unpaired_preference` | 6 | unlabelled_step: 1 | TRL KTOTrainer",
        "| `full_step_dpo` | `preference` | 0 | missing_node: 1 | Full-Step-DPO",
        "## Progress rewards",
        "sums to `outcome - root_value`",
        "Trajectories (`prm_stepwise`, `math_shepherd` rows and `step_kto` steps) are the rollouts of origin `policy`.",
        "  data_files: step_kto.parquet",
        "  data_files: full_step_dpo.parquet",
        f"Label policy: `{POLICY}`",
        "Neutral steps (label `0`): mapped to `False`",
        "  data_files: dpo.parquet",
    ]:
        assert line in card


def test_card_configs_load_with_load_dataset(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, _ = exported
    dataset = datasets.load_dataset(str(out_dir), "kto", split="train")
    assert dataset.num_rows == 4


def test_only_requested_formats_are_written(tmp_path: Path) -> None:
    empty = {table: to_arrow(table, []) for table in ("problems", "rollouts", "nodes", "labels")}
    summaries = run_export(tmp_path, {**empty, "pairs": build_tables()["pairs"]}, formats=["dpo"], parquet=False)
    assert list(summaries) == ["dpo"]
    assert summaries["dpo"]["parquet_path"] is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "dpo"]


def test_empty_inputs_give_empty_typed_datasets(tmp_path: Path) -> None:
    tables = {table: to_arrow(table, []) for table in ("problems", "rollouts", "nodes", "labels", "pairs")}
    summaries = run_export(tmp_path, tables)
    assert {name: summary["rows"] for name, summary in summaries.items()} == dict.fromkeys(summaries, 0)
    dataset = datasets.load_from_disk(str(tmp_path / "prm_stepwise"))
    assert dataset.features["labels"].feature.dtype == "bool"


def test_conflicting_labels_for_one_node_are_refused(tmp_path: Path) -> None:
    tables = build_tables()
    extra = to_arrow(
        "labels",
        [{"node_id": "n1", "problem_id": "p1", "label": -1, "value": 0.0, "confidence": 0.9, "reason": "mc",
          "policy": "other@1"}],
    )
    tables["labels"] = pa.concat_tables([tables["labels"], extra])
    with pytest.raises(ValueError, match=r"conflicting rows for node_ids \['n1'\]"):
        run_export(tmp_path, tables, formats=["prm_stepwise"])


def test_config_needs_an_output(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one of parquet and save_to_disk"):
        ExportConfig(out_dir=tmp_path, parquet=False, save_to_disk=False)


# ---------------------------------------------------------------------------------------------
# Step-KTO, Full-Step-DPO, trajectory origins.


def test_step_kto_rows(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, _ = exported
    dataset = load_both(out_dir, "step_kto")
    validate_unpaired_preference(dataset)
    assert dataset.column_names == [
        "prompt", "completion", "label", "problem_id", "node_id", "depth", "origin", "step_label", "step_value",
        "confidence", "label_sources", "label_policy",
    ]
    # r1 = n1 n2 n4, r2 = n1 n3 (n1 shared: one row), r4 = q1 q2, r5 = q1 q3 (q3 unlabelled: skipped).
    assert dataset["node_id"] == ["n1", "n2", "n4", "n3", "q1", "q2"]
    rows = {row["node_id"]: row for row in dataset.to_list()}
    assert rows["n1"]["prompt"] == QUESTION_1 + "\n\n"
    assert rows["n2"]["prompt"] == rows["n3"]["prompt"] == QUESTION_1 + "\n\n48/2 = 24\n\n"
    assert rows["n4"]["prompt"] == QUESTION_1 + "\n\n48/2 = 24\n\n24+48 = 72\n\n"
    assert rows["n4"]["completion"] == "The answer is 72"
    assert [rows[n]["label"] for n in ("n1", "n2", "n4", "n3")] == [True, True, False, False]  # n4 neutral
    assert (rows["n4"]["step_label"], rows["n4"]["step_value"], rows["n4"]["confidence"]) == (0, 0.5, 0.3)
    assert [rows[n]["depth"] for n in ("n1", "n2", "n4", "q2")] == [1, 2, 3, 2]
    assert rows["q2"]["step_value"] is None and rows["q2"]["label"] is True
    assert {row["label_policy"] for row in rows.values()} == {POLICY}
    assert {row["origin"] for row in rows.values()} == {"policy"}
    assert {"chosen", "rejected", "value"}.isdisjoint(dataset.column_names)


def test_step_kto_includes_steps_after_the_first_wrong_step_and_drops_only_neutral_steps(tmp_path: Path) -> None:
    tables = build_tables()
    extra_node = {"node_id": "n5", "problem_id": "p1", "parent_id": "n3", "depth": 3,
                  "text": "82 - 10 = 72", "origin": "policy", "num_tokens": 5}
    extra_label = {"node_id": "n5", "problem_id": "p1", "label": 1, "value": 1.0, "confidence": 0.7,
                   "reason": "mc", "policy": POLICY}
    tables["nodes"] = pa.concat_tables([tables["nodes"], to_arrow("nodes", [extra_node])])
    tables["labels"] = pa.concat_tables([tables["labels"], to_arrow("labels", [extra_label])])
    tables["rollouts"] = pa.concat_tables(
        [tables["rollouts"], to_arrow("rollouts", [{**_rollout("r6", "p1", ["n1", "n3"], "72", True),
                                                    "node_ids": ["n1", "n3", "n5"]}])]
    )
    summaries = run_export(tmp_path, tables, formats=["step_kto"], neutral_as="drop")
    rows = {row["node_id"]: row for row in datasets.load_from_disk(str(tmp_path / "step_kto")).to_list()}
    assert set(rows) == {"n1", "n2", "n3", "n5", "q1", "q2"}
    assert rows["n5"]["label"] is True and rows["n5"]["prompt"] == QUESTION_1 + "\n\n48/2 = 24\n\n24+48 = 82\n\n"
    assert summaries["step_kto"]["skipped"] == {"neutral_step": 1, "unlabelled_step": 1}


def test_step_kto_prompt_is_the_pairs_prompt(tmp_path: Path) -> None:
    """A step's KTO prompt is the prompt of a Step-DPO pair that rejects it, under any split mode."""
    tables = build_tables()
    split = SplitConfig(mode="newline")
    problems = [Problem(**row) for row in tables["problems"].to_pylist()]
    made = [
        record for record in pairs.run(
            problems, tables["rollouts"].to_pylist(), tables["nodes"].to_pylist(), tables["labels"].to_pylist(),
            pairs.PairsConfig(split=split),
        ) if isinstance(record, Pair)
    ]
    assert [(p.prefix_node_id, p.rejected_node_id) for p in made] == [("n1", "n3")]
    run_export(tmp_path, tables, formats=["step_kto"], split=split)
    rows = {row["node_id"]: row for row in datasets.load_from_disk(str(tmp_path / "step_kto")).to_list()}
    assert rows["n3"]["prompt"] == made[0].prompt == QUESTION_1 + "\n\n48/2 = 24\n"
    assert rows["n3"]["completion"] == made[0].rejected


def test_trajectory_origins_choose_the_exported_rollouts(tmp_path: Path) -> None:
    with_mc = run_export(tmp_path / "both", formats=["prm_stepwise", "step_kto"], trajectory_origins=["policy", "mc"])
    prm = datasets.load_from_disk(str(tmp_path / "both" / "prm_stepwise"))
    assert prm["rollout_id"] == ["r1", "r2", "r3", "r4"]
    r3 = prm.to_list()[2]
    assert (r3["origin"], r3["completions"], r3["labels"]) == ("mc", ["48/2 = 24", "24*3 = 72"], [True, True])
    # The root value is still the policy solve rate; the MC completion ends correct: 0.5 -> 0.75 -> 1.0.
    assert (r3["root_value"], r3["progress"]) == (0.5, [0.25, 0.25])
    kto_nodes = datasets.load_from_disk(str(tmp_path / "both" / "step_kto"))["node_id"]
    assert "m1" in kto_nodes and kto_nodes.count("n1") == 1
    assert with_mc["step_kto"]["rows"] == 7

    run_export(tmp_path / "mc", formats=["prm_stepwise"], trajectory_origins=["mc"])
    assert datasets.load_from_disk(str(tmp_path / "mc" / "prm_stepwise"))["rollout_id"] == ["r3"]
    default = run_export(tmp_path / "default", formats=["prm_stepwise", "step_kto"])
    assert default["prm_stepwise"]["rows"] == 3 and default["step_kto"]["rows"] == 6
    with pytest.raises(ValueError):
        ExportConfig(out_dir=tmp_path, trajectory_origins=["search"])


def test_full_step_dpo_rows_from_trajectory_pairs(tmp_path: Path) -> None:
    tables = build_tables()
    problems = [Problem(**row) for row in tables["problems"].to_pylist()]
    made = list(pairs.run(
        problems, tables["rollouts"].to_pylist(), tables["nodes"].to_pylist(), tables["labels"].to_pylist(),
        pairs.PairsConfig(kinds=["step_dpo", "trajectory"]),
    ))
    assert sorted(p.kind for p in made) == ["step_dpo", "trajectory", "trajectory"]
    unvalued = {**_pair("pu", "p2", "trajectory", QUESTION_2, "2*3 = 6\n\n6+1 = 7", "2*3 = 6", None),
                "chosen_node_id": "q2", "rejected_node_id": "q1"}
    missing = {**_pair("pm", "p2", "trajectory", QUESTION_2, "a", "b", None), "chosen_node_id": "q2",
               "rejected_node_id": "gone"}
    tables["pairs"] = pa.concat_tables([to_arrow("pairs", made), to_arrow("pairs", [unvalued, missing])])
    summaries = run_export(tmp_path, tables, formats=["full_step_dpo", "dpo"])
    # p2's trajectory pair rejects r5, whose last step has no label; q2 has a label without a value.
    assert summaries["full_step_dpo"]["skipped"] == {"missing_node": 1, "unlabelled_step": 1, "unvalued_step": 1}
    assert summaries["dpo"]["rows"] == 5, "dpo keeps every pair, whatever its kind"

    dataset = load_both(tmp_path, "full_step_dpo")
    validate_preference(dataset)
    assert dataset.column_names == [
        "prompt", "chosen", "rejected", "chosen_step_rewards", "rejected_step_rewards", "chosen_steps",
        "rejected_steps", "chosen_node_id", "rejected_node_id", "pair_id", "problem_id", "kind", "margin",
        "chosen_value", "rejected_value", "sources",
    ]
    assert dataset.num_rows == 1
    row = dataset[0]
    assert (row["chosen_node_id"], row["rejected_node_id"], row["kind"]) == ("n4", "n3", "trajectory")
    assert row["prompt"] == QUESTION_1 + "\n\n"
    assert row["chosen_steps"] == ["48/2 = 24", "24+48 = 72", "The answer is 72"]
    assert row["rejected_steps"] == ["48/2 = 24", "24+48 = 82"]
    assert row["chosen"] == "\n\n".join(row["chosen_steps"]) and row["rejected"] == "\n\n".join(row["rejected_steps"])
    # Each side's rewards are its steps' label values, first step first.
    assert row["chosen_step_rewards"] == [LABELS[n][1] for n in ("n1", "n2", "n4")] == [0.75, 1.0, 0.5]
    assert row["rejected_step_rewards"] == [LABELS[n][1] for n in ("n1", "n3")] == [0.75, 0.0]
    assert row["chosen_value"] == pytest.approx(0.75) and row["rejected_value"] == pytest.approx(0.375)


def test_every_dataset_is_in_a_known_format_without_conflicting_columns() -> None:
    assert set(export.DATASET_FORMATS) == set(export.FEATURES) == set(export.DATASET_CONSUMERS)
    assert set(typing.get_args(export.ExportName)) == set(export.DATASET_FORMATS)
    assert ExportConfig(out_dir=Path("x")).formats == list(export.DATASET_FORMATS)
    for name, format_name in export.DATASET_FORMATS.items():
        columns = set(export.FEATURES[name])
        assert set(FORMAT_KEYS[format_name]) <= columns, name
        assert not columns & CONFLICTING_KEYS[format_name], name


# ---------------------------------------------------------------------------------------------
# The registry is the one place a dataset is declared.

AGENT_CONTEXT = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is 2+2?"}]
AGENT_STEPS = {  # node_id: the step's messages (an assistant turn, then what came back)
    "s0": [{"role": "assistant", "content": "I will compute it.",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"x": "2+2"}'}}]},
           {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "calc"}],
    "s1": [{"role": "assistant", "content": "Final answer: 5"}],
}


def build_agent_tables() -> dict[str, pa.Table]:
    """One agent task: a two-step policy trajectory whose first step the filter kept (with written
    reasoning) and whose wrong second step it dropped, and the agent pair that corrects that step."""
    tools = [{"type": "function", "function": {"name": "calc"}}]
    meta = {"kind": "agent", "agent": {"context": AGENT_CONTEXT, "tools": tools}}
    decision = {"rollout_id": "ra", "problem_id": "a1", "confidence": 0.9, "policy": "filter@1"}
    return {
        "problems": to_arrow("problems", [{**_problem("a1", "What is 2+2?", "4"), "meta": json.dumps(meta)}]),
        "rollouts": to_arrow(
            "rollouts", [{**_rollout("ra", "a1", [], "5", False), "node_ids": ["s0", "s1"], "text": "Final answer: 5"}]
        ),
        "nodes": to_arrow(
            "nodes",
            [{"node_id": node_id, "problem_id": "a1", "parent_id": parent, "depth": depth, "text": step_text(messages),
              "origin": "policy", "num_tokens": 5}
             for (node_id, messages), parent, depth in zip(AGENT_STEPS.items(), (None, "s0"), (1, 2))],
        ),
        "step_filter": to_arrow(
            "step_filter",
            [{**decision, "node_id": "s0", "step_index": 0, "kept": True, "reason": "kept", "label": 1, "score": 9.0},
             {**decision, "node_id": "s1", "step_index": 1, "kept": False, "reason": "label_negative", "label": -1,
              "score": 2.0}],
        ),
        "augmentations": to_arrow(
            "augmentations",
            [{"node_id": "s0", "problem_id": "a1", "reasoning": "Adding is safest with the calculator.",
              "original": "I will compute it.", "model": "writer", "generation_key": "g-aug", "cost_tokens": 7}],
        ),
        "agent_pairs": to_arrow(
            "pairs",
            [{**_pair("ap", "a1", "agent_step", json.dumps([*AGENT_CONTEXT, *AGENT_STEPS["s0"]]),
                      json.dumps({"role": "assistant", "content": "Final answer: 4"}),
                      json.dumps(AGENT_STEPS["s1"][0]), 0.9),
              "prefix_node_id": "s0", "rejected_node_id": "s1"}],
        ),
    }


def test_the_registry_is_the_single_source_of_every_dataset(tmp_path: Path) -> None:
    """Each registered dataset is in the config's description and the card, has a validator and a
    consumer, and, exported from math problems and an agent task together, gives rows its validator accepts."""
    math_tables, agent_tables = build_tables(), build_agent_tables()
    problems = [Problem(**row) for row in math_tables["problems"].to_pylist()]
    made = pairs.run(
        problems, math_tables["rollouts"].to_pylist(), math_tables["nodes"].to_pylist(),
        math_tables["labels"].to_pylist(), pairs.PairsConfig(kinds=["step_dpo", "trajectory"]),
    )
    tables = {
        "problems": pa.concat_tables([math_tables["problems"], agent_tables["problems"]]),
        "rollouts": pa.concat_tables([math_tables["rollouts"], agent_tables["rollouts"]]),
        "nodes": pa.concat_tables([math_tables["nodes"], agent_tables["nodes"]]),
        "labels": math_tables["labels"],
        "pairs": to_arrow("pairs", list(made)),  # with a trajectory pair whose steps are all in the tree
        "step_filter": agent_tables["step_filter"],
        "augmentations": agent_tables["augmentations"],
        "agent_pairs": agent_tables["agent_pairs"],
    }
    config = ExportConfig(out_dir=tmp_path)
    summaries = {summary["dataset"]: summary for summary in export.run(config, **tables)}
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    description = ExportConfig.model_fields["formats"].description

    assert list(summaries) == list(export.DATASETS) == list(typing.get_args(export.ExportName))
    for name, entry in export.DATASETS.items():
        assert entry.name == name and entry.format in VALIDATORS and entry.consumer, name
        assert f"{name}: {entry.format} {{" in description and f"for {entry.consumer}." in description, name
        assert f"| `{name}` | `{entry.format}` | {summaries[name]['rows']} |" in card, name
        assert f"- `{name}`: {entry.card}" in card, name
        assert summaries[name]["format"] == entry.format
        assert summaries[name]["rows"] > 0, f"{name}: no row to check ({summaries[name]['skipped']})"
        entry.validate(load_both(tmp_path, name), config)  # the rows as a consumer reads them back
    sft = datasets.load_from_disk(str(tmp_path / "agent_sft"))[0]
    assert sft["train_mask"] == [False, False, True, False]  # context, the kept step, its tool result
    assert sft["messages"][2]["content"].startswith("<think>\nAdding is safest")


def test_a_dataset_is_one_entry() -> None:
    """A new entry is described from what it declares; an entry whose columns do not fit its format
    fails when declared, not when a run exports it."""
    toy = ExportedDataset(
        name="toy_kto", format="unpaired_preference", features=export.KTO_FEATURES, build=lambda inputs: ([], {}),
        consumer="a toy trainer", card="nothing yet.",
    )
    registry = by_name([*export.DATASETS.values(), toy])
    assert "toy_kto: unpaired_preference {prompt, completion, label}, for a toy trainer." in describe(registry)
    with pytest.raises(ValueError, match="declared twice"):
        by_name([toy, toy])
    with pytest.raises(ValueError, match=r"features lack the preference keys \['chosen', 'rejected'\]"):
        ExportedDataset(name="bad", format="preference", features=export.KTO_FEATURES, build=toy.build,
                        consumer="x", card="x")


# ---------------------------------------------------------------------------------------------
# The exported preference data trains with TRL as is.


def _tiny_model_and_tokenizer(texts: list[str]) -> tuple[Any, Any]:
    """A randomly initialised one-layer Llama and a word-level tokenizer trained on ``texts``; no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special_tokens = ["[UNK]", "[PAD]", "[EOS]"]
    word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special_tokens))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config), tokenizer


def _texts(dataset: datasets.Dataset, columns: list[str]) -> list[str]:
    return [row[column] for row in dataset for column in columns]


def _one_training_step(kind: str, train_dataset: datasets.Dataset, out_dir: Path, text_columns: list[str]):
    """One TRL DPO or KTO step on a tiny local model; returns the trainer and its train() result.

    The reference model is passed in: left out, TRL would reload it by name from the hub.
    """
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    config_cls, trainer_cls = (DPOConfig, DPOTrainer) if kind == "dpo" else (KTOConfig, KTOTrainer)
    model, tokenizer = _tiny_model_and_tokenizer(_texts(train_dataset, text_columns))
    args = config_cls(
        output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, bf16=False, activation_checkpointing=False, logging_steps=1, save_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = trainer_cls(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    return trainer, trainer.train()


@pytest.mark.slow
def test_dpo_trainer_takes_a_step_on_exported_pairs(exported: tuple[Path, dict[str, dict]], tmp_path: Path) -> None:
    out_dir, _ = exported
    train_dataset = datasets.load_from_disk(str(out_dir / "dpo"))
    trainer, result = _one_training_step("dpo", train_dataset, tmp_path / "dpo-run", ["prompt", "chosen", "rejected"])
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
    assert math.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["kto", "step_kto"])
def test_kto_trainer_takes_a_step_on_exported_unpaired_data(
    exported: tuple[Path, dict[str, dict]], tmp_path: Path, dataset: str
) -> None:
    """Both unpaired exports train: each pair unpaired (kto) and one row per labelled step (step_kto)."""
    out_dir, _ = exported
    train_dataset = datasets.load_from_disk(str(out_dir / dataset))
    validate_unpaired_preference(train_dataset)
    trainer, result = _one_training_step("kto", train_dataset, tmp_path / f"{dataset}-run", ["prompt", "completion"])
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)


@pytest.mark.slow
def test_dpo_trainer_takes_a_step_on_full_step_dpo_rows(tmp_path: Path) -> None:
    """The per-step reward columns ride along: TRL's DPOTrainer reads the preference columns as is."""
    tables = build_tables()
    problems = [Problem(**row) for row in tables["problems"].to_pylist()]
    made = list(pairs.run(
        problems, tables["rollouts"].to_pylist(), tables["nodes"].to_pylist(), tables["labels"].to_pylist(),
        pairs.PairsConfig(kinds=["trajectory"]),
    ))
    # p2's pair is skipped (an unlabelled step); a copy of p1's gives the batch its second row.
    made.append(next(p for p in made if p.problem_id == "p1").model_copy(update={"pair_id": "copy"}))
    tables["pairs"] = to_arrow("pairs", made)
    run_export(tmp_path, tables, formats=["full_step_dpo"])
    train_dataset = datasets.load_from_disk(str(tmp_path / "full_step_dpo"))
    assert train_dataset.num_rows == 2
    trainer, result = _one_training_step(
        "dpo", train_dataset, tmp_path / "full-step-dpo-run", ["prompt", "chosen", "rejected"]
    )
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
