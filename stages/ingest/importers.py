"""Importers for external step-labelled data: ProcessBench, PRM800K and Math-Shepherd.

Each format has one function that maps one decoded source row to an ``ImportedRow`` (the
question, what the row says about the gold answer, and its steps with their labels) or raises
``RowError`` with a stable reason naming the field. ``TreeImporter`` then turns imported rows
into the step tree's records exactly as our own runs make them, so imported trajectories can be
re-labelled, verified, reviewed and exported like generated ones:

- one ``Problem`` per question (several rows of one question share it);
- one ``Node`` per step, ``node_id(problem_id, parent, text)``, emitted once per ingest, so
  solutions that share a prefix share its nodes. ``num_tokens`` is 0: the generating model's
  tokenizer is unknown (a later stage may recount);
- one ``Rollout`` per solution (origin ``policy``, ``prefix_node_id`` None, ``sample_index``
  0, 1, ... per problem in source order, text = the steps joined with a blank line,
  ``final_answer`` = ``extract_final_answer`` of it, else the line after PRM800K's closing
  "# Answer" heading; ``outcome`` the dataset's own correctness flag, if any, else None
  ("unchecked"); ``num_tokens`` 0; ``model`` ``import:<format>[:<generator>]``;
  ``generation_key`` the hash of the raw row; ``rollout_id`` =
  ``content_hash("import", format, problem_id, row identity)``, the identity being ProcessBench's
  ``id``, PRM800K's (``labeler``, ``timestamp``, problem) and Math-Shepherd's (``input``,
  ``label``), so a repeated row is ``duplicate_row``);
- one ``Evaluation`` per step the source labelled, and none where it gave no label;
  ``evaluation_id`` = ``content_hash("import-eval", format, rollout_id, step index)``, plus the
  completion's index for PRM800K (a step has several rated completions).

Format decisions (see each function for the rest):

- ProcessBench: human verdicts +1 before ``label``, -1 at it, nothing after (not labelled);
  ``processbench_reference`` recovers ``label`` from them.
- PRM800K: a step's completions are sibling nodes under the path's node; every rated completion
  is a human evaluation (rating 0 kept as verdict 0). The path follows ``chosen_completion``,
  else the labeler's own ``human_completion``, and ends at the first step with neither. A human
  completion is labelled +1 (PRM800K's README: labelers "write their own +1 step" when every
  completion was -1) unless it carries its own rating. Quality-control and initial-screening
  rows are rejected (``quality_control`` / ``initial_screening``): they are the same solutions
  served to every labeler to grade the labelers, so keeping them would multiply one trajectory
  by the number of labelers. ``finish_reason`` ``solution`` (the labeler reached a step that
  concluded in the correct answer) is the rollout's outcome True; other finishes leave it None.
- Math-Shepherd: the labels are Monte Carlo hard estimates, so they are ``mc`` evaluations
  (value 1.0 / 0.0 from n=1), not human ones.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from stepforge.schemas.ids import content_hash, node_id, normalize_step_text, problem_id
from stepforge.schemas.records import Evaluation, EvaluationSource, Node, Problem, Record, Rollout
from stepforge.stages.rollout.answers import extract_final_answer

ImportFormat = Literal["processbench", "prm800k", "math_shepherd", "agent_messages", "agent_steps"]
IMPORT_FORMATS: tuple[str, ...] = ("processbench", "prm800k", "math_shepherd", "agent_messages", "agent_steps")
AGENT_FORMATS: tuple[str, ...] = ("agent_messages", "agent_steps")

STEP_SEPARATOR = "\n\n"  # SplitConfig().separator(): how the imported steps are joined into a rollout's text
MATH_SHEPHERD_TAG = "ки"
MATH_SHEPHERD_FIRST_STEP = "Step 1:"
MATH_SHEPHERD_NOTE = "hard label only; the completions behind it are not published"
PRM800K_RATINGS = (-1, 0, 1)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_PRM800K_ANSWER = re.compile(r"^[ \t]*#[ \t]*Answer[ \t]*$", re.MULTILINE)  # PRM800K's solutions end "# Answer\n\n<answer>"


class RowError(Exception):
    """A source row that cannot be used; carries the reject's stable reason and a detail naming the field."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- the format-neutral form of an imported row ----------------------------------------------------
