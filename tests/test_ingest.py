"""The ingest stage on real GSM8K / MATH-500 rows and on a file full of broken ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepforge.schemas.ids import problem_id
from stepforge.schemas.records import Problem, Reject
from stepforge.stages.ingest.sources import IngestConfig, run

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_SAMPLE = FIXTURES / "gsm8k_sample.jsonl"
MATH500_SAMPLE = FIXTURES / "math500_sample.jsonl"
GSM8K_DEMO = Path(__file__).parents[1] / "flows" / "data" / "gsm8k_demo.jsonl"

GSM8K_SAMPLE_GOLD = ["45", "460", "366", "694", "13", "18", "60", "125", "230", "57500", "7", "6"]
MATH500_SAMPLE_GOLD = [r"\left( 3, \frac{\pi}{2} \right)", r"\frac{14}{3}", r"\text{Evelyn}", "42", "6 - 5i", "1,-2"]


def ingest(source: Path | str, **options: object) -> list[Problem | Reject]:
    return list(run(IngestConfig(source=str(source), **options)))


def test_gsm8k_fixture() -> None:
    records = ingest(GSM8K_SAMPLE)
    assert all(isinstance(r, Problem) for r in records)
    assert [r.gold_answer for r in records] == GSM8K_SAMPLE_GOLD
    assert [r.source_index for r in records] == list(range(12))
    first_row = json.loads(GSM8K_SAMPLE.read_text().splitlines()[0])
    first = records[0]
    assert first.question == first_row["question"]
    assert first.gold_solution == first_row["answer"]
    assert first.problem_id == problem_id(first_row["question"], "45")
    assert first.source == str(GSM8K_SAMPLE)
    assert first.meta == "{}"


def test_gsm8k_demo_data() -> None:
    records = ingest(GSM8K_DEMO, format="gsm8k")
    # Bundled in the order 2, 4, 1, 3, 5, 6, 7, 8 of the GSM8K test set (see flows/data/README.md).
    assert [r.gold_answer for r in records] == ["3", "540", "18", "70000", "20", "64", "260", "160"]


def test_math500_fixture() -> None:
    records = ingest(MATH500_SAMPLE)
    assert all(isinstance(r, Problem) for r in records)
    assert [r.gold_answer for r in records] == MATH500_SAMPLE_GOLD
    first_row = json.loads(MATH500_SAMPLE.read_text().splitlines()[0])
    assert records[0].question == first_row["problem"]
    assert records[0].gold_solution == first_row["solution"]
    assert json.loads(records[0].meta) == {"subject": "Precalculus", "level": 2}


def test_math_gold_falls_back_to_the_solutions_last_box(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in MATH500_SAMPLE.read_text().splitlines()]
    for row in rows:
        del row["answer"]
    source = tmp_path / "math_no_answer.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [r.gold_answer for r in ingest(source)] == MATH500_SAMPLE_GOLD


GOOD_GSM8K = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
GOOD_MATH = {"problem": "Compute $1/2 + 1/4$.", "solution": r"It is $\boxed{\frac34}$.", "answer": r"\frac34"}

# (raw line, expected reason or None for a good row)
BAD_AND_GOOD_LINES: list[tuple[bytes, str | None]] = [
    (json.dumps(GOOD_GSM8K).encode(), None),
    (json.dumps({"answer": "#### 4"}).encode(), "missing_field"),
    (json.dumps({"question": "What is 2 + 2?"}).encode(), "missing_field"),
    (json.dumps({"question": None, "answer": "#### 4"}).encode(), "missing_field"),
    (json.dumps({"problem": "Compute 1 + 1.", "level": 1}).encode(), "missing_field"),
    (json.dumps({"question": 123, "answer": "#### 4"}).encode(), "wrong_type"),
    (json.dumps({"question": "What is 2 + 2?", "answer": [1]}).encode(), "wrong_type"),
    (json.dumps({"problem": "Compute 1 + 1.", "answer": {"value": 2}}).encode(), "wrong_type"),
    (json.dumps({"question": "   ", "answer": "#### 4"}).encode(), "empty_text"),
    (json.dumps({"question": "x" * 1_000_000, "answer": "#### 4"}).encode(), "text_too_long"),
    (json.dumps({"question": "What is 3 + 3?", "answer": "3 + 3 = 6"}).encode(), "no_gold_answer"),
    (json.dumps({"problem": "Compute 1 + 1.", "solution": "It is two."}).encode(), "no_gold_answer"),
    (b'{"question": "caf\xff\xfe", "answer": "#### 1"}', "invalid_utf8"),
    (b"\xff\xfe", "invalid_utf8"),
    (b'{"question": "What is 2 + 2?", "answer": ', "invalid_json"),
    (b"this is not json", "invalid_json"),
    (b'["What is 2 + 2?", "#### 4"]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (json.dumps(GOOD_MATH).encode(), None),
    (json.dumps(GOOD_GSM8K).encode(), "duplicate_problem"),
    (json.dumps({**GOOD_GSM8K, "answer": "2 + 2 = 5\n#### 5"}).encode(), None),  # same question, other gold
    (json.dumps({"question": "Café au lait: 1 + 1?", "answer": "#### 2", "id": 7, "tags": ["x"]}).encode(), None),
]


@pytest.fixture
def messy_jsonl(tmp_path: Path) -> Path:
    source = tmp_path / "messy.jsonl"
    source.write_bytes(b"\n".join(line for line, _ in BAD_AND_GOOD_LINES) + b"\n\n")
    return source


def test_every_bad_row_is_a_reject_with_its_reason(messy_jsonl: Path) -> None:
    records = ingest(messy_jsonl)
    assert len(records) == len(BAD_AND_GOOD_LINES)
    for row_index, (record, (_, expected_reason)) in enumerate(zip(records, BAD_AND_GOOD_LINES)):
        if expected_reason is None:
            assert isinstance(record, Problem), record
            assert record.source_index == row_index
        else:
            assert isinstance(record, Reject), record
            assert (record.reason, record.stage, record.item) == (expected_reason, "ingest", f"{messy_jsonl}#{row_index}")
            assert record.payload is not None and len(record.payload) <= 2000
    reasons = Counter(r.reason for r in records if isinstance(r, Reject))
    assert sum(isinstance(r, Problem) for r in records) == 4
    assert reasons == {
        "missing_field": 4, "wrong_type": 3, "empty_text": 1, "text_too_long": 1, "no_gold_answer": 2,
        "invalid_utf8": 2, "invalid_json": 2, "not_an_object": 2, "duplicate_problem": 1,
    }


def test_reject_details_name_the_field(messy_jsonl: Path) -> None:
    by_row = {int(r.item.rsplit("#", 1)[1]): r for r in ingest(messy_jsonl) if isinstance(r, Reject)}
    assert "'question'" in by_row[1].detail
    assert "'answer'" in by_row[2].detail
    assert "'question'" in by_row[5].detail and "int" in by_row[5].detail
    assert "'answer'" in by_row[6].detail and "list" in by_row[6].detail
    assert "row 0" in by_row[19].detail


def test_good_rows_of_the_messy_file(messy_jsonl: Path) -> None:
    problems = [r for r in ingest(messy_jsonl) if isinstance(r, Problem)]
    assert [p.gold_answer for p in problems] == ["4", r"\frac34", "5", "2"]
    assert problems[1].gold_solution == GOOD_MATH["solution"]
    assert json.loads(problems[3].meta) == {"id": 7}  # lists are not scalar metadata


def test_limit_and_offset_count_source_rows(messy_jsonl: Path) -> None:
    records = ingest(messy_jsonl, offset=11, limit=4)
    assert [r.item for r in records] == [f"{messy_jsonl}#{i}" for i in range(11, 15)]
    assert ingest(messy_jsonl, offset=len(BAD_AND_GOOD_LINES)) == []
    assert [r.gold_answer for r in ingest(GSM8K_SAMPLE, limit=3)] == GSM8K_SAMPLE_GOLD[:3]
    assert ingest(GSM8K_SAMPLE, limit=0) == []


def test_duplicates_are_found_only_inside_the_window(messy_jsonl: Path) -> None:
    records = ingest(messy_jsonl, offset=19, limit=1)
    assert len(records) == 1 and isinstance(records[0], Problem)


def test_parquet_source(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in MATH500_SAMPLE.read_text().splitlines()]
    rows[1]["problem"] = ""
    source = tmp_path / "math500.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    records = ingest(source)
    assert [r.reason if isinstance(r, Reject) else r.gold_answer for r in records] == [
        MATH500_SAMPLE_GOLD[0], "empty_text", *MATH500_SAMPLE_GOLD[2:]
    ]
    assert [r.source_index for r in ingest(source, offset=2, limit=2)] == [2, 3]


def test_json_array_source(tmp_path: Path) -> None:
    source = tmp_path / "rows.json"
    source.write_text(json.dumps([GOOD_GSM8K, "not a row", GOOD_MATH]))
    records = ingest(source)
    assert [type(r).__name__ for r in records] == ["Problem", "Reject", "Problem"]
    assert records[1].reason == "not_an_object"


def test_explicit_format_and_field_overrides(tmp_path: Path) -> None:
    source = tmp_path / "custom.jsonl"
    source.write_text(json.dumps({"prompt": "What is 6 * 7?", "target": "42", "worked": "6 * 7 = 42"}) + "\n")
    (problem,) = ingest(source, format="math", question_field="prompt", answer_field="target", solution_field="worked")
    assert (problem.question, problem.gold_answer, problem.gold_solution) == ("What is 6 * 7?", "42", "6 * 7 = 42")


def test_json_lines_named_json(tmp_path: Path) -> None:
    source = tmp_path / "rows.json"
    source.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_GSM8K).encode() + b"\n" + json.dumps(GOOD_MATH).encode())
    assert [r.gold_answer for r in ingest(source)] == ["4", r"\frac34"]  # a byte-order mark is tolerated


def test_control_characters_are_rejected_with_their_own_reason(tmp_path: Path) -> None:
    rows = [
        {"question": "What is 2 + 2?\x00", "answer": "#### 4"},  # NUL in the question
        {"question": "What is 3 + 3?", "answer": "3 + 3 = \x1b[31m6\x1b[0m\n#### 6"},  # an ANSI escape in the answer
        {"problem": "What is 4 + 4?", "answer": "8", "solution": "4 + 4\r= 8"},  # a lone carriage return
        {"question": "What is\t5 + 5?\r\nExplain.", "answer": "5 + 5 = 10\n#### 10"},  # tab, newline, CRLF: text
    ]
    source = tmp_path / "controls.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = ingest(source)
    assert [r.reason if isinstance(r, Reject) else "problem" for r in records] == [
        "control_characters", "control_characters", "control_characters", "problem"
    ]
    assert "'question'" in records[0].detail and "U+0000" in records[0].detail
    assert "'answer'" in records[1].detail and "U+001B" in records[1].detail
    assert "'solution'" in records[2].detail and "U+000D" in records[2].detail
    assert records[0].payload is not None and records[0].item == f"{source}#0"


def test_imported_questions_with_control_characters_are_rejected(tmp_path: Path) -> None:
    row = {"id": "c-1", "generator": "g", "problem": "What is 2 + 2?\x07", "steps": ["2 + 2 = 4"],
           "final_answer_correct": True, "label": -1}
    source = tmp_path / "processbench.jsonl"
    source.write_text(json.dumps(row) + "\n")
    (record,) = ingest(source, format="processbench")
    assert isinstance(record, Reject) and record.reason == "control_characters" and "U+0007" in record.detail


def test_config_errors_raise_before_the_first_row(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ingest.source"):
        run(IngestConfig(source=str(tmp_path / "absent.jsonl")))
    with pytest.raises(FileNotFoundError, match="ingest.source .* does not exist"):
        run(IngestConfig(source=str(tmp_path / "data" / "absent")))  # a path, not a hub id: no hub lookup
    with pytest.raises(FileNotFoundError, match="ingest.gold_source"):
        run(IngestConfig(source=str(GSM8K_SAMPLE), format="processbench", gold_source=str(tmp_path / "gold.jsonl")))
    (tmp_path / "rows.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="supported files"):
        run(IngestConfig(source=str(tmp_path / "rows.csv")))


def test_unknown_hub_dataset_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> None:
        raise DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError, match="not a hub dataset"):
        run(IngestConfig(source="nobody/no-such-dataset"))


def test_hub_source_reads_the_requested_subset_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    requests = []

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> datasets.Dataset:
        requests.append((path, name, split))
        return datasets.Dataset.from_list([GOOD_GSM8K, {**GOOD_GSM8K, "question": ""}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    records = ingest("openai/gsm8k", subset="main", split="test")
    assert requests == [("openai/gsm8k", "main", "test")]
    assert isinstance(records[0], Problem) and records[0].source == "openai/gsm8k"
    assert isinstance(records[1], Reject) and records[1].item == "openai/gsm8k#1"
