"""The synthetic world: arithmetic word problems and a policy whose mistakes are known exactly.

This is a *measuring instrument*, not a model to make data with. Step labellers (Monte Carlo
completions, OmegaPRM-style binary search, MCTS) estimate, for each step of a solution, the
probability that the policy still reaches the right answer from there. On a real model that
probability is unknown, so a labeller's bias and variance cannot be measured. Here it is known
in closed form: the policy makes only two kinds of mistake, at configured rates, and the
ground truth (``step_truths``, ``first_error``, ``prefix_value``) follows from the rates.

Three parts:

- ``make_problems`` writes GSM8K-layout rows ("Ava starts with 7 marbles. Then Ava finds 5
  more marbles. ... How many marbles does Ava have at the end?"), and ``parse_problem`` reads
  such a problem back out of any surrounding text (a prompt template, a few-shot prompt).
- ``SyntheticBackend`` implements the ``Backend`` protocol: it reads the problem and the
  solution so far from a request and writes the remaining steps, one equation per operation,
  with a *slip* (right operation, wrong result: a calculator catches it) or a *wrong
  operation* (right arithmetic on the wrong operation: a calculator does not) at the
  configured rates. Errors propagate: each step computes from the value carried by the last.
- ``create_app`` serves the same policy over the OpenAI protocol, so HTTP clients can be
  benchmarked against the same ground truth (``stepforge world serve``). It is also a *simulated*
  continuous-batching server (``batching.BatchSimulator``), a measuring instrument for client
  throughput: ``--capacity`` requests run at once and the rest queue (FIFO), each holds its slot
  for ``ttft_ms + completion_tokens * tpot_ms * (1 + running / batch_slowdown)`` ms, and the
  server meters its own time-weighted occupancy at ``GET /metrics`` (``POST /metrics/reset``
  starts a window; a one-line summary is printed at shutdown). The defaults (no latency,
  unbounded capacity) answer at once. Latency never changes a sample: a request is sampled,
  then held.

Sampling is pure Python and seeded only by the sampler seed, so one (request, seed) always
gives one text, thousands of times per second.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash
from stepforge.stages.instruments.batching import BatchSimulator, LatencyModel
from stepforge.stages.instruments.world import LEAD_INS, WorldConfig
from stepforge.stages.llm.base import Generation, GenerationRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

Op = Literal["add", "sub", "mul"]

# One token = optional leading whitespace + a run of non-space characters; a trailing run of
# whitespace (possible after a stop string cuts the text) is a token of its own, so the token
# byte lengths always add up to the text's.
_TOKEN = re.compile(r"\s*\S+|\s+")
# An equation anywhere in a prefix: "12 - 3 = 9", also inside "Step 2: ..." or GSM8K's "<<...>>".
_EQUATION = re.compile(r"(?<![\d.])(-?\d+)\s*([-+*/×÷])\s*(\d+)\s*=\s*(-?\d+)")
# A prefix written in step_prefix mode ends with the next step's header, e.g. "Step 3:".
_STEP_HEADER_AT_END = re.compile(r"(?i)step\s*(\d+)\s*[:.)]\s*$")
_START = re.compile(r"\b([A-Z][a-z]+) starts with (\d+) ([a-z]+)\.")

_SYMBOL: dict[str, str] = {"add": "+", "sub": "-", "mul": "*"}
# A wrong operation is the nearest confusion first (gains <-> loses, "doubles" -> "+ 2"); the
# second candidate is used only when the first would land on the true value by accident.
_WRONG_OPS: dict[str, tuple[Op, Op]] = {"add": ("sub", "mul"), "sub": ("add", "mul"), "mul": ("add", "sub")}
_SLIP_DELTAS = (-3, -2, -1, 1, 2, 3)
MAX_VALUE = 10**6
UNSOLVABLE_TEXT = "I cannot solve this."

_NAMES: tuple[tuple[str, str], ...] = (
    ("Ava", "her"), ("Liam", "his"), ("Mia", "her"), ("Noah", "his"), ("Zoe", "her"), ("Omar", "his"),
    ("Lena", "her"), ("Ravi", "his"), ("Sofia", "her"), ("Kenji", "his"), ("Nora", "her"), ("Diego", "his"),
    ("Priya", "her"), ("Felix", "his"), ("Amara", "her"), ("Hugo", "his"), ("Ines", "her"), ("Tariq", "his"),
    ("Yara", "her"), ("Mateo", "his"), ("Chloe", "her"), ("Bruno", "his"), ("Leila", "her"), ("Oscar", "his"),
)
_OBJECTS = (
    "marbles", "stickers", "apples", "coins", "stamps", "pencils", "cards", "shells",
    "beads", "books", "cookies", "balloons", "buttons", "crayons", "tickets", "plums",
)
_ADD_VERBS = ("finds", "buys", "gets", "receives", "wins")
_SUB_VERBS = ("gives away", "loses", "sells", "uses", "donates")
_MUL_WORDS = {2: "doubles", 3: "triples"}


# How a step may begin before its equation; with ``phrasings`` = n the first n are used.
# --------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True, slots=True)
class Problem:
    """A parsed problem: ``values[i]`` is the true running value after ``i`` operations."""

    name: str
    obj: str
    start: int
    ops: tuple[tuple[Op, int], ...]
    # How each operation is phrased in the question (after the name), reused in the steps.
    phrases: tuple[str, ...]
    values: tuple[int, ...]
    # Character span of the problem in the text it was parsed from: a raw prompt's solution
    # so far is what follows it.
    span: tuple[int, int] = (0, 0)

    @property
    def answer(self) -> int:
        return self.values[-1]


def _apply(op: str, a: int, b: int) -> int:
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    return a * b


def _phrase(op: Op, k: int, poss: str, obj: str, rng: random.Random) -> str:
    if op == "add":
        return f"{rng.choice(_ADD_VERBS)} {k} more {obj}"
    if op == "sub":
        return f"{rng.choice(_SUB_VERBS)} {k} {obj}"
    return f"{_MUL_WORDS[k]} {poss} {obj}" if k in _MUL_WORDS else f"multiplies {poss} {obj} by {k}"


def _question(name: str, obj: str, start: int, phrases: list[str]) -> str:
    sentences = [f"{name} starts with {start} {obj}."]
    sentences += [f"Then {name} {p}." for p in phrases]
    sentences.append(f"How many {obj} does {name} have at the end?")
    return " ".join(sentences)


def _step_body(name: str, phrase: str, a: int, symbol: str, b: int, result: int) -> str:
    return f"{name} {phrase}: {a} {symbol} {b} = {result}."


def make_problems(n: int, steps: int | tuple[int, int], seed: int) -> list[dict]:
    """``n`` distinct GSM8K-layout rows ``{"question", "answer": "<worked solution>\\n#### N"}``.

    Values stay positive integers below ``MAX_VALUE``; multiplication is by 2..5 only (never 0
    or 1, which would make a wrong operation indistinguishable). Deterministic for ``seed``.
    """
    lo, hi = (steps, steps) if isinstance(steps, int) else steps
    if n < 0 or lo < 1 or hi < lo:
        raise ValueError("need n >= 0 and 1 <= min steps <= max steps")
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n:
        name, poss = rng.choice(_NAMES)
        obj = rng.choice(_OBJECTS)
        value = start = rng.randint(2, 40)
        phrases: list[str] = []
        lines: list[str] = []
        for _ in range(rng.randint(lo, hi)):
            allowed: list[Op] = ["add"] + (["sub"] if value >= 3 else []) + (["mul"] if value * 2 <= 50_000 else [])
            op = rng.choice(allowed)
            if op == "add":
                k = rng.randint(1, max(10, min(value, 60)))
            elif op == "sub":
                k = rng.randint(1, min(value - 1, 60))
            else:
                k = rng.choice([m for m in (2, 2, 3, 3, 4, 5) if value * m <= 50_000])
            phrase = _phrase(op, k, poss, obj, rng)
            result = _apply(op, value, k)
            phrases.append(phrase)
            lines.append(_step_body(name, phrase, value, _SYMBOL[op], k, result))
            value = result
        question = _question(name, obj, start, phrases)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": "\n".join(lines) + f"\n#### {value}"})
    return rows


@lru_cache(maxsize=1024)
def _sentence_patterns(name: str, obj: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Operation sentence and closing question for one (name, object): the name and object are
    matched literally, so an operation sentence cannot be read as belonging to another problem."""
    n, o = re.escape(name), re.escape(obj)
    verbs_add = "|".join(_ADD_VERBS)
    verbs_sub = "|".join(_SUB_VERBS)
    operation = re.compile(
        rf"\s*Then {n} (?P<phrase>(?:{verbs_add}) (?P<add>\d+) more {o}"
        rf"|(?:{verbs_sub}) (?P<sub>\d+) {o}"
        rf"|(?P<word>doubles|triples) (?:her|his) {o}"
        rf"|multiplies (?:her|his) {o} by (?P<mul>\d+))\."
    )
    closing = re.compile(rf"\s*How many {o} does {n} have at the end\?")
    return operation, closing


