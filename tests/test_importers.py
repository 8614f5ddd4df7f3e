"""Importing step-labelled datasets (ProcessBench, PRM800K, Math-Shepherd) as step-tree records."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stepforge.schemas.ids import content_hash, node_id, normalize_step_text, problem_id
from stepforge.schemas.records import Evaluation, Node, Problem, Record, Reject, Rollout, to_arrow
from stepforge.stages.rollout.answers import gsm8k_gold_answer
from stepforge.stages.ingest.importers import MATH_SHEPHERD_NOTE, processbench_reference
from stepforge.stages.ingest.sources import IngestConfig, run

FIXTURES = Path(__file__).parent / "fixtures"
PROCESSBENCH = FIXTURES / "processbench_gsm8k_dev40.json"
PROCESSBENCH_GOLD = FIXTURES / "gsm8k_processbench40.jsonl"
PRM800K = FIXTURES / "prm800k_sample.jsonl"
MATH_SHEPHERD = FIXTURES / "math_shepherd_sample.jsonl"

PB_ROWS: list[dict[str, Any]] = json.loads(PROCESSBENCH.read_text())


def ingest(source: Path | str, **options: Any) -> list[Record]:
    return list(run(IngestConfig(source=str(source), **options)))


def of_type(records: list[Record], cls: type[Record]) -> list[Any]:
    return [r for r in records if isinstance(r, cls)]


def write_jsonl(path: Path, lines: list[dict[str, Any] | bytes]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines))
    return path


def reject_reasons(records: list[Record]) -> dict[int, str]:
    return {int(r.item.rsplit("#", 1)[1]): r.reason for r in of_type(records, Reject)}


def assert_valid_records(records: list[Record]) -> None:
    """Every record round-trips through its pydantic model and its table's Arrow schema; ids are unique."""
    by_table: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        type(record).model_validate(record.model_dump())
        by_table[record.TABLE].append(record)
    for table, rows in by_table.items():
        assert to_arrow(table, rows).num_rows == len(rows)
    for cls, key in ((Problem, "problem_id"), (Node, "node_id"), (Rollout, "rollout_id"), (Evaluation, "evaluation_id")):
        ids = [getattr(r, key) for r in of_type(records, cls)]
        assert len(ids) == len(set(ids)), f"duplicate {key}"
    nodes = {n.node_id: n for n in of_type(records, Node)}
    for rollout in of_type(records, Rollout):
        assert all(nid in nodes for nid in rollout.node_ids)
        parents = [None, *rollout.node_ids[:-1]]
        assert [nodes[nid].parent_id for nid in rollout.node_ids] == parents
        assert [nodes[nid].depth for nid in rollout.node_ids] == list(range(1, len(rollout.node_ids) + 1))
    for evaluation in of_type(records, Evaluation):
        assert evaluation.node_id in nodes


def path_verdicts(records: list[Record], rollout: Rollout) -> list[int | None]:
    human = {e.node_id: e.verdict for e in of_type(records, Evaluation) if e.source == "human"}
    return [human.get(nid) for nid in rollout.node_ids]


# -- ProcessBench -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processbench() -> list[Record]:
    return ingest(PROCESSBENCH, format="processbench", gold_source=str(PROCESSBENCH_GOLD))


def test_processbench_all_rows_import_with_gold_joined(processbench: list[Record]) -> None:
    assert not of_type(processbench, Reject)
    problems, rollouts = of_type(processbench, Problem), of_type(processbench, Rollout)
    assert len(problems) == len(rollouts) == 40
    gsm8k = {
        normalize_step_text(row["question"]): gsm8k_gold_answer(row["answer"])
        for row in map(json.loads, PROCESSBENCH_GOLD.read_text().splitlines())
    }
    joined = [p for p in problems if json.loads(p.meta)["gold_from"] == "gold_source"]
    assert len(joined) == 40  # every one of the 40 questions is in the GSM8K test rows
    for problem, row in zip(problems, PB_ROWS):
        assert problem.question == row["problem"]
        assert problem.gold_answer == gsm8k[normalize_step_text(row["problem"])]
        assert problem.problem_id == problem_id(row["problem"], problem.gold_answer)
        assert problem.gold_solution is not None and "\n#### " in problem.gold_solution
        assert json.loads(problem.meta) == {
            "id": row["id"], "generator": row["generator"], "imported": "processbench", "gold_from": "gold_source"
        }
    assert problems[0].gold_answer == "24" and problems[0].source_index == 0
    assert_valid_records(processbench)


