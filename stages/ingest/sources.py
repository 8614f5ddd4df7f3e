"""Ingest stage: rows of a math dataset become problems; rows that cannot become one become rejects.

Sources: a Hugging Face hub dataset id, or a local ``.jsonl`` / ``.json`` / ``.parquet`` file.
Layouts: GSM8K (``question``, ``answer`` = worked solution ending ``#### N``) and MATH / MATH-500
(``problem``, ``solution``, ``answer``). Every source row comes out exactly once, as a
``Problem`` or as a ``Reject`` with a stable reason; a bad row never stops the stage.

Step-labelled datasets (formats ``processbench``, ``prm800k``, ``math_shepherd``; see
``stages/ingest/importers.py``) are imported as step-tree records: besides the problems, each good row
yields its trajectory's new ``Node`` records, a ``Rollout`` and its ``Evaluation`` records;
a bad row is still exactly one ``Reject``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stepforge.schemas.ids import normalize_step_text, problem_id
from stepforge.schemas.records import Evaluation, Node, Problem, Reject, Rollout
from stepforge.stages.ingest import agent_import
from stepforge.stages.ingest import importers
from stepforge.stages.rollout.answers import gsm8k_gold_answer, last_boxed
from stepforge.stages.ingest.importers import RowError as _RowError

if TYPE_CHECKING:
    import datasets

STAGE = "ingest"
VERSION = 1
PAYLOAD_CHARS = 2000
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

Layout = Literal["gsm8k", "math"]
IngestRecord = Problem | Node | Rollout | Evaluation | Reject
_JSON_TYPE_NAMES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
# C0 and C1 control characters and DEL, except tab and newline: a NUL or an escape sequence in a prompt
# or a training target is corruption, not content. A carriage return before a newline is a Windows
# line end and stays; a lone one (it overwrites the terminal line) does not.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|\r(?!\n)")


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Hugging Face hub dataset id, or a local .jsonl / .json / .parquet file.")
    split: str = Field(default="test", description="Hub split to read; local files have a single split.")
    subset: str | None = Field(default=None, description="Hub configuration name (e.g. 'main' for openai/gsm8k).")
    format: Literal[
        "auto", "gsm8k", "math", "processbench", "prm800k", "math_shepherd", "agent_messages", "agent_steps"
    ] = Field(
        default="auto",
        description="Row layout. auto decides per row: 'math' if it has a 'problem' or solution field, "
        "else 'gsm8k'. processbench / prm800k / math_shepherd import a step-labelled dataset (ProcessBench, "
        "openai/prm800k, peiyi9979/Math-Shepherd): its solutions become nodes and rollouts, its step labels "
        "evaluations. agent_messages (OpenAI chat logs with tool_calls, AgentProcessBench) / agent_steps (JSONL of "
        "observation, thought, action, result) import agent trajectories: one step per assistant turn.",
    )
    invalid_calls: Literal["label", "reject"] = Field(
        default="label",
        description="Agent formats: a tool call with bad JSON arguments, an unknown tool or arguments that break its "
        "schema keeps the trajectory and is labelled -1 by the tool checks (label), or rejects the row (reject).",
    )
    gold_source: str | None = Field(
        default=None,
        description="Import formats only: a local GSM8K- or MATH-layout file (read like an ingest source) whose "
        "gold answers are joined to the imported problems by normalised question text. A question not in it "
        "falls back to the dataset's own gold answer, then to the final answer of a row the dataset marks "
        "correct; with none of these the row is rejected as no_gold_answer.",
    )
    question_field: str | None = Field(
        default=None, description="Field holding the question; default 'question' (gsm8k) / 'problem' (math)."
    )
    answer_field: str | None = Field(
        default=None,
        description="Field holding the gold answer (math) or the worked solution ending '#### N' (gsm8k); "
        "default 'answer'.",
    )
    solution_field: str | None = Field(
        default=None, description="Field holding the worked solution (math only); default 'solution'."
    )
    limit: int | None = Field(default=None, ge=0, description="Read at most this many source rows.")
    offset: int = Field(default=0, ge=0, description="Skip this many source rows first.")
    max_question_chars: int = Field(
        default=20000, ge=1, description="Longer questions are rejected as text_too_long."
    )
    environment: Literal["python"] | None = Field(
        default=None,
        description="Pose each gsm8k / math problem as a task for this live tool environment: the problem becomes "
        "an agent task (the environment's instructions and tools, the question as the user's message, the gold "
        "answer) whose episodes the rollout stage generates and the labellers continue (section agent).",
    )

    @model_validator(mode="after")
    def _options_fit_the_format(self) -> IngestConfig:
        importing = self.format in importers.IMPORT_FORMATS
        if self.gold_source is not None and not importing:
            formats = ", ".join(importers.IMPORT_FORMATS)
            raise ValueError(f"gold_source applies to the import formats {formats}, not {self.format!r}")
        if importing and self.environment is not None:
            raise ValueError(f"environment poses gsm8k / math problems as agent tasks; {self.format!r} rows are imported as they are")
        if importing:
            overrides = [name for name in ("question_field", "answer_field", "solution_field") if getattr(self, name)]
            if overrides:
                raise ValueError(f"{', '.join(overrides)} apply to the gsm8k / math layouts, not {self.format!r}")
        return self


def run(config: IngestConfig) -> Iterator[IngestRecord]:
    """Problems and rejects in source order; a problem seen before in this ingest is a reject.

    For the import formats, each good row yields (in this order) its problem if new, its nodes
    not yet emitted, its rollout and its evaluations; several rows of one question share one
    problem. A config error (missing file or gold source, unknown hub dataset) raises here,
    before the first row.
    """
    check_sources(config)
    if config.format in importers.IMPORT_FORMATS:
        golds = _gold_answers(config.gold_source) if config.gold_source is not None else {}
        return _imports(_open_source(config), config, golds)
    return _problems(_open_source(config), config)


def _imports(
    rows: Iterator[tuple[int, dict[str, Any] | Reject]], config: IngestConfig,
    golds: dict[str, importers.Gold | None],
) -> Iterator[IngestRecord]:
    parse = (
        agent_import.row_parser(config.format, config.invalid_calls) if config.format in importers.AGENT_FORMATS
        else importers.ROW_IMPORTERS[config.format]
    )
    importer = importers.TreeImporter(
        config.format, config.source, golds,  # type: ignore[arg-type]  # an import format, checked by run
        self_golds=lambda: importers.self_golds(parse, (row for _, row in _open_source(config))),
    )
    for row_index, row in rows:
        if isinstance(row, Reject):
            yield row
            continue
        try:
            imported = parse(row)
            _reject_control_characters(
                {"question": imported.question, "gold_answer": imported.gold_answer,
                 "gold_solution": imported.gold_solution}
            )
            if len(imported.question) > config.max_question_chars:
                raise _RowError(
                    "text_too_long", f"the question has {len(imported.question)} characters, "
                    f"more than max_question_chars={config.max_question_chars}",
                )
            records = importer.records(row_index, imported)
        except _RowError as error:
            yield _reject(config, row_index, error.reason, error.detail, _dump(row))
            continue
        yield from records  # type: ignore[misc]  # Problem / Node / Rollout / Evaluation


def _gold_answers(gold_source: str) -> dict[str, importers.Gold | None]:
    """Normalised question -> gold answer (and solution) of a GSM8K / MATH-layout file; None where
    its rows of one question disagree on the answer. Its rejected rows are skipped."""
    golds: dict[str, importers.Gold | None] = {}
    for record in run(IngestConfig(source=gold_source)):
        if not isinstance(record, Problem):
            continue
        key = normalize_step_text(record.question)
        gold = importers.Gold(record.gold_answer, record.gold_solution)
        if key not in golds:
            golds[key] = gold
        elif golds[key] is not None and golds[key].answer != gold.answer:  # type: ignore[union-attr]
            golds[key] = importers.AMBIGUOUS
    return golds


def _problems(
    rows: Iterator[tuple[int, dict[str, Any] | Reject]], config: IngestConfig
) -> Iterator[Problem | Reject]:
    first_row_of: dict[str, int] = {}
    for row_index, row in rows:
        if isinstance(row, Reject):
            yield row
            continue
        try:
            problem = _problem_from_row(row, row_index, config)
        except _RowError as error:
            yield _reject(config, row_index, error.reason, error.detail, _dump(row))
            continue
        first_row = first_row_of.setdefault(problem.problem_id, row_index)
        if first_row != row_index:
            yield _reject(
                config, row_index, "duplicate_problem",
                f"same question and gold answer as row {first_row} ({problem.problem_id})", _dump(row),
            )
            continue
        yield problem


def check_sources(config: IngestConfig) -> None:
    """Raise before any work when a local file the config names (``source``, ``gold_source``) is
    missing or is not a supported file: FileNotFoundError / ValueError naming the key and the path.

    ``run`` checks too, but a command line should say so before it starts an orchestrator.
    """
    _check_local_file(config.source, "source")
    if config.gold_source is not None:
        _check_local_file(config.gold_source, "gold_source")


def _check_local_file(source: str, key: str) -> None:
    path = Path(source)
    suffix = path.suffix.lower()
    # A hub id is `name` or `owner/name`; an absolute, ./-relative or deeper path can only be a file.
    looks_like_a_path = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if (suffix in LOCAL_SUFFIXES or looks_like_a_path) and not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"ingest.{key} {source!r} {what}")
    if suffix not in LOCAL_SUFFIXES and path.exists():
        raise ValueError(f"ingest.{key} {source!r}: supported files are {', '.join(LOCAL_SUFFIXES)}")


def _open_source(config: IngestConfig) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """(source row index, row or read-level reject) for the rows inside offset / limit."""
    _check_local_file(config.source, "source")
    path = Path(config.source)
    suffix = path.suffix.lower()
    stop = None if config.limit is None else config.offset + config.limit
    if suffix in (".jsonl", ".json"):
        return (
            (row_index, _decode_line(line, row_index, config))
            for row_index, line in islice(enumerate(_lines_of(path)), config.offset, stop)
        )
    dataset = _load_dataset(config)
    window = range(config.offset, len(dataset) if stop is None else min(stop, len(dataset)))
    return zip(window, dataset.select(window))


def _lines_of(path: Path) -> Iterator[bytes]:
    """The file's JSON documents as raw bytes: the lines of JSON Lines, the items of a JSON array.

    Lines are read as bytes and decoded one by one, not with ``datasets``' JSON loader: that loader
    fails the whole file on a single malformed line or on a field whose type changes between
    rows, and a bad row must become a reject, not stop the ingest.
    """
    if path.suffix.lower() == ".json":
        items = _json_array_items(path)
        if items is not None:
            yield from items
            return
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():  # blank lines are layout, not rows
                yield line


def _json_array_items(path: Path) -> list[bytes] | None:
    """A .json file's array items re-encoded one per row, or None if the file is not a JSON array."""
    try:
        document = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # many .json files on the hub are JSON Lines
    if not isinstance(document, list):
        return None  # a one-line JSON Lines file
    return [json.dumps(item, ensure_ascii=False).encode("utf-8") for item in document]