@dataclass(frozen=True)
class StepLabel:
    """What the source says about one step: becomes one ``Evaluation``."""

    source: EvaluationSource
    verdict: int
    successes: int
    value: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    text: str
    label: StepLabel | None  # None: the source gives no label for this step


@dataclass(frozen=True)
class Position:
    """One step of the solution: the candidates written there (siblings under the path's node so far)."""

    candidates: tuple[Candidate, ...]
    chosen: int | None  # the candidate the path follows; None ends the path here (no later positions)


@dataclass(frozen=True)
class ImportedRow:
    format: ImportFormat
    identity: Any  # what makes this row's rollout distinct (see the module docstring)
    question: str
    positions: tuple[Position, ...]
    generation_key: str
    gold_answer: str | None = None  # the dataset's own gold answer (PRM800K ground_truth_answer)
    gold_solution: str | None = None
    self_gold: str | None = None  # the solution's own final answer, when the row says it is correct
    outcome: bool | None = None  # the dataset's own correctness flag for the path's final answer
    generator: str | None = None
    problem_meta: Mapping[str, Any] = field(default_factory=dict)
    gold_required: bool = True  # agent tasks may have no gold answer (then no final-answer check)
    rollout_text: str | None = None  # default: the steps joined with a blank line
    rollout_final_answer: str | None = None  # default: final_answer(rollout text)

    @property
    def question_key(self) -> str:
        return normalize_step_text(self.question)


# -- ProcessBench ---------------------------------------------------------------------------------
def processbench_row(row: Mapping[str, Any]) -> ImportedRow:
    """A ProcessBench row (``id``, ``generator``, ``problem``, ``steps``, ``final_answer_correct``,
    ``label`` = 0-based index of the earliest wrong step, -1 if none).

    Human verdicts: +1 for the steps before ``label``, -1 at ``label``; the steps after it get no
    evaluation (ProcessBench stops at the first error). ``final_answer_correct`` is the rollout's
    outcome and, when true, makes the solution's own final answer a gold-answer candidate.
    """
    identity = required_field(row, "id", (str, int))
    question = _question(row, "problem")
    steps = _steps(row, "steps")
    correct = required_field(row, "final_answer_correct", bool)
    label = required_field(row, "label", int)
    if not -1 <= label < len(steps):
        raise RowError("label_out_of_range", f"field 'label' is {label}, expected -1 .. {len(steps) - 1} ({len(steps)} steps)")
    generator = optional_field(row, "generator", str)
    meta = {"imported": "processbench", "row": identity}
    positions = []
    for index, text in enumerate(steps):
        step_label = None
        if label == -1 or index < label:
            step_label = StepLabel(source="human", verdict=1, successes=1, meta=meta)
        elif index == label:
            step_label = StepLabel(source="human", verdict=-1, successes=0, meta=meta)
        positions.append(Position((Candidate(text, step_label),), chosen=0))
    return ImportedRow(
        format="processbench", identity=identity, question=question, positions=tuple(positions),
        generation_key=raw_row_hash(row), self_gold=own_final_answer(steps) if correct else None,
        outcome=correct, generator=generator,
        problem_meta=scalar_fields(row, {"problem", "steps", "final_answer_correct", "label"}),
    )


def processbench_reference(path_verdicts: Sequence[int | None]) -> int:
    """ProcessBench's ``label`` from the verdicts along a path: the first -1 index, else -1.

    ``path_verdicts[i]`` is the human verdict of the path's i-th step (None where there is none).
    """
    for index, verdict in enumerate(path_verdicts):
        if verdict == -1:
            return index
    return -1