def test_processbench_problems_match_an_ingest_of_the_gold_file(processbench: list[Record]) -> None:
    # The same question and gold give the same problem_id, so imported trajectories hang under our own problems.
    ours = {p.problem_id for p in ingest(PROCESSBENCH_GOLD, format="gsm8k") if isinstance(p, Problem)}
    assert {p.problem_id for p in of_type(processbench, Problem)} == ours


def test_processbench_paths_are_the_steps(processbench: list[Record]) -> None:
    nodes = {n.node_id: n for n in of_type(processbench, Node)}
    rollouts = of_type(processbench, Rollout)
    assert len(nodes) == sum(len(row["steps"]) for row in PB_ROWS)  # 40 different questions: nothing shared
    for rollout, row in zip(rollouts, PB_ROWS):
        steps = [s.strip() for s in row["steps"]]
        assert [nodes[nid].text for nid in rollout.node_ids] == steps
        assert rollout.text == "\n\n".join(steps)
        assert rollout.rollout_id == content_hash("import", "processbench", rollout.problem_id, row["id"])
        assert rollout.node_ids[0] == node_id(rollout.problem_id, None, steps[0])
        assert (rollout.outcome, rollout.outcome_reason) == (
            row["final_answer_correct"], "correct" if row["final_answer_correct"] else "wrong"
        )
        assert (rollout.origin, rollout.prefix_node_id, rollout.sample_index) == ("policy", None, 0)
        assert (rollout.finish_reason, rollout.num_tokens) == ("stop", 0)
        assert rollout.model == f"import:processbench:{row['generator']}"
        assert rollout.generation_key == content_hash("import-row", row)
    assert all(n.origin == "policy" and n.num_tokens == 0 for n in nodes.values())
    assert rollouts[0].final_answer == "30"  # gsm8k-0's own (wrong) boxed answer


def test_processbench_reference_round_trip(processbench: list[Record]) -> None:
    evaluations = of_type(processbench, Evaluation)
    assert len(evaluations) == sum(len(r["steps"]) if r["label"] == -1 else r["label"] + 1 for r in PB_ROWS)
    for rollout, row in zip(of_type(processbench, Rollout), PB_ROWS):
        verdicts = path_verdicts(processbench, rollout)
        assert processbench_reference(verdicts) == row["label"]
        if row["label"] >= 0:
            assert verdicts[row["label"] + 1 :] == [None] * (len(row["steps"]) - row["label"] - 1)  # not labelled
    for evaluation in evaluations:
        assert (evaluation.source, evaluation.n, evaluation.value, evaluation.confidence, evaluation.model) == (
            "human", 1, None, None, None
        )
        assert evaluation.successes == (1 if evaluation.verdict == 1 else 0)
        assert json.loads(evaluation.meta)["imported"] == "processbench"
    # 21 rows have an error, one of them (gsm8k-290) with a correct final answer.
    assert Counter(e.verdict for e in evaluations) == {1: 137, -1: 21}


def test_processbench_reference_helper() -> None:
    assert processbench_reference([]) == -1
    assert processbench_reference([1, 1, 1]) == -1
    assert processbench_reference([1, -1, None]) == 1
    assert processbench_reference([-1, None]) == 0
    assert processbench_reference([1, 0, -1, -1]) == 2


