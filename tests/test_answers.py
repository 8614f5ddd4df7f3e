"""Final-answer extraction and checking, on canonical examples."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stepforge.stages.rollout.answers import AnswerChecker, extract_final_answer, gsm8k_gold_answer, last_boxed


@pytest.fixture
def checker() -> Iterator[AnswerChecker]:
    with AnswerChecker() as answer_checker:
        yield answer_checker


def in_thread(function: Callable[[], Any]) -> Any:
    """``function()`` run in a fresh non-main thread; its result or its exception comes back."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "check did not return"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"So $x = \boxed{42}$.", "42"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"First \boxed{3}, then on reflection \boxed{x^{2}+1}.", "x^{2}+1"),
        (r"\fbox{7}", "7"),
        (r"\boxed {5}", "5"),
        (r"Done: \boxed{12} but then \boxed{1", "12"),  # an unclosed (truncated) box is not an answer
        (r"\boxed{}", None),
        ("24 + 48 = 72.\nThe answer is 72.", "72"),
        ("The answer is 41. Wait, no.\nThe answer is 42.", "42"),
        (r"Thus the final answer is: $\frac{1}{2}$.", r"\frac{1}{2}"),
        ("The final answer is **18**.", "18"),
        ("The answer is:\n\n  7", "7"),
        ("She makes 9 * 2 = $18 a day.\n#### 18", "18"),
        (r"The answer is 3, i.e. \boxed{4}", "4"),  # a box wins over a stated answer
        ("She makes 9 * 2 = 18 dollars a day.", None),  # no "last number" fallback
        ("", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_last_boxed_keeps_nested_braces() -> None:
    assert last_boxed(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18", "18"),
        ("So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70,000", "70000"),
        ("#### 1,000\n", "1000"),
        ("#### -3.5", "-3.5"),
        ("The answer has no marker: 18", None),
        ("#### ", None),
    ],
)
def test_gsm8k_gold_answer(solution: str, expected: str | None) -> None:
    assert gsm8k_gold_answer(solution) == expected


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        ("72", "72.0"),
        ("1000", "1,000"),
        ("1,000", "1000"),
        ("18", "$18"),
        ("18", r"\$18"),
        ("50", r"50\%"),
        ("-3", "-3.00"),
        ("0.5", ".5"),
    ],
)
def test_plain_numbers_take_the_fast_path(checker: AnswerChecker, gold: str, predicted: str) -> None:
    assert checker.check(gold, predicted) == (True, "correct")
    assert checker.stats == {"fast_path": 1, "memo_hits": 0, "math_verify": 0}


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\frac{\sqrt2}{2}", r"\sqrt{2}/2"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})"),
        ("6 - 5i", "6-5i"),
        (r"\text{Evelyn}", "Evelyn"),
    ],
)
def test_equivalent_latex_is_correct(checker: AnswerChecker, gold: str, predicted: str) -> None:
    assert checker.check(gold, predicted) == (True, "correct")
    assert checker.stats["math_verify"] == 1


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        ("72", "82"),
        ("1000", "100"),
        ("1,2", "12"),  # a pair of numbers, not twelve: commas only go as thousands separators
        (r"\frac{1}{2}", r"\frac{1}{3}"),
        (r"\sqrt{2}", "2"),
    ],
)
def test_wrong_answers(checker: AnswerChecker, gold: str, predicted: str) -> None:
    assert checker.check(gold, predicted) == (False, "wrong")


@pytest.mark.parametrize("predicted", [None, "", "   "])
def test_no_answer(checker: AnswerChecker, predicted: str | None) -> None:
    assert checker.check("72", predicted) == (None, "no_answer")


def test_unparseable_answer(checker: AnswerChecker) -> None:
    assert checker.check("72", "$$$") == (None, "unparseable_answer")


def test_memo_answers_repeats_without_rechecking(checker: AnswerChecker) -> None:
    for _ in range(3):
        assert checker.check(r"\frac{1}{2}", "0.5") == (True, "correct")
        assert checker.check("72", "72.0") == (True, "correct")
    assert checker.stats == {"fast_path": 1, "memo_hits": 4, "math_verify": 1}


def test_check_many_matches_check_and_dedupes(checker: AnswerChecker) -> None:
    items = [("72", "72"), (r"\frac{1}{2}", "0.5"), ("72", None), (r"\frac{1}{2}", "0.5"), ("72", "71")]
    expected = [(True, "correct"), (True, "correct"), (None, "no_answer"), (True, "correct"), (False, "wrong")]
    assert checker.check_many(items) == expected
    assert checker.stats == {"fast_path": 2, "memo_hits": 0, "math_verify": 1}


def test_check_off_the_main_thread_goes_through_the_worker(checker: AnswerChecker) -> None:
    assert in_thread(lambda: checker.check(r"\frac{\sqrt2}{2}", r"\sqrt{2}/2")) == (True, "correct")
    assert checker._pool is not None  # the math-verify work ran in the worker process
    assert in_thread(lambda: checker.check(r"\frac{1}{2}", r"\frac{1}{3}")) == (False, "wrong")


def test_check_many_off_the_main_thread_sends_one_batch(checker: AnswerChecker) -> None:
    items = [(r"\frac{1}{3}", "1/3"), ("x+1", "1+x"), ("2", r"\frac{4}{2}"), (r"\pi", "3"), ("5", "5")]
    expected = [(True, "correct"), (True, "correct"), (True, "correct"), (False, "wrong"), (True, "correct")]
    assert in_thread(lambda: checker.check_many(items)) == expected
    assert checker.stats == {"fast_path": 1, "memo_hits": 0, "math_verify": 4}
    assert in_thread(lambda: checker.check_many(items)) == expected
    assert checker.stats["memo_hits"] == 5


def test_worker_timeout_reports_and_recovers() -> None:
    with AnswerChecker(timeout_seconds=0.001) as checker:  # less than the worker's start-up
        assert in_thread(lambda: checker.check(r"\frac{1}{3}", "1/3")) == (None, "verify_timeout")
        assert checker._pool is None  # the stuck worker was killed
        checker.timeout_seconds = 30
        # Not memoised: a worker failure may hit checks that were only queued behind the culprit.
        assert in_thread(lambda: checker.check(r"\frac{1}{3}", "1/3")) == (True, "correct")