def _parse_at(text: str, start: re.Match[str]) -> Problem | None:
    name, obj = start.group(1), start.group(3)
    operation, closing = _sentence_patterns(name, obj)
    value = int(start.group(2))
    ops: list[tuple[Op, int]] = []
    phrases: list[str] = []
    values = [value]
    position = start.end()
    while (match := operation.match(text, position)) is not None:
        if match.group("add") is not None:
            op, k = "add", int(match.group("add"))
        elif match.group("sub") is not None:
            op, k = "sub", int(match.group("sub"))
        elif match.group("word") is not None:
            op, k = "mul", 2 if match.group("word") == "doubles" else 3
        else:
            op, k = "mul", int(match.group("mul"))
        value = _apply(op, value, k)
        ops.append((op, k))
        phrases.append(match.group("phrase"))
        values.append(value)
        position = match.end()
    end = closing.match(text, position)
    if end is None or not ops:
        return None
    return Problem(name, obj, values[0], tuple(ops), tuple(phrases), tuple(values), (start.start(), end.end()))


@lru_cache(maxsize=4096)
def parse_problem(text: str) -> Problem | None:
    """The last complete problem in ``text`` (a few-shot prompt ends with the one to solve), or None.

    Cached: every continuation of one problem carries the same question text.
    """
    found: Problem | None = None
    for start in _START.finditer(text):
        found = _parse_at(text, start) or found
    return found


