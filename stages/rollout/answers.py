"""Final answers: pulling one out of a solution's text and checking it against the gold answer.

Checking is on the hot path of labelling (about eight checks per labelled step), so the common
cases stay cheap: a memo of earlier results, then an exact decimal comparison for plain numbers.
Only what remains goes to math-verify, whose symbolic comparison costs milliseconds or more.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from decimal import Decimal
from itertools import product
from math import ceil
from typing import Any

CheckResult = tuple[bool | None, str]
"""(outcome, reason): outcome is None when the check could not decide (see the reasons)."""

NO_ANSWER: CheckResult = (None, "no_answer")
VERIFY_TIMEOUT: CheckResult = (None, "verify_timeout")
VERIFY_ERROR: CheckResult = (None, "verify_error")

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b", re.IGNORECASE)
_GSM8K_MARKER = re.compile(r"####[ \t]*")

# Removed before the plain-number test: currency and percent signs and LaTeX spacing.
_NUMBER_NOISE = ("\\$", "$", "\\%", "%", "\\!", "\\,", " ")
_THOUSANDS_GROUPED = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_DECIMAL = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")


def boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` in order, nested braces kept."""
    contents = []
    for match in _BOX_COMMAND.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    contents.append(text[start:position])
                    break
    return contents


def last_boxed(text: str) -> str | None:
    """The last non-empty boxed content; an unclosed box (a truncated generation) does not count."""
    for content in reversed(boxed_contents(text)):
        if content.strip():
            return content.strip()
    return None


def extract_final_answer(text: str) -> str | None:
    """The answer a solution states: last box, else after the last "the (final) answer is", else after "####".

    There is deliberately no "last number in the text" fallback: it turns intermediate results
    into answers and silently inflates scores.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    stated = list(_ANSWER_IS.finditer(text))
    if stated:
        # Around a stated answer: a colon, math delimiters, markdown bold, the sentence's full stop.
        return _first_line(text[stated[-1].end() :], strip=" \t:$*", trailing=".$:*")
    marked = list(_GSM8K_MARKER.finditer(text))
    if marked:
        return _first_line(text[marked[-1].end() :], strip=" \t", trailing="")
    return None


def gsm8k_gold_answer(solution: str) -> str | None:
    """The gold answer after ``####`` in a GSM8K worked solution, thousands commas removed."""
    marked = list(_GSM8K_MARKER.finditer(solution))
    if not marked:
        return None
    answer = _first_line(solution[marked[-1].end() :], strip=" \t", trailing="")
    if answer is None:
        return None
    return answer.replace(",", "") or None


def _first_line(text: str, strip: str, trailing: str) -> str | None:
    """The first non-empty line of ``text`` (an answer may follow its marker on the next line)."""
    for line in text.splitlines():
        line = line.strip(strip).rstrip(trailing).strip()
        if line:
            return line
    return None


def plain_number(text: str) -> Decimal | None:
    """``text`` as an exact decimal if it is a plain number ("1,000", "$18", "50\\%"), else None."""
    for noise in _NUMBER_NOISE:
        text = text.replace(noise, "")
    if "," in text:
        # Only thousands separators go: "1,2" is a list of two numbers, not twelve.
        if not _THOUSANDS_GROUPED.match(text):
            return None
        text = text.replace(",", "")
    if not _PLAIN_DECIMAL.match(text):
        return None
    return Decimal(text)