def test_processbench_without_gold_source() -> None:
    records = ingest(PROCESSBENCH, format="processbench")
    rejects = of_type(records, Reject)
    wrong = [i for i, row in enumerate(PB_ROWS) if not row["final_answer_correct"]]
    assert sorted(reject_reasons(records)) == wrong and {r.reason for r in rejects} == {"no_gold_answer"}
    assert len(rejects) == 20
    assert "'final_answer_correct'" in rejects[0].detail
    problems = of_type(records, Problem)
    assert len(problems) == len(of_type(records, Rollout)) == 20
    gold = {json.loads(p.meta)["id"]: p.gold_answer for p in problems}
    # The solution's own final answer: its box / "the answer is", else the last step's last number.
    assert (gold["gsm8k-210"], gold["gsm8k-220"], gold["gsm8k-350"]) == ("336", "20%", "$400")
    assert (gold["gsm8k-200"], gold["gsm8k-290"]) == ("20", "40")
    assert all(json.loads(p.meta)["gold_from"] == "marked_correct" for p in problems)
    assert_valid_records(records)


def test_processbench_rows_of_one_question_share_one_problem(tmp_path: Path) -> None:
    wrong, right = PB_ROWS[0], PB_ROWS[20]
    # Another generator's solution of each question; the wrong one's twin comes first and is right.
    twin_of_wrong = {**right, "id": "twin-a", "problem": wrong["problem"], "generator": "Other-7B"}
    twin_of_right = {**wrong, "id": "twin-b", "problem": right["problem"], "generator": "Other-7B"}
    source = write_jsonl(tmp_path / "pb.jsonl", [wrong, right, twin_of_wrong, twin_of_right])
    for options in ({}, {"gold_source": str(PROCESSBENCH_GOLD)}):
        records = ingest(source, format="processbench", **options)
        assert not of_type(records, Reject)
        problems, rollouts = of_type(records, Problem), of_type(records, Rollout)
        assert [p.source_index for p in problems] == [0, 1]
        assert [(r.problem_id, r.sample_index) for r in rollouts] == [
            (problems[0].problem_id, 0), (problems[1].problem_id, 0), (problems[0].problem_id, 1), (problems[1].problem_id, 1)
        ]
        assert rollouts[2].model == "import:processbench:Other-7B"
        assert len(of_type(records, Node)) == sum(len(r["steps"]) for r in (wrong, right, wrong, right))
        assert_valid_records(records)
    # Without gold_source, row 0 (marked wrong) takes its gold from the later row of its question marked right.
    gold = of_type(ingest(source, format="processbench"), Problem)[0]
    assert (gold.gold_answer, json.loads(gold.meta)["gold_from"]) == ("20", "marked_correct")


def path_verdicts_for(records: list[Record], rollout: Rollout) -> list[int | None]:
    """The verdicts of the row 'other' along its rollout (a shared node also has the other row's)."""
    mine = {e.node_id: e.verdict for e in of_type(records, Evaluation) if json.loads(e.meta)["row"] == "other"}
    return [mine.get(nid) for nid in rollout.node_ids]


def test_processbench_shared_prefix_is_one_node(tmp_path: Path) -> None:
    row = PB_ROWS[20]
    other = {**row, "id": "other", "steps": [*row["steps"][:2], "A different ending: the answer is 7."],
             "final_answer_correct": False, "label": 2}
    records = ingest(write_jsonl(tmp_path / "pb.jsonl", [row, other]), format="processbench",
                     gold_source=str(PROCESSBENCH_GOLD))
    first, second = of_type(records, Rollout)
    assert second.node_ids[:2] == first.node_ids[:2] and second.node_ids[2] not in first.node_ids
    assert len(of_type(records, Node)) == len(row["steps"]) + 1
    # Each rollout keeps its own evaluations of the shared steps.
    assert processbench_reference(path_verdicts_for(records, second)) == 2
    assert_valid_records(records)