# --------------------------------------------------------------------------------------------
# Ground truth


@dataclass(frozen=True, slots=True)
class StepTruth:
    """``correct``: the step's carried result equals the true running value. ``value``: the exact
    probability that the policy, continuing after this step, ends with the right answer."""

    correct: bool
    value: float


def _progress(text: str, done: int, carried: int) -> tuple[int, int]:
    """Operations done and the carried value after the equations in ``text``."""
    for match in _EQUATION.finditer(text):
        done += 1
        carried = int(match.group(4))
    return done, carried


def _continuation_value(right: bool, remaining: int, config: WorldConfig) -> float:
    """P(final answer right) with ``remaining`` steps to go, from a right or wrong carried value.

    A two-state Markov chain. From a right value a step stays right with probability q and
    goes wrong otherwise; from a wrong value it returns to right only by recovering (r) and
    then not erring (q). A wrong value never becomes right by accident (see ``SyntheticBackend``).
    """
    q, r = config.step_success, config.recover_rate
    from_right, from_wrong = 1.0, 0.0
    for _ in range(remaining):
        from_right, from_wrong = (
            q * from_right + (1 - q) * from_wrong,
            r * q * from_right + (1 - r * q) * from_wrong,
        )
    return from_right if right else from_wrong


def _require_problem(question: str) -> Problem:
    problem = parse_problem(question)
    if problem is None:
        raise ValueError("not a synthetic-world problem: " + question[:120])
    return problem