# -- PRM800K ----------------------------------------------------------------------------------------
def prm800k_row(row: Mapping[str, Any]) -> ImportedRow:
    """An openai/prm800k phase 1 / phase 2 row (``labeler``, ``question``, ``label.steps``, ...).

    At each step every completion is a sibling node under the path's node; every completion with
    a rating (-1 / 0 / 1) is a human evaluation (``rating`` null: none). A ``human_completion``
    (a string, or an object with ``text`` and optionally ``rating``) is one more sibling, +1
    unless it has its own rating. The path follows ``chosen_completion``, else the human
    completion, and ends at the first step with neither; a later step would have no parent, so
    it makes the row ``broken_path``.
    """
    if optional_field(row, "is_quality_control_question", bool):
        raise RowError("quality_control", "field 'is_quality_control_question' is true (a labeler-grading copy)")
    if optional_field(row, "is_initial_screening_question", bool):
        raise RowError("initial_screening", "field 'is_initial_screening_question' is true (a labeler-screening copy)")
    question_block = required_field(row, "question", dict, name="question")
    question = _question(question_block, "problem", prefix="question.")
    gold = optional_field(question_block, "ground_truth_answer", str, name="question.ground_truth_answer")
    gold_solution = optional_field(question_block, "ground_truth_solution", str, name="question.ground_truth_solution")
    label = required_field(row, "label", dict)
    steps = required_field(label, "steps", list, name="label.steps")
    if not steps:
        raise RowError("empty_steps", "field 'label.steps' is an empty list")
    labeler = optional_field(row, "labeler", str)
    finish = optional_field(label, "finish_reason", str, name="label.finish_reason")

    positions: list[Position] = []
    path_texts: list[str] = []
    for step_index, step in enumerate(steps):
        where = f"label.steps[{step_index}]"
        if not isinstance(step, dict):
            raise RowError("wrong_type", f"field {where!r} is {_type_name(step)}, expected object")
        if positions and positions[-1].chosen is None:
            raise RowError(
                "broken_path", f"field {f'label.steps[{step_index - 1}]'!r} has no chosen_completion or "
                f"human_completion, yet {len(steps) - step_index} later step(s) follow",
            )
        completions = required_field(step, "completions", list, name=f"{where}.completions")
        candidates = [_prm800k_completion(c, f"{where}.completions[{i}]", labeler) for i, c in enumerate(completions)]
        chosen = optional_field(step, "chosen_completion", int, name=f"{where}.chosen_completion")
        if chosen is not None and not 0 <= chosen < len(candidates):
            raise RowError(
                "label_out_of_range",
                f"field '{where}.chosen_completion' is {chosen}, expected 0 .. {len(candidates) - 1} or null",
            )
        human = _prm800k_human_completion(step.get("human_completion"), f"{where}.human_completion", labeler)
        if human is not None:
            candidates.append(human)
            if chosen is None:
                chosen = len(candidates) - 1
        if not candidates:
            raise RowError("empty_steps", f"field '{where}.completions' is empty and there is no human_completion")
        positions.append(Position(tuple(candidates), chosen))
        if chosen is not None:
            path_texts.append(candidates[chosen].text)

    reached_answer = finish == "solution" and bool(path_texts)
    meta = scalar_fields(question_block, {"problem", "ground_truth_answer", "ground_truth_solution", "pre_generated_answer",
                                     "pre_generated_verifier_score"})
    timestamp = row.get("timestamp")
    # A labeler's submission time names the row, whatever encoding (JSON Lines, Parquet) carries it.
    identity = [labeler, str(timestamp), question] if labeler and timestamp else raw_row_hash(row)
    return ImportedRow(
        format="prm800k", identity=identity, question=question, positions=tuple(positions),
        generation_key=raw_row_hash(row), gold_answer=gold.strip() if gold and gold.strip() else None,
        gold_solution=gold_solution, self_gold=own_final_answer(path_texts) if reached_answer else None,
        outcome=True if reached_answer else None, problem_meta=meta,
    )


def _prm800k_completion(completion: Any, where: str, labeler: str | None) -> Candidate:
    if not isinstance(completion, dict):
        raise RowError("wrong_type", f"field {where!r} is {_type_name(completion)}, expected object")
    text = _step_text(required_field(completion, "text", str, name=f"{where}.text"), f"{where}.text")
    rating = optional_field(completion, "rating", int, name=f"{where}.rating")
    flagged = completion.get("flagged")
    if rating is None:
        return Candidate(text, None)
    return Candidate(text, _prm800k_label(rating, where, labeler, flagged))