GOOD_PB = PB_ROWS[25]
BAD_PB: list[tuple[dict[str, Any] | bytes, str | None, str]] = [
    (GOOD_PB, None, ""),
    ({k: v for k, v in GOOD_PB.items() if k != "steps"}, "missing_field", "'steps'"),
    ({k: v for k, v in GOOD_PB.items() if k != "problem"}, "missing_field", "'problem'"),
    ({k: v for k, v in GOOD_PB.items() if k != "final_answer_correct"}, "missing_field", "'final_answer_correct'"),
    ({**GOOD_PB, "id": "b1", "steps": "one long step"}, "wrong_type", "'steps'"),
    ({**GOOD_PB, "id": "b2", "steps": ["fine", 3]}, "wrong_type", "'steps[1]'"),
    ({**GOOD_PB, "id": "b3", "label": "1"}, "wrong_type", "'label'"),
    ({**GOOD_PB, "id": "b4", "label": True}, "wrong_type", "'label'"),
    ({**GOOD_PB, "id": "b5", "final_answer_correct": "yes"}, "wrong_type", "'final_answer_correct'"),
    ({**GOOD_PB, "id": "b6", "steps": []}, "empty_steps", "'steps'"),
    ({**GOOD_PB, "id": "b7", "steps": ["fine", "   "]}, "empty_step", "'steps[1]'"),
    ({**GOOD_PB, "id": "b8", "label": 7}, "label_out_of_range", "'label'"),
    ({**GOOD_PB, "id": "b9", "label": -2}, "label_out_of_range", "'label'"),
    ({**GOOD_PB, "id": "b10", "problem": "  "}, "empty_text", "'problem'"),
    (b'{"id": "b11", "problem": "What is 2 + 2?", "steps": [', "invalid_json", ""),
    (b'["not", "an", "object"]', "not_an_object", ""),
    (GOOD_PB, "duplicate_row", "row 0"),
    ({**PB_ROWS[0], "id": "b12"}, "no_gold_answer", "'final_answer_correct'"),
    ({**PB_ROWS[21], "id": "good-2"}, None, ""),
]


def test_malformed_processbench_rows(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "pb.jsonl", [line for line, _, _ in BAD_PB])
    records = ingest(source, format="processbench")
    rejects = {int(r.item.rsplit("#", 1)[1]): r for r in of_type(records, Reject)}
    for index, (_, reason, field) in enumerate(BAD_PB):
        if reason is None:
            assert index not in rejects
        else:
            assert (rejects[index].reason, rejects[index].stage) == (reason, "ingest"), index
            assert field in rejects[index].detail, (index, rejects[index].detail)
    assert len(rejects) == len(BAD_PB) - 2  # one reject per bad row
    assert [p.source_index for p in of_type(records, Problem)] == [0, len(BAD_PB) - 1]
    assert len(of_type(records, Rollout)) == 2
    assert_valid_records(records)


# -- PRM800K ----------------------------------------------------------------------------------------
PRM_LINES = PRM800K.read_text().splitlines()


@pytest.fixture(scope="module")
def prm800k() -> list[Record]:
    return ingest(PRM800K, format="prm800k")


def prm_row(index: int) -> dict[str, Any]:
    return json.loads(PRM_LINES[index])


def test_prm800k_rejects(prm800k: list[Record]) -> None:
    assert reject_reasons(prm800k) == {
        3: "quality_control", 4: "empty_steps", 5: "label_out_of_range", 6: "invalid_json", 7: "missing_field",
        8: "wrong_type",
    }
    details = {int(r.item.rsplit("#", 1)[1]): r.detail for r in of_type(prm800k, Reject)}
    assert "'label.steps'" in details[4]
    assert "'label.steps[0].completions[0].rating'" in details[5]
    assert "'question'" in details[7]
    assert "'label.steps[0].chosen_completion'" in details[8]
    assert_valid_records(prm800k)


def test_prm800k_problems(prm800k: list[Record]) -> None:
    odd, divisors = of_type(prm800k, Problem)
    assert (odd.gold_answer, odd.source_index, divisors.gold_answer, divisors.source_index) == ("25", 0, "9", 2)
    assert odd.gold_solution == prm_row(0)["question"]["ground_truth_solution"]
    assert json.loads(odd.meta) == {"imported": "prm800k", "gold_from": "dataset"}
    assert odd.problem_id == problem_id(prm_row(0)["question"]["problem"], "25")