def step_truths(question: str, steps: list[str], config: WorldConfig) -> list[StepTruth]:
    """Ground truth for each step of a solution of ``question``.

    A step's operations are its equations (``a op b = c``, one per operation in the world's own
    solutions); a step without one carries the previous value unchanged. Correctness is judged on
    the carried value only: a step that copies an earlier wrong result is itself incorrect, as
    in ProcessBench. The last operation's step has value 1.0 if right, else 0.0.
    """
    problem = _require_problem(question)
    total = len(problem.ops)
    done, carried = 0, problem.start
    truths = []
    for step in steps:
        done, carried = _progress(step, done, carried)
        right = carried == problem.values[min(done, total)]
        truths.append(StepTruth(right, _continuation_value(right, max(0, total - done), config)))
    return truths


def first_error(question: str, steps: list[str]) -> int:
    """0-based index of the first incorrect step, -1 if every step is correct."""
    problem = _require_problem(question)
    done, carried = 0, problem.start
    for index, step in enumerate(steps):
        done, carried = _progress(step, done, carried)
        if carried != problem.values[min(done, len(problem.ops))]:
            return index
    return -1


def prefix_value(question: str, steps: list[str], config: WorldConfig) -> float:
    """P(right final answer) continuing after ``steps``; the empty prefix gives the problem's solve
    rate (q^n without recovery)."""
    if not steps:
        return _continuation_value(True, len(_require_problem(question).ops), config)
    return step_truths(question, steps, config)[-1].value


# --------------------------------------------------------------------------------------------
# The policy


def tokenize(text: str) -> list[str]:
    """The world's tokens: whitespace-led words; they concatenate back to ``text`` exactly."""
    return _TOKEN.findall(text)


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


class SyntheticBackend:
    """A ``Backend`` whose policy is the synthetic world's; a benchmark instrument, never a default model.

    Per remaining operation the step (1) starts from the carried value, or after an error with
    probability ``recover_rate`` from the true running value; (2) uses a wrong operation with
    probability ``wrong_op_rate``; else (3) slips with probability ``slip_rate`` (conditionally
    ``slip_rate / (1 - wrong_op_rate)``). A slip's offset, and the choice between two wrong
    operations, avoid the true value, so a wrong value never turns right by accident and the
    ground-truth formulas are exact; the one residual case (both wrong operations land on the
    true value, e.g. carried 2, "loses 2", true 4) is left as it is. Temperature 0 is greedy:
    no errors, and recovery iff ``recover_rate > 0.5``. Other temperatures and ``top_p`` do
    not change the rates.
    """

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        # The rates are the weights: a different rate must never hit another rate's cache.
        # How many samples run at once never changes a sample, so it stays out of the identity.
        # (``phrasings`` enters only when it is not 1, so worlds from before it keep their ids.)
        identity = {"max_in_flight"} | ({"phrasings"} if self.config.phrasings == 1 else set())
        self.model_id = "synthetic-world@" + content_hash(self.config.model_dump(exclude=identity))
        self.max_in_flight = self.config.max_in_flight
        self.supports_json_schema = False  # its policy writes arithmetic, not judgements

    async def generate(self, request: GenerationRequest, seed: int) -> Generation:
        return self.sample(request, seed)

    def sample(self, request: GenerationRequest, seed: int) -> Generation:
        """Synchronous ``generate``: the work is pure CPU and microseconds long."""
        problem, prefix = _read_request(request)
        if problem is None:
            # Not an error: a labeller fed a foreign problem should see a failed solution, not a crash.
            tokens = tokenize(UNSOLVABLE_TEXT)
            logprobs = [0.0] * len(tokens)
        else:
            tokens, logprobs = self._continue(problem, prefix, request.temperature, random.Random(seed))
        return _finish(tokens, logprobs, request)

    def count_tokens(self, text: str) -> int:
        return len(tokenize(text))

    def close(self) -> None:
        pass

    def _continue(
        self, problem: Problem, prefix: str, temperature: float, rng: random.Random
    ) -> tuple[list[str], list[float]]:
        config = self.config
        greedy = temperature <= 0
        w, s, r = config.wrong_op_rate, config.slip_rate, config.recover_rate
        # The slip decision is taken only when the operation is right, hence conditional.
        slip_given_right_op = s / (1 - w) if w < 1 else 0.0
        done, carried = _progress(prefix, 0, problem.start)
        total = len(problem.ops)
        # Continue in the prefix's own layout ("Step k:" headers, or blank lines), so the caller's
        # splitter finds the same step boundaries in prefix + continuation.
        header = _STEP_HEADER_AT_END.search(prefix)
        if header is not None:
            lead = "" if prefix[-1:].isspace() else " "
        elif not prefix or prefix[-1:].isspace():
            lead = ""
        else:
            lead = "\n\n" if done else " "
        next_header = int(header.group(1)) + 1 if header is not None else 0

        tokens: list[str] = []
        logprobs: list[float] = []

        def forced(text: str) -> None:
            pieces = _TOKEN.findall(text)
            tokens.extend(pieces)
            logprobs.extend([0.0] * len(pieces))

        def separator() -> str:
            nonlocal next_header
            if not tokens:
                return lead
            if header is None:
                return "\n\n"
            next_header += 1
            return f"\nStep {next_header - 1}: "

        if done >= total:
            forced(separator() + f"The answer is \\boxed{{{carried}}}.")
            return tokens, logprobs

        for index in range(done, total):
            op, k = problem.ops[index]
            truth_before, truth_after = problem.values[index], problem.values[index + 1]
            left, left_lp = carried, 0.0
            if carried != truth_before and 0 < r:
                recover = r > 0.5 if greedy else rng.random() < r
                left, left_lp = (truth_before, _log(r)) if recover else (carried, _log(1 - r))
            u = 1.0 if greedy else rng.random()
            if u < w:
                used = next((o for o in _WRONG_OPS[op] if _apply(o, left, k) != truth_after), _WRONG_OPS[op][0])
                result, op_lp, result_lp = _apply(used, left, k), _log(w), 0.0
            else:
                used, result = op, _apply(op, left, k)
                op_lp = _log(1 - w)
                if u < w + s:
                    deltas = [d for d in _SLIP_DELTAS if result + d != truth_after]
                    result += rng.choice(deltas)
                    result_lp = _log(slip_given_right_op)
                else:
                    result_lp = _log(1 - slip_given_right_op)
            # The wording is drawn only when there is a choice, so phrasings=1 consumes no randomness.
            wording = 0 if config.phrasings == 1 or greedy else rng.randrange(config.phrasings)
            opening = LEAD_INS[wording].format(name=problem.name, phrase=problem.phrases[index])
            start = len(tokens)
            forced(separator() + opening)
            if config.phrasings > 1:
                logprobs[start] = _log(1 / config.phrasings)  # the wording choice shows on its first token
            tokens.extend([f" {left}", f" {_SYMBOL[used]}", f" {k}", " =", f" {result}."])
            logprobs.extend([left_lp, op_lp, 0.0, 0.0, result_lp])
            carried = result
        forced(f" The answer is \\boxed{{{carried}}}.")
        return tokens, logprobs