def _prm800k_human_completion(human: Any, where: str, labeler: str | None) -> Candidate | None:
    if human is None:
        return None
    if isinstance(human, str):
        text, rating, flagged = human, None, None
    elif isinstance(human, dict):
        text = required_field(human, "text", str, name=f"{where}.text")
        rating = optional_field(human, "rating", int, name=f"{where}.rating")
        flagged = human.get("flagged")
    else:
        raise RowError("wrong_type", f"field {where!r} is {_type_name(human)}, expected string, object or null")
    text = _step_text(text, where)
    # Written by the labeler when every completion was wrong: PRM800K calls it a +1 step.
    return Candidate(text, _prm800k_label(1 if rating is None else rating, where, labeler, flagged, human=True))


def _prm800k_label(rating: int, where: str, labeler: str | None, flagged: Any, human: bool = False) -> StepLabel:
    if rating not in PRM800K_RATINGS:
        raise RowError("label_out_of_range", f"field '{where}.rating' is {rating}, expected -1, 0, 1 or null")
    meta: dict[str, Any] = {"imported": "prm800k", "labeler": labeler, "flagged": flagged}
    if human:
        meta["human_completion"] = True
    return StepLabel(source="human", verdict=rating, successes=1 if rating == 1 else 0, meta=meta)


# -- Math-Shepherd ----------------------------------------------------------------------------------
def math_shepherd_row(row: Mapping[str, Any]) -> ImportedRow:
    """A peiyi9979/Math-Shepherd row: ``input`` = question, then steps each ending with the tag 'ки';
    ``label`` = the same text with each tag replaced by '+' or '-'; ``task`` = GSM8K / MATH.

    The question is the text before 'Step 1:'. Step texts keep their 'Step k:' prefix (it is what
    the model wrote) and lose the tag. Labels are Monte Carlo hard estimates: ``mc`` evaluations.
    A last step labelled '+' makes the solution's own final answer a gold-answer candidate.
    """
    text = required_field(row, "input", str)
    labelled = required_field(row, "label", str)
    optional_field(row, "task", str)
    start = text.find(MATH_SHEPHERD_FIRST_STEP)
    if start < 0:
        raise RowError("unparseable_row", f"field 'input' has no {MATH_SHEPHERD_FIRST_STEP!r}")
    question = text[:start].strip()
    if not question:
        raise RowError("empty_text", f"field 'input' has no question before {MATH_SHEPHERD_FIRST_STEP!r}")
    parts = text.split(MATH_SHEPHERD_TAG)
    if len(parts) == 1:
        raise RowError("empty_steps", f"field 'input' has no {MATH_SHEPHERD_TAG!r} step tag")
    if len(parts[0]) < start:
        raise RowError("unparseable_row", f"field 'input' has a {MATH_SHEPHERD_TAG!r} tag before {MATH_SHEPHERD_FIRST_STEP!r}")
    if parts[-1].strip():
        raise RowError("unparseable_row", f"field 'input' has text after its last {MATH_SHEPHERD_TAG!r} tag")
    marks = _math_shepherd_marks(parts, labelled)
    steps = [parts[0][start:], *parts[1:-1]]
    positions = []
    meta = {"imported": "math_shepherd", "note": MATH_SHEPHERD_NOTE}
    step_texts = []
    for index, (step, mark) in enumerate(zip(steps, marks)):
        step = _step_text(step, f"input step {index + 1}")
        step_texts.append(step)
        good = mark == "+"
        step_label = StepLabel(
            source="mc", verdict=1 if good else -1, successes=1 if good else 0, value=1.0 if good else 0.0, meta=meta
        )
        positions.append(Position((Candidate(step, step_label),), chosen=0))
    return ImportedRow(
        format="math_shepherd", identity=content_hash(text, labelled), question=question, positions=tuple(positions),
        generation_key=raw_row_hash(row), self_gold=own_final_answer(step_texts) if marks[-1] == "+" else None,
        problem_meta=scalar_fields(row, {"input", "label"}),
    )