def _decode_line(line: bytes, row_index: int, config: IngestConfig) -> dict[str, Any] | Reject:
    line = line.rstrip(b"\r\n")
    payload = line.decode("utf-8", errors="backslashreplace")
    try:
        text = line.decode("utf-8-sig")  # -sig: tolerate a byte-order mark before the first row
    except UnicodeDecodeError as error:
        return _reject(config, row_index, "invalid_utf8", str(error), payload)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return _reject(config, row_index, "invalid_json", str(error), payload)
    if not isinstance(row, dict):
        return _reject(config, row_index, "not_an_object", f"row is a JSON {_JSON_TYPE_NAMES[type(row)]}", payload)
    return row


def _load_dataset(config: IngestConfig) -> datasets.Dataset:
    """A Parquet file or a hub split as a ``datasets.Dataset``."""
    # Imported here: `datasets` takes seconds to import and JSON Lines sources never need it.
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    if Path(config.source).suffix.lower() == ".parquet":
        return datasets.load_dataset("parquet", data_files=config.source, split="train")
    try:
        return datasets.load_dataset(config.source, config.subset, split=config.split)
    except DatasetNotFoundError as error:
        raise ValueError(f"ingest source {config.source!r} is not a hub dataset id: {error}") from error


def _problem_from_row(row: dict[str, Any], row_index: int, config: IngestConfig) -> Problem:
    layout = _layout_of(row, config)
    question_field = config.question_field or ("question" if layout == "gsm8k" else "problem")
    answer_field = config.answer_field or "answer"
    solution_field = config.solution_field or "solution"

    question = _required_text(row, question_field)
    if not question.strip():
        raise _RowError("empty_text", f"field {question_field!r} is empty")
    if len(question) > config.max_question_chars:
        raise _RowError(
            "text_too_long", f"field {question_field!r} has {len(question)} characters, "
            f"more than max_question_chars={config.max_question_chars}",
        )

    if layout == "gsm8k":
        used_fields = {question_field, answer_field}
        gold_solution = _required_text(row, answer_field)
        gold_answer = gsm8k_gold_answer(gold_solution)
        if gold_answer is None:
            raise _RowError("no_gold_answer", f"field {answer_field!r} has no '#### <answer>' line")
    else:
        used_fields = {question_field, answer_field, solution_field}
        gold_answer, gold_solution = _math_gold(row, answer_field, solution_field)

    # Checked in the fields the texts came from, so the reject's detail names one the user can find.
    if layout == "gsm8k":
        _reject_control_characters({question_field: question, answer_field: gold_solution})
    else:
        _reject_control_characters({question_field: question, answer_field: gold_answer, solution_field: gold_solution})
    return Problem(
        problem_id=problem_id(question, gold_answer),
        source=config.source,
        source_index=row_index,
        question=question,
        gold_answer=gold_answer,
        gold_solution=gold_solution,
        meta=_meta(row, used_fields) if config.environment is None else _task_meta(row, used_fields, question, gold_answer, config.environment),
    )