class AnswerChecker:
    """Checks predicted final answers against gold answers, with a memo and a numeric fast path.

    math-verify bounds its own work with ``signal.alarm``, which Python allows only in the main
    thread. So a check runs math-verify directly in the main thread and, from any other thread
    (an executor, a server's worker thread), in a single worker process started with
    ``forkserver`` (forking a threaded process can deadlock). A worker that times out or dies is
    killed and replaced on the next check; the check itself reports it, never raises. As with any
    start method but fork, a script that checks off the main thread needs the
    ``if __name__ == "__main__":`` guard, or the worker re-runs the script when it starts.

    Results math-verify decided (including its own timeouts) are memoised; failures of the worker
    process are not, because a check queued behind a hanging one fails through no fault of its own.
    """

    def __init__(self, timeout_seconds: float = 10.0, memo_size: int = 200_000):
        self.timeout_seconds = timeout_seconds
        self.memo_size = memo_size
        self.stats = {"fast_path": 0, "memo_hits": 0, "math_verify": 0}
        self._memo: dict[tuple[str, str], CheckResult] = {}
        self._memo_lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def check(self, gold: str, predicted: str | None) -> CheckResult:
        """(True, "correct") / (False, "wrong"), or (None, reason) when it cannot be decided."""
        return self.check_many([(gold, predicted)])[0]

    def check_many(self, items: Iterable[tuple[str, str | None]]) -> list[CheckResult]:
        """Checks in order; off the main thread, all math-verify work goes to the worker as one batch."""
        items = list(items)
        results: list[CheckResult | None] = [None] * len(items)
        pending: dict[tuple[str, str], list[int]] = {}
        for index, (gold, predicted) in enumerate(items):
            if predicted is None or not predicted.strip():
                results[index] = NO_ANSWER
                continue
            key = (gold, predicted)
            memoised = self._memo.get(key)
            if memoised is not None:
                self.stats["memo_hits"] += 1
                results[index] = memoised
                continue
            if key in pending:
                pending[key].append(index)
                continue
            fast = self._fast_check(gold, predicted)
            if fast is not None:
                self.stats["fast_path"] += 1
                self._remember(key, fast)
                results[index] = fast
                continue
            pending[key] = [index]
        if pending:
            self.stats["math_verify"] += len(pending)
            for key, result in zip(pending, self._verify(list(pending))):
                for index in pending[key]:
                    results[index] = result
        return results  # type: ignore[return-value]  # every slot is filled above

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @staticmethod
    def _fast_check(gold: str, predicted: str) -> CheckResult | None:
        gold_number = plain_number(gold)
        if gold_number is None:
            return None
        predicted_number = plain_number(predicted)
        if predicted_number is None:
            return None
        return (True, "correct") if gold_number == predicted_number else (False, "wrong")

    def _remember(self, key: tuple[str, str], result: CheckResult) -> None:
        # Reads stay lock-free; eviction iterates the dict, which another thread must not resize meanwhile.
        with self._memo_lock:
            if len(self._memo) >= self.memo_size:
                del self._memo[next(iter(self._memo))]  # oldest first: dicts keep insertion order
            self._memo[key] = result

    def _verify(self, pairs: list[tuple[str, str]]) -> list[CheckResult]:
        operation_timeout = self._operation_timeout()
        if threading.current_thread() is threading.main_thread():
            results = [verify_with_math_verify(gold, predicted, operation_timeout) for gold, predicted in pairs]
        else:
            outcome = self._run_in_worker(pairs, operation_timeout)
            if not isinstance(outcome, list):
                if len(pairs) == 1:
                    return [outcome]
                # One failure ended the batch: check one by one so only the guilty checks fail.
                return [self._verify([pair])[0] for pair in pairs]
            results = outcome
        for pair, result in zip(pairs, results):
            self._remember(pair, result)
        return results

    def _operation_timeout(self) -> int:
        # signal.alarm counts whole seconds, and 0 would switch math-verify's timeout off.
        return max(1, ceil(self.timeout_seconds))

    def _run_in_worker(
        self, pairs: list[tuple[str, str]], operation_timeout: int
    ) -> list[CheckResult] | CheckResult:
        """The worker's results, or the one failure (timeout or crash) that ended the whole batch."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("forkserver")
                )
            pool = self._pool
            future = pool.submit(verify_batch_with_math_verify, pairs, operation_timeout)
        try:
            return future.result(timeout=self.timeout_seconds * len(pairs))
        except FutureTimeoutError:
            failure = VERIFY_TIMEOUT
        except Exception:  # BrokenProcessPool, a result that would not unpickle, ...
            failure = VERIFY_ERROR
        self._discard_pool(pool)
        return failure

    def _discard_pool(self, pool: ProcessPoolExecutor) -> None:
        with self._pool_lock:
            if self._pool is pool:
                self._pool = None
        # shutdown() alone would wait for the stuck call; the executor has no public way to kill
        # its workers before Python 3.14 (terminate_workers), hence the private attribute.
        for process in list((pool._processes or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


def verify_with_math_verify(gold: str, predicted: str, operation_timeout: int) -> CheckResult:
    """One check with math-verify; must run in a main thread (of this process or a worker)."""
    # Imported here: sympy makes the import slow, and most checks never get this far.
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=operation_timeout, raise_on_error=True)
    except TimeoutException:
        return VERIFY_TIMEOUT
    except Exception:
        return VERIFY_ERROR
    if not gold_parsed:
        return (None, "unparseable_gold")
    try:
        predicted_parsed = parse(f"${predicted}$", parsing_timeout=operation_timeout, raise_on_error=True)
    except TimeoutException:
        return VERIFY_TIMEOUT
    except Exception:
        return (None, "unparseable_answer")
    if not predicted_parsed:
        return (None, "unparseable_answer")

    # Compared pair by pair (math-verify's own verify() stops at the first error, or hides it as
    # False): a match anywhere is correct, one clean mismatch is wrong, only failures is unknown.
    compared = timed_out = False
    for gold_candidate, predicted_candidate in product(gold_parsed, predicted_parsed):
        try:
            if verify(gold_candidate, predicted_candidate, timeout_seconds=operation_timeout, raise_on_error=True):
                return (True, "correct")
            compared = True
        except TimeoutException:
            timed_out = True
        except Exception:
            pass
    if compared:
        return (False, "wrong")
    return VERIFY_TIMEOUT if timed_out else VERIFY_ERROR


def verify_batch_with_math_verify(pairs: list[tuple[str, str]], operation_timeout: int) -> list[CheckResult]:
    """The worker process's entry point: many checks for one round trip."""
    return [verify_with_math_verify(gold, predicted, operation_timeout) for gold, predicted in pairs]