def test_prm800k_tree(prm800k: list[Record]) -> None:
    nodes = {n.node_id: n for n in of_type(prm800k, Node)}
    by_text = {n.text: n for n in nodes.values()}
    evaluations = of_type(prm800k, Evaluation)
    tree, phase2, human = of_type(prm800k, Rollout)
    row = prm_row(0)
    steps = row["label"]["steps"]

    # Siblings: every completion of a step is a node under the path's node so far.
    for step_index, step in enumerate(steps):
        parent = None if step_index == 0 else tree.node_ids[step_index - 1]
        for completion in step["completions"]:
            node = by_text[completion["text"].strip()]
            assert (node.parent_id, node.depth, node.origin, node.num_tokens) == (parent, step_index + 1, "policy", 0)
    # The chosen path is the rollout.
    chosen = [s["completions"][s["chosen_completion"]]["text"] for s in steps]
    assert [nodes[nid].text for nid in tree.node_ids] == chosen
    assert tree.text == "\n\n".join(chosen)
    assert (tree.final_answer, tree.outcome, tree.outcome_reason) == ("25", True, "correct")  # finish 'solution'
    assert (tree.model, tree.sample_index, phase2.sample_index, human.sample_index) == ("import:prm800k", 0, 1, 0)

    # Ratings are verdicts, 0 included; every rated completion of the row has one human evaluation.
    mine = [e for e in evaluations if e.evaluation_id in {
        content_hash("import-eval", "prm800k", tree.rollout_id, s, c) for s in range(3) for c in range(3)
    }]
    assert [(nodes[e.node_id].text, e.verdict, e.successes) for e in mine] == [
        (c["text"].strip(), c["rating"], int(c["rating"] == 1)) for s in steps for c in s["completions"]
    ]
    assert {(e.source, e.n, e.value) for e in evaluations} == {("human", 1, None)}
    assert json.loads(mine[0].meta) == {"imported": "prm800k", "labeler": row["labeler"], "flagged": False}

    # Phase 2 row: shares the first step (one node), path ends before the error, the null rating has no evaluation.
    assert phase2.node_ids == tree.node_ids[:1]
    assert (phase2.outcome, phase2.outcome_reason) == (None, "unchecked")
    unrated = by_text[prm_row(1)["label"]["steps"][1]["completions"][1]["text"]]
    assert unrated.parent_id == tree.node_ids[0]
    assert not [e for e in evaluations if e.node_id == unrated.node_id]
    error_node = by_text[prm_row(1)["label"]["steps"][1]["completions"][0]["text"]]
    assert sorted(e.verdict for e in evaluations if e.node_id == error_node.node_id) == [-1, -1]  # two labelers
    assert Counter(e.node_id for e in evaluations)[tree.node_ids[0]] == 2

    # Human completion: on the path, labelled +1; the give-up step's completion is a leaf sibling rated 0.
    human_steps = prm_row(2)["label"]["steps"]
    written = by_text[human_steps[1]["human_completion"]["text"]]
    assert human.node_ids == [by_text[human_steps[0]["completions"][0]["text"]].node_id, written.node_id]
    (written_eval,) = [e for e in evaluations if e.node_id == written.node_id]
    assert (written_eval.verdict, written_eval.successes) == (1, 1)
    assert json.loads(written_eval.meta)["human_completion"] is True
    gave_up_at = by_text[human_steps[2]["completions"][0]["text"]]
    assert gave_up_at.parent_id == written.node_id and gave_up_at.node_id not in human.node_ids
    (neutral,) = [e for e in evaluations if e.node_id == gave_up_at.node_id]
    assert (neutral.verdict, neutral.successes, json.loads(neutral.meta)["flagged"]) == (0, 0, True)
    assert (human.final_answer, human.outcome) == (None, None)

    assert len(nodes) == 12 and len(evaluations) == 13
    assert Counter(e.verdict for e in evaluations) == {1: 6, -1: 5, 0: 2}


def prm_step(*completions: tuple[str, Any], chosen: Any = 0, human: Any = None) -> dict[str, Any]:
    return {"completions": [{"text": t, "rating": r, "flagged": None} for t, r in completions],
            "human_completion": human, "chosen_completion": chosen}


def prm_line(steps: list[dict[str, Any]], problem: str = "What is $6 + 7$?", **extra: Any) -> dict[str, Any]:
    return {"labeler": "l-1", "timestamp": f"t-{len(steps)}-{problem}", "generation": None,
            "is_quality_control_question": False, "is_initial_screening_question": False,
            "question": {"problem": problem, "ground_truth_answer": "13"},
            "label": {"steps": steps, "total_time": 100, "finish_reason": "solution"}, **extra}