def _task_meta(row: dict[str, Any], used_fields: set[str], question: str, gold_answer: str, environment: str) -> str:
    """A problem's meta as a live agent task (``stages.agent.trajectory``'s layout, plus the environment)."""
    from stepforge.stages.agent.trajectory import AGENT_KIND
    from stepforge.stages.tools.environment import environment as make_environment

    env = make_environment(environment)
    meta = json.loads(_meta(row, used_fields))
    meta.update(kind=AGENT_KIND, agent={
        "context": [{"role": "system", "content": env.system_prompt()}, {"role": "user", "content": question}],
        "tools": env.tools(), "gold_answers": [gold_answer], "environment": environment,
    })
    return json.dumps(meta, sort_keys=True, ensure_ascii=False)


def _layout_of(row: dict[str, Any], config: IngestConfig) -> Layout:
    if config.format != "auto":
        return config.format  # type: ignore[return-value]  # import formats never get here
    if "problem" in row or (config.solution_field or "solution") in row:
        return "math"
    return "gsm8k"


def _required_text(row: dict[str, Any], field: str) -> str:
    if row.get(field) is None:
        raise _RowError("missing_field", f"field {field!r} is missing or null")
    value = row[field]
    if not isinstance(value, str):
        raise _RowError("wrong_type", f"field {field!r} is {type(value).__name__}, expected str")
    return value