def _read_request(request: GenerationRequest) -> tuple[Problem | None, str]:
    """The problem and the solution written so far: a chat's user turn and assistant prefix, or a
    raw prompt's problem and whatever follows it."""
    if request.prompt is not None:
        problem = parse_problem(request.prompt)
        return problem, (request.prompt[problem.span[1]:] if problem else "")
    for role, content in reversed(request.messages or ()):
        if role == "user" and (problem := parse_problem(content)) is not None:
            return problem, request.assistant_prefix
    return None, request.assistant_prefix


def _finish(tokens: list[str], logprobs: list[float], request: GenerationRequest) -> Generation:
    """Apply the stop strings and the token budget the way a streaming engine would."""
    text = "".join(tokens)
    finish = "stop"
    cut = min((i for i in (text.find(s) for s in request.stop if s) if i >= 0), default=-1)
    if cut >= 0:
        # The stop string is seen when the token holding its end is generated, which must
        # be within the budget; the stop string itself is not returned.
        stop_end = min(cut + len(s) for s in request.stop if s and text.find(s) == cut)
        offset, needed = 0, 0
        for needed, token in enumerate(tokens, 1):
            offset += len(token)
            if offset >= stop_end:
                break
        if needed <= request.max_tokens:
            text = text[:cut]
            kept = tokenize(text)
            # A cut inside a token leaves a piece of it: it keeps that token's logprob.
            tokens, logprobs = kept, logprobs[: len(kept)]
        else:
            cut = -1
    if cut < 0 and len(tokens) > request.max_tokens:
        tokens, logprobs, finish = tokens[: request.max_tokens], logprobs[: request.max_tokens], "length"
        text = "".join(tokens)
    return Generation(
        text=text,
        num_tokens=len(tokens),
        finish_reason=finish,
        logprobs=tuple(logprobs) if request.logprobs else None,
        token_bytes=tuple(len(t.encode("utf-8")) for t in tokens),
    )