def test_malformed_prm800k_rows(tmp_path: Path) -> None:
    good = prm_line([prm_step(("$6 + 7 = 13$.", 1))])
    lines: list[tuple[dict[str, Any] | bytes, str | None]] = [
        (good, None),
        (prm_line([prm_step(("$6 + 7 = 13$.", 1), chosen=3)], "A"), "label_out_of_range"),
        (prm_line([prm_step(("x", -1), chosen=None), prm_step(("y", 1))], "B"), "broken_path"),
        (prm_line([{"completions": ["just text"], "chosen_completion": 0}], "C"), "wrong_type"),
        (prm_line([prm_step(("x", 1), human=7)], "D"), "wrong_type"),
        (prm_line([prm_step(("x", True))], "E"), "wrong_type"),
        (prm_line([prm_step(("  ", 1))], "F"), "empty_step"),
        (prm_line([prm_step(chosen=None)], "G"), "empty_steps"),
        (prm_line([prm_step(("x", None), chosen=None)], "H"), "nothing_to_import"),
        (prm_line([prm_step(("x", 1))], "I", is_initial_screening_question=True), "initial_screening"),
        ({**prm_line([prm_step(("x", 1))], "J"), "label": None}, "missing_field"),
        ({**prm_line([prm_step(("x", 1))], "K"), "question": "What is 1 + 1?"}, "wrong_type"),
        (b"{not json", "invalid_json"),
        (good, "duplicate_row"),
        (prm_line([prm_step(("$6 + 7 = 13$.", 1)), prm_step(("# Answer\n\n13", 1))]), None),
    ]
    records = ingest(write_jsonl(tmp_path / "prm.jsonl", [line for line, _ in lines]), format="prm800k")
    assert reject_reasons(records) == {i: reason for i, (_, reason) in enumerate(lines) if reason is not None}
    rollouts = of_type(records, Rollout)
    assert len(of_type(records, Problem)) == 1 and [r.sample_index for r in rollouts] == [0, 1]
    assert rollouts[1].node_ids[0] == rollouts[0].node_ids[0]
    assert_valid_records(records)


def test_prm800k_first_step_error_gives_labels_without_a_rollout(tmp_path: Path) -> None:
    line = prm_line([prm_step(("$6 + 7 = 12$.", -1), ("$6 + 7 = 14$.", -1), chosen=None)])
    records = ingest(write_jsonl(tmp_path / "prm.jsonl", [line]), format="prm800k")
    assert [type(r).__name__ for r in records] == ["Problem", "Node", "Node", "Evaluation", "Evaluation"]
    assert {n.parent_id for n in of_type(records, Node)} == {None}


def test_prm800k_missing_ground_truth_falls_back(tmp_path: Path) -> None:
    solved = prm_line([prm_step(("$6 + 7 = 13$.", 1)), prm_step(("# Answer\n\n13", 1))])
    del solved["question"]["ground_truth_answer"]
    unsolved = {**prm_line([prm_step(("$6 + 7 = 13$.", 1))], "What is $8 + 8$?")}
    del unsolved["question"]["ground_truth_answer"]
    unsolved["label"]["finish_reason"] = "give_up"
    records = ingest(write_jsonl(tmp_path / "prm.jsonl", [solved, unsolved]), format="prm800k")
    (problem,) = of_type(records, Problem)
    assert (problem.gold_answer, json.loads(problem.meta)["gold_from"]) == ("13", "marked_correct")
    assert reject_reasons(records) == {1: "no_gold_answer"}


# -- Math-Shepherd --------------------------------------------------------------------------------
MS_ROWS = [json.loads(line) for line in MATH_SHEPHERD.read_text().splitlines()]