def _math_gold(row: dict[str, Any], answer_field: str, solution_field: str) -> tuple[str, str | None]:
    """(gold answer, gold solution): the answer field, else the solution's last box."""
    if row.get(answer_field) is None and row.get(solution_field) is None:
        raise _RowError("missing_field", f"neither field {answer_field!r} nor {solution_field!r} is present")
    solution = _required_text(row, solution_field) if row.get(solution_field) is not None else None
    answer = row.get(answer_field)
    if isinstance(answer, bool) or not isinstance(answer, str | int | float | None):
        raise _RowError("wrong_type", f"field {answer_field!r} is {type(answer).__name__}, expected str or number")
    gold = str(answer).strip() if answer is not None else ""
    if not gold and solution is not None:
        gold = last_boxed(solution) or ""
    if not gold:
        raise _RowError("no_gold_answer", f"no {answer_field!r} and no \\boxed{{}} in {solution_field!r}")
    return gold, solution


def _reject_control_characters(texts: dict[str, str | None]) -> None:
    """A row error naming the first field (and character) that holds a control character."""
    for field, text in texts.items():
        found = _CONTROL_CHARACTERS.search(text) if text else None
        if found is not None:
            raise _RowError(
                "control_characters",
                f"field {field!r} has control character U+{ord(found.group()[0]):04X} at offset {found.start()}",
            )


def _meta(row: dict[str, Any], used_fields: set[str]) -> str:
    """The row's other scalar fields (subject, level, ids) as a JSON object."""
    extra = {key: value for key, value in row.items() if key not in used_fields and _is_json_scalar(value)}
    return json.dumps(extra, sort_keys=True, ensure_ascii=False)


def _is_json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # NaN / Infinity are not valid JSON
    return value is None or isinstance(value, str | int | bool)


def _dump(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


def _reject(config: IngestConfig, row_index: int, reason: str, detail: str, payload: str) -> Reject:
    return Reject(
        stage=STAGE, item=f"{config.source}#{row_index}", reason=reason, detail=detail,
        payload=payload[:PAYLOAD_CHARS],
    )