def _math_shepherd_marks(parts: Sequence[str], labelled: str) -> list[str]:
    """The '+' / '-' standing where ``input`` has each tag; ``label_mismatch`` if the texts differ otherwise."""
    marks, cursor = [], 0
    for index, part in enumerate(parts):
        if not labelled.startswith(part, cursor):
            differs = cursor + next(
                (i for i, (a, b) in enumerate(zip(part, labelled[cursor:])) if a != b), min(len(part), len(labelled) - cursor)
            )
            raise RowError(
                "label_mismatch", f"field 'label' differs from 'input' (its {len(parts) - 1} {MATH_SHEPHERD_TAG!r} tags "
                f"replaced by '+' / '-') at character {differs}",
            )
        cursor += len(part)
        if index == len(parts) - 1:
            break
        mark = labelled[cursor : cursor + 1]
        if mark not in ("+", "-"):
            raise RowError(
                "label_mismatch", f"field 'label' has {mark or 'the end of the text'!r} at character {cursor} where "
                f"'input' has tag {index + 1} of {len(parts) - 1}; expected '+' or '-'",
            )
        marks.append(mark)
        cursor += 1
    if cursor != len(labelled):
        raise RowError("label_mismatch", f"field 'label' has {len(labelled) - cursor} more characters than 'input'")
    return marks


ROW_IMPORTERS: dict[str, Callable[[Mapping[str, Any]], ImportedRow]] = {
    "processbench": processbench_row,
    "prm800k": prm800k_row,
    "math_shepherd": math_shepherd_row,
}


# -- imported rows to records ------------------------------------------------------------------------
@dataclass(frozen=True)
class Gold:
    answer: str | None
    solution: str | None = None


AMBIGUOUS = None  # a gold-source question whose rows disagree on the gold answer
_NO_GOLD = {
    "processbench": "no row of it has field 'final_answer_correct' true",
    "prm800k": "field 'question.ground_truth_answer' is missing and no row of it has 'label.finish_reason' 'solution'",
    "math_shepherd": "no row of it has field 'label' '+' on its last step",
}