def test_math_shepherd(tmp_path: Path) -> None:
    records = ingest(MATH_SHEPHERD, format="math_shepherd")
    assert reject_reasons(records) == {3: "no_gold_answer", 4: "label_mismatch", 5: "label_mismatch"}
    problems, rollouts = of_type(records, Problem), of_type(records, Rollout)
    nodes = {n.node_id: n for n in of_type(records, Node)}
    evaluations = of_type(records, Evaluation)
    apples, powers = problems
    assert apples.question == MS_ROWS[0]["input"][: MS_ROWS[0]["input"].index(" Step 1:")]
    assert (apples.gold_answer, powers.gold_answer) == ("9", "17")
    assert json.loads(apples.meta) == {"task": "GSM8K", "imported": "math_shepherd", "gold_from": "marked_correct"}
    assert [(r.problem_id, r.sample_index) for r in rollouts] == [
        (apples.problem_id, 0), (apples.problem_id, 1), (powers.problem_id, 0)
    ]
    first_steps = [nodes[nid].text for nid in rollouts[0].node_ids]
    assert first_steps == [
        "Step 1: Tom starts with 5 apples and buys 7 more, so he has 5 + 7 = <<5+7=12>>12 apples.",
        "Step 2: He gives 3 apples to his sister, so he has 12 - 3 = <<12-3=9>>9 apples left. The answer is: 9",
    ]
    assert rollouts[1].node_ids[0] == rollouts[0].node_ids[0] and len(nodes) == 5  # shared first step
    assert [r.final_answer for r in rollouts] == ["9", "8", "17"]
    assert {(r.outcome, r.outcome_reason, r.model) for r in rollouts} == {(None, "unchecked", "import:math_shepherd")}
    verdicts = [[e.verdict for e in evaluations if e.evaluation_id in {
        content_hash("import-eval", "math_shepherd", r.rollout_id, i) for i in range(len(r.node_ids))}] for r in rollouts]
    assert verdicts == [[1, 1], [1, -1], [1, 1]]
    for evaluation in evaluations:
        assert (evaluation.source, evaluation.n, evaluation.model) == ("mc", 1, None)
        assert (evaluation.value, evaluation.successes) == ((1.0, 1) if evaluation.verdict == 1 else (0.0, 0))
        assert json.loads(evaluation.meta) == {"imported": "math_shepherd", "note": MATH_SHEPHERD_NOTE}
    assert "'label'" in of_type(records, Reject)[1].detail
    assert_valid_records(records)


def test_math_shepherd_with_gold_source(tmp_path: Path) -> None:
    pens = MS_ROWS[3]["input"][: MS_ROWS[3]["input"].index(" Step 1:")]
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"question": pens, "answer": "6 + 2 * 3 = 12\n#### 12"}])
    records = ingest(MATH_SHEPHERD, format="math_shepherd", gold_source=str(gold))
    assert reject_reasons(records) == {4: "label_mismatch", 5: "label_mismatch"}
    by_question = {p.question: p for p in of_type(records, Problem)}
    assert by_question[pens].gold_answer == "12"
    assert json.loads(by_question[pens].meta)["gold_from"] == "gold_source"
    assert json.loads(next(iter(by_question.values())).meta)["gold_from"] == "marked_correct"  # not in the gold file
    assert_valid_records(records)


def ms_row(steps: str, labels: str, question: str = "What is $3 \\cdot 3$?") -> dict[str, Any]:
    return {"input": f"{question} {steps}", "label": f"{question} {labels}", "task": "MATH"}