# --------------------------------------------------------------------------------------------
# OpenAI protocol


def choice_seed(seed: int, index: int) -> int:
    """Sampler seed of choice ``index`` of a request seeded ``seed``: n choices differ, and each
    is reproducible by calling the backend directly with this seed."""
    return int(content_hash("synthetic-choice", seed, index)[:8], 16) & 0x7FFFFFFF


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(default=1, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    # Without a seed each call draws fresh samples, as OpenAI does: a client that never sends
    # one must still get independent Monte Carlo completions.
    seed: int | None = None

    def request_fields(self) -> dict[str, Any]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return {
            "temperature": self.temperature, "top_p": self.top_p,
            "max_tokens": self.max_completion_tokens or self.max_tokens or 1024, "stop": stop,
        }

    def base_seed(self) -> int:
        return self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)


class _ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    logprobs: bool = False
    continue_final_message: bool = False


class _CompletionBody(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = None


def create_app(
    config: WorldConfig | None = None, *, latency: LatencyModel | None = None, capacity: int | None = None
) -> FastAPI:
    """An OpenAI-compatible server over the synthetic policy: ``/v1/models``, ``/v1/chat/completions``
    (with vLLM's ``continue_final_message``) and ``/v1/completions``; a simulated continuous-batching
    engine (``batching.BatchSimulator``: ``latency``, at most ``capacity`` running) whose occupancy
    meter is ``GET /metrics`` (``POST /metrics/reset`` starts a new window). The defaults (no latency,
    unbounded capacity) answer at once. Latency never changes what is sampled.

    FastAPI is imported here, not at module level, so the backend itself needs only pydantic.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    backend = SyntheticBackend(config)
    simulator = BatchSimulator(latency, capacity)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Shutdown (SIGINT/SIGTERM under uvicorn): the last window in one line.
        print(simulator.summary(), file=sys.stderr, flush=True)

    app = FastAPI(title="stepforge synthetic world (simulated batching server)", lifespan=lifespan)
    app.state.backend = backend
    app.state.simulator = simulator

    def usage(prompt_text: str, generations: list[Generation]) -> dict[str, int]:
        prompt_tokens = backend.count_tokens(prompt_text)
        completion = sum(g.num_tokens for g in generations)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": backend.model_id, "object": "model", "created": 0, "owned_by": "stepforge"}]}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return simulator.snapshot()

    @app.post("/metrics/reset")
    async def metrics_reset() -> dict[str, Any]:
        """Start a new measurement window; returns the window it closed."""
        return simulator.reset()

    @app.post("/v1/chat/completions")
    async def chat(body: _ChatBody) -> dict[str, Any]:
        messages = [(m.role, m.text()) for m in body.messages]
        prefix = ""
        if body.continue_final_message and messages[-1][0] == "assistant":
            prefix = messages.pop()[1]
        elif messages[-1][0] == "assistant":
            messages.pop()  # a new assistant turn follows; the old one is context only
        request = GenerationRequest(
            messages=tuple(messages), assistant_prefix=prefix, logprobs=body.logprobs, **body.request_fields()
        )
        seed = body.base_seed()
        async with simulator.slot() as slot:
            generations = [backend.sample(request, choice_seed(seed, i)) for i in range(body.n)]
            counts = usage("".join(text for _, text in messages) + prefix, generations)
            longest = max((g.num_tokens for g in generations), default=0)  # choices decode side by side
            await slot.hold(longest, counts["completion_tokens"], counts["prompt_tokens"])
        choices = []
        for i, g in enumerate(generations):
            logprobs = None
            if body.logprobs and g.logprobs is not None:
                logprobs = {"content": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                    for t, lp in zip(tokenize(g.text), g.logprobs)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": g.text},
                            "finish_reason": g.finish_reason, "logprobs": logprobs})
        return {
            "id": "chatcmpl-" + content_hash("chat", body.model_dump(), seed), "object": "chat.completion",
            "created": int(time.time()), "model": backend.model_id, "choices": choices, "usage": counts,
        }

    @app.post("/v1/completions")
    async def completions(body: _CompletionBody) -> dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        seed = body.base_seed()
        generations = []
        async with simulator.slot() as slot:
            for p_index, prompt in enumerate(prompts):
                request = GenerationRequest(prompt=prompt, logprobs=body.logprobs is not None, **body.request_fields())
                generations += [backend.sample(request, choice_seed(seed, p_index * body.n + i)) for i in range(body.n)]
            counts = usage("".join(prompts), generations)
            longest = max((g.num_tokens for g in generations), default=0)  # choices decode side by side
            await slot.hold(longest, counts["completion_tokens"], counts["prompt_tokens"])
        choices = []
        for p_index, prompt in enumerate(prompts):
            for i in range(body.n):
                index = p_index * body.n + i
                g = generations[index]
                logprobs = None
                if g.logprobs is not None:
                    tokens = tokenize(g.text)
                    offsets = [len(prompt) + sum(len(t) for t in tokens[:j]) for j in range(len(tokens))]
                    logprobs = {"tokens": tokens, "token_logprobs": list(g.logprobs),
                                "top_logprobs": None, "text_offset": offsets}
                choices.append({"index": index, "text": g.text, "finish_reason": g.finish_reason,
                                "logprobs": logprobs})
        return {
            "id": "cmpl-" + content_hash("completion", body.model_dump(), seed), "object": "text_completion",
            "created": int(time.time()), "model": backend.model_id, "choices": choices, "usage": counts,
        }

    return app


# --------------------------------------------------------------------------------------------
# CLI


def _steps_arg(text: str) -> int | tuple[int, int]:
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi)) if hi else int(lo)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="stepforge world",
        description="The synthetic world: a benchmark instrument with known step values.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Serve the synthetic policy over the OpenAI protocol.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    defaults = WorldConfig()
    serve.add_argument("--slip-rate", type=float, default=defaults.slip_rate)
    serve.add_argument("--wrong-op-rate", type=float, default=defaults.wrong_op_rate)
    serve.add_argument("--recover-rate", type=float, default=defaults.recover_rate)
    engine = serve.add_argument_group(
        "simulated batching", "Latency and capacity of a continuous-batching engine (see /metrics). "
        "A request holds a slot for TTFT + tokens * TPOT * (1 + running / S) ms.")
    engine.add_argument("--capacity", type=_positive_int, default=None,
                        help="Requests running at once; the rest wait in a FIFO queue (default: unbounded).")
    engine.add_argument("--ttft-ms", type=float, default=0.0, help="Time to first token, ms (default 0).")
    engine.add_argument("--tpot-ms", type=float, default=0.0, help="Time per output token, ms (default 0).")
    engine.add_argument("--batch-slowdown", type=float, default=0.0, metavar="S",
                        help="A token costs TPOT * (1 + running / S); 0 (default): no slowdown.")
    problems = commands.add_parser("problems", help="Write GSM8K-layout problems as JSONL to stdout.")
    problems.add_argument("--n", type=int, default=20)
    problems.add_argument("--steps", type=_steps_arg, default=(3, 6), help="N or MIN-MAX operations.")
    problems.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "problems":
        for row in make_problems(args.n, args.steps, args.seed):
            sys.stdout.write(json.dumps(row) + "\n")
        return
    import uvicorn

    config = WorldConfig(slip_rate=args.slip_rate, wrong_op_rate=args.wrong_op_rate, recover_rate=args.recover_rate)
    try:
        latency = LatencyModel(args.ttft_ms, args.tpot_ms, args.batch_slowdown)
    except ValueError as error:
        serve.error(str(error))
    app = create_app(config, latency=latency, capacity=args.capacity)
    # The app prints its occupancy summary at shutdown (SIGINT/SIGTERM), from its lifespan.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