class TreeImporter:
    """Turns imported rows into records, keeping what one ingest has already emitted.

    A question's gold answer, in order: the ``gold_source`` entry for its normalised text; the
    dataset's own (PRM800K ``ground_truth_answer``); the final answer of the first row of the
    question in the read window that the dataset marks correct (``self_golds``, read lazily:
    a row marked wrong still gets its gold from a sibling marked correct, whatever their order).
    Otherwise the row is ``no_gold_answer``. The first row of a question makes its ``Problem``;
    later rows of the question attach to it.
    """

    def __init__(
        self,
        format: ImportFormat,
        source: str,
        golds: Mapping[str, Gold | None],
        self_golds: Callable[[], Mapping[str, str]],
    ):
        self.format = format
        self.source = source
        self.golds = golds
        self._self_golds_reader = self_golds
        self._self_golds: Mapping[str, str] | None = None
        self._problems: dict[str, Problem] = {}
        self._samples: dict[str, int] = {}
        self._rollout_rows: dict[str, int] = {}
        self._nodes: set[str] = set()

    def records(self, row_index: int, row: ImportedRow) -> list[Record]:
        """The row's new problem, new nodes, rollout and evaluations; ``RowError`` leaves no trace."""
        problem = self._problems.get(row.question_key)
        new_problem = problem is None
        if problem is None:
            problem = self._problem(row_index, row)
        rollout_id = content_hash("import", self.format, problem.problem_id, row.identity)
        first_row = self._rollout_rows.get(rollout_id)
        if first_row is not None:
            raise RowError("duplicate_row", f"same row identity as row {first_row} ({rollout_id})")
        try:
            nodes, rollout, evaluations = self._tree(problem, rollout_id, row)
        except ValidationError as error:
            raise RowError("invalid_record", str(error).splitlines()[0][:500]) from error

        if new_problem:
            self._problems[row.question_key] = problem
        self._rollout_rows[rollout_id] = row_index
        self._nodes.update(node.node_id for node in nodes)
        if rollout is not None:
            self._samples[problem.problem_id] = rollout.sample_index + 1
        return [*([problem] if new_problem else []), *nodes, *([rollout] if rollout else []), *evaluations]

    def _problem(self, row_index: int, row: ImportedRow) -> Problem:
        gold, gold_from = self._gold(row)
        meta = {**row.problem_meta, "imported": self.format, "gold_from": gold_from}
        try:
            return Problem(
                problem_id=problem_id(row.question, gold.answer), source=self.source, source_index=row_index,
                question=row.question, gold_answer=gold.answer, gold_solution=gold.solution,
                meta=json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str),
            )
        except ValidationError as error:
            raise RowError("invalid_record", str(error).splitlines()[0][:500]) from error

    def _gold(self, row: ImportedRow) -> tuple[Gold, str]:
        key = row.question_key
        if key in self.golds:
            gold = self.golds[key]
            if gold is AMBIGUOUS:
                raise RowError("ambiguous_gold", "the gold source has rows of this question with different gold answers")
            return gold, "gold_source"
        if row.gold_answer is not None:
            return Gold(row.gold_answer, row.gold_solution), "dataset"
        if not row.gold_required:
            return Gold(None, row.gold_solution), "none"
        if self._self_golds is None:
            self._self_golds = self._self_golds_reader()
        own = self._self_golds.get(key)
        if own is not None:
            return Gold(own, row.gold_solution), "marked_correct"
        raise RowError(
            "no_gold_answer", f"no gold answer: the question is not in gold_source and {_NO_GOLD[self.format]}",
        )

    def _tree(
        self, problem: Problem, rollout_id: str, row: ImportedRow
    ) -> tuple[list[Node], Rollout | None, list[Evaluation]]:
        pid = problem.problem_id
        nodes: list[Node] = []
        new_ids: set[str] = set()
        evaluations: list[Evaluation] = []
        path: list[str] = []
        path_texts: list[str] = []
        parent: str | None = None
        for step_index, position in enumerate(row.positions):
            ids = []
            for candidate_index, candidate in enumerate(position.candidates):
                nid = node_id(pid, parent, candidate.text)
                ids.append(nid)
                if nid not in self._nodes and nid not in new_ids:
                    new_ids.add(nid)
                    nodes.append(
                        Node(node_id=nid, problem_id=pid, parent_id=parent, depth=step_index + 1,
                             text=candidate.text, origin="policy", num_tokens=0)
                    )
                if candidate.label is not None:
                    evaluations.append(self._evaluation(pid, nid, rollout_id, step_index, candidate_index, candidate.label))
            if position.chosen is None:
                break
            parent = ids[position.chosen]
            path.append(parent)
            path_texts.append(position.candidates[position.chosen].text)
        if not path:  # a first step without a continuation: its labelled siblings, no path
            if not evaluations:
                raise RowError("nothing_to_import", "no step is on a path and no step is labelled")
            return nodes, None, evaluations
        text = row.rollout_text if row.rollout_text is not None else STEP_SEPARATOR.join(path_texts)
        answer = row.rollout_final_answer if row.rollout_text is not None else final_answer(text)
        outcome = row.outcome
        model = f"import:{self.format}" + (f":{row.generator}" if row.generator else "")
        rollout = Rollout(
            rollout_id=rollout_id, problem_id=pid, origin="policy", prefix_node_id=None,
            sample_index=self._samples.get(pid, 0), node_ids=path, text=text, final_answer=answer,
            outcome=outcome, outcome_reason="unchecked" if outcome is None else ("correct" if outcome else "wrong"),
            finish_reason="stop", num_tokens=0, model=model, generation_key=row.generation_key,
        )
        return nodes, rollout, evaluations

    def _evaluation(
        self, pid: str, nid: str, rollout_id: str, step_index: int, candidate_index: int, label: StepLabel
    ) -> Evaluation:
        return Evaluation(
            evaluation_id=import_evaluation_id(
                self.format, rollout_id, step_index, candidate_index if self.format == "prm800k" else None
            ), node_id=nid, problem_id=pid, source=label.source, value=label.value,
            n=1, successes=label.successes, verdict=label.verdict, confidence=None, model=None,
            meta=json.dumps(dict(label.meta), sort_keys=True, ensure_ascii=False, default=str),
        )