def test_malformed_math_shepherd_rows(tmp_path: Path) -> None:
    lines: list[tuple[dict[str, Any] | bytes, str | None]] = [
        (ms_row("Step 1: $3 \\cdot 3 = 9$. The answer is: 9 ки", "Step 1: $3 \\cdot 3 = 9$. The answer is: 9 +"), None),
        ({"label": "x +"}, "missing_field"),
        ({"input": "Q Step 1: a ки", "label": 3}, "wrong_type"),
        ({"input": "Q Step 1: a ки", "label": "Q Step 1: a +", "task": 1}, "wrong_type"),
        (ms_row("First, a ки", "First, a +"), "unparseable_row"),
        (ms_row("Step 1: a", "Step 1: a"), "empty_steps"),
        (ms_row("Step 1: a ки trailing words", "Step 1: a + trailing words"), "unparseable_row"),
        (ms_row("Step 1: a ки ки", "Step 1: a + +"), "empty_step"),
        (ms_row("Step 1: a ки", "Step 1: a *"), "label_mismatch"),
        (ms_row("Step 1: a ки", "Step 1: a + and more"), "label_mismatch"),
        (ms_row("Step 1: a ки\nStep 2: b ки", "Step 1: a ки\nStep 2: b +"), "label_mismatch"),
        ({"input": "Step 1: a ки", "label": "Step 1: a +"}, "empty_text"),
        (b'{"input": "broken', "invalid_json"),
        (ms_row("Step 1: $3 \\cdot 3 = 6$. The answer is: 6 ки", "Step 1: $3 \\cdot 3 = 6$. The answer is: 6 -"), None),
    ]
    records = ingest(write_jsonl(tmp_path / "ms.jsonl", [line for line, _ in lines]), format="math_shepherd")
    assert reject_reasons(records) == {i: reason for i, (_, reason) in enumerate(lines) if reason is not None}
    assert [r.final_answer for r in of_type(records, Rollout)] == ["9", "6"]
    assert len(of_type(records, Problem)) == 1
    assert_valid_records(records)


# -- config and stage behaviour ---------------------------------------------------------------------
def test_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="gold_source"):
        IngestConfig(source="x.jsonl", format="gsm8k", gold_source="gold.jsonl")
    with pytest.raises(ValidationError, match="question_field"):
        IngestConfig(source="x.jsonl", format="processbench", question_field="q")
    with pytest.raises(FileNotFoundError):
        run(IngestConfig(source=str(PROCESSBENCH), format="processbench", gold_source=str(tmp_path / "absent.jsonl")))
    with pytest.raises(FileNotFoundError):
        run(IngestConfig(source=str(tmp_path / "absent.json"), format="processbench"))


def test_ambiguous_gold_source(tmp_path: Path) -> None:
    question = PB_ROWS[20]["problem"]
    gold = write_jsonl(tmp_path / "gold.jsonl", [
        {"question": question, "answer": "#### 13"}, {"question": question + " ", "answer": "#### 14"}
    ])
    source = write_jsonl(tmp_path / "pb.jsonl", [PB_ROWS[20]])
    assert reject_reasons(ingest(source, format="processbench", gold_source=str(gold))) == {0: "ambiguous_gold"}


def test_imports_are_deterministic_and_windowed(processbench: list[Record]) -> None:
    again = ingest(PROCESSBENCH, format="processbench", gold_source=str(PROCESSBENCH_GOLD))
    assert [r.model_dump() for r in again] == [r.model_dump() for r in processbench]
    window = ingest(PROCESSBENCH, format="processbench", gold_source=str(PROCESSBENCH_GOLD), offset=5, limit=3)
    assert [p.source_index for p in of_type(window, Problem)] == [5, 6, 7]
    assert {r.rollout_id for r in of_type(window, Rollout)} <= {r.rollout_id for r in of_type(processbench, Rollout)}


def test_text_too_long_applies_to_imports() -> None:
    records = ingest(PROCESSBENCH, format="processbench", gold_source=str(PROCESSBENCH_GOLD), max_question_chars=200)
    long_rows = {i for i, row in enumerate(PB_ROWS) if len(row["problem"]) > 200}
    assert long_rows and set(reject_reasons(records)) == long_rows
    assert set(reject_reasons(records).values()) == {"text_too_long"}


def test_parquet_source_gives_the_same_records(tmp_path: Path, prm800k: list[Record]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [prm_row(i) for i in range(3)]  # the good rows; Parquet fills the fields a row lacks with nulls
    source = tmp_path / "prm.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    records = ingest(source, format="prm800k")
    assert not of_type(records, Reject)
    for cls in (Rollout, Node, Evaluation):
        ids = {r.model_dump()[cls.ARROW_SCHEMA.names[0]] for r in of_type(records, cls)}
        assert ids == {r.model_dump()[cls.ARROW_SCHEMA.names[0]] for r in of_type(prm800k, cls)}