def import_evaluation_id(format: str, rollout_id: str, step_index: int, candidate_index: int | None = None) -> str:
    """The id of an imported label: keyed by the row's rollout and the step, so two rows sharing a
    step (two generators' solutions of one problem) keep their own labels of it. PRM800K adds the
    completion's index, since one step has several rated completions."""
    key: tuple[Any, ...] = ("import-eval", format, rollout_id, step_index)
    if candidate_index is not None:
        key += (candidate_index,)
    return content_hash(*key)


def self_golds(parse: Callable[[Mapping[str, Any]], ImportedRow], rows: Iterable[Any]) -> dict[str, str]:
    """Normalised question -> final answer of its first row (in ``rows``' order) marked correct."""
    found: dict[str, str] = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        try:
            imported = parse(row)
        except RowError:
            continue
        if imported.self_gold is not None:
            found.setdefault(imported.question_key, imported.self_gold)
    return found


# -- helpers ---------------------------------------------------------------------------------------
def final_answer(text: str) -> str | None:
    """``extract_final_answer``, else the line after PRM800K's closing "# Answer" heading."""
    answer = extract_final_answer(text)
    if answer is not None:
        return answer
    headings = list(_PRM800K_ANSWER.finditer(text))
    if not headings:
        return None
    lines = [line.strip() for line in text[headings[-1].end() :].splitlines() if line.strip()]
    return lines[0] if lines else None


def own_final_answer(steps: Sequence[str]) -> str | None:
    """The answer a solution states (``final_answer`` of its last step, then of all of it), else the
    last number of its last step. Used only where the dataset says that answer is correct."""
    if not steps:
        return None
    answer = final_answer(steps[-1]) or final_answer(STEP_SEPARATOR.join(steps))
    if answer:
        return answer
    numbers = _NUMBER.findall(steps[-1])
    return numbers[-1].replace(",", "") if numbers else None


def raw_row_hash(row: Mapping[str, Any]) -> str:
    return content_hash("import-row", row)


_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def check_type(value: Any, expected: type | tuple[type, ...], name: str) -> Any:
    """``value`` if it has a JSON type of ``expected``, else a ``wrong_type`` row error naming ``name``."""
    types = expected if isinstance(expected, tuple) else (expected,)
    # bool is an int in Python, never in JSON: a flag is not an index.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join(_TYPE_NAMES[t] for t in types)
        raise RowError("wrong_type", f"field {name!r} is {_type_name(value)}, expected {wanted}")
    return value


def required_field(row: Mapping[str, Any], key: str, expected: type | tuple[type, ...], name: str | None = None) -> Any:
    """``row[key]`` checked against ``expected``; a ``missing_field`` row error if absent or null."""
    name = name or key
    if row.get(key) is None:
        raise RowError("missing_field", f"field {name!r} is missing or null")
    return check_type(row[key], expected, name)


def optional_field(row: Mapping[str, Any], key: str, expected: type | tuple[type, ...], name: str | None = None) -> Any:
    """``row[key]`` checked against ``expected``, or None if absent or null."""
    value = row.get(key)
    return None if value is None else check_type(value, expected, name or key)


def _question(row: Mapping[str, Any], key: str, prefix: str = "") -> str:
    question = required_field(row, key, str, name=prefix + key)
    if not question.strip():
        raise RowError("empty_text", f"field {prefix + key!r} is empty")
    return question


def _steps(row: Mapping[str, Any], key: str) -> list[str]:
    steps = required_field(row, key, list)
    if not steps:
        raise RowError("empty_steps", f"field {key!r} is an empty list")
    return [_step_text(check_type(step, str, f"{key}[{i}]"), f"{key}[{i}]") for i, step in enumerate(steps)]


def _step_text(text: str, name: str) -> str:
    if not text.strip():
        raise RowError("empty_step", f"field {name!r} is empty")
    return text.strip()


def scalar_fields(row: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    """The row's other JSON-scalar fields (ids, generator, task, ...) for the problem's meta."""
    return {key: value for key, value in row.items() if key not in used and _is_json_scalar(value)}


def _is_json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)  # NaN / Infinity are not valid JSON
    return value is None or isinstance(value, str | int | bool)
