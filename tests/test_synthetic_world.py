"""The synthetic world: problems, the policy's error model, its exact ground truth, and its server.

The world is a measuring instrument for step labellers, so these tests check above all that
what the backend samples agrees with what the ground-truth functions claim.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from asgi_server import serving
from stepforge.schemas.records import Problem as ProblemRecord
from stepforge.stages.rollout.answers import extract_final_answer, gsm8k_gold_answer
from stepforge.stages.ingest.sources import IngestConfig
from stepforge.stages.ingest.sources import run as ingest
from stepforge.stages.llm.base import GenerationClient, GenerationRequest
from stepforge.stages.instruments.synthetic import (
    SyntheticBackend,
    WorldConfig,
    choice_seed,
    create_app,
    first_error,
    make_problems,
    parse_problem,
    prefix_value,
    step_truths,
    tokenize,
)
from stepforge.stages.rollout.split import SplitConfig, split_steps

TEMPLATE = "{question}\n\nSolve it step by step. Separate the steps with a blank line. End with \\boxed{{}}."
EQUATION = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
# Ava: 7 -> 12 -> 9 -> 18
AVA = (
    "Ava starts with 7 marbles. Then Ava finds 5 more marbles. Then Ava gives away 3 marbles. "
    "Then Ava doubles her marbles. How many marbles does Ava have at the end?"
)
AVA_RIGHT = [
    "Ava finds 5 more marbles: 7 + 5 = 12.",
    "Ava gives away 3 marbles: 12 - 3 = 9.",
    "Ava doubles her marbles: 9 * 2 = 18. The answer is \\boxed{18}.",
]


def sample(backend: SyntheticBackend, request: GenerationRequest, seed: int):
    return asyncio.run(backend.generate(request, seed))


def sample_many(backend: SyntheticBackend, request: GenerationRequest, seeds: range) -> list[str]:
    """Texts of many samples in one event loop (an event loop per sample costs more than the sample)."""

    async def all_of() -> list:
        return await asyncio.gather(*(backend.generate(request, seed) for seed in seeds))

    return [g.text for g in asyncio.run(all_of())]


def chat(question: str, prefix: str = "", **kw) -> GenerationRequest:
    return GenerationRequest(
        messages=(("system", "Reason step by step."), ("user", TEMPLATE.format(question=question))),
        assistant_prefix=prefix, **kw,
    )


def equations(text: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(text)]


def evaluate(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def within_binomial(successes: int, trials: int, p: float, sigmas: float = 4.5) -> bool:
    """|observed - expected| within ``sigmas`` binomial standard deviations (plus one count of slack)."""
    return abs(successes - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p)) + 1


# ------------------------------------------------------------------------------------ problems


def test_problem_generation_is_deterministic_and_parses_back() -> None:
    rows = make_problems(40, (2, 7), seed=3)
    assert rows == make_problems(40, (2, 7), seed=3)
    assert rows != make_problems(40, (2, 7), seed=4)
    assert len({r["question"] for r in rows}) == 40
    assert len({parse_problem(r["question"]).name for r in rows}) > 5, "names should vary"
    for row in rows:
        assert set(row) == {"question", "answer"}
        problem = parse_problem(row["question"])
        assert problem is not None
        assert 2 <= len(problem.ops) <= 7
        assert all(0 < v < 10**6 for v in problem.values)
        assert all(k >= 2 for op, k in problem.ops if op == "mul")
        assert gsm8k_gold_answer(row["answer"]) == str(problem.answer)
        worked = row["answer"].rsplit("\n####", 1)[0].split("\n")
        assert first_error(row["question"], worked) == -1
        assert [c for *_, c in equations(row["answer"])] == list(problem.values[1:])
    assert make_problems(3, 4, seed=0) == make_problems(3, (4, 4), seed=0)
    assert all(len(parse_problem(r["question"]).ops) == 4 for r in make_problems(10, 4, seed=1))


def test_parse_problem_finds_the_last_problem_in_any_text() -> None:
    problem = parse_problem(AVA)
    assert (problem.start, problem.ops, problem.values) == (7, (("add", 5), ("sub", 3), ("mul", 2)), (7, 12, 9, 18))
    assert problem.phrases == ("finds 5 more marbles", "gives away 3 marbles", "doubles her marbles")
    assert parse_problem(TEMPLATE.format(question=AVA)) == problem
    other = make_problems(1, 3, seed=9)[0]["question"]
    few_shot = f"Question: {other}\nAnswer: 1 + 1 = 2.\n\nQuestion: {AVA}\nAnswer:"
    found = parse_problem(few_shot)
    assert found.values == problem.values and few_shot[found.span[0]: found.span[1]] == AVA
    assert parse_problem("What is 2 + 2?") is None
    assert parse_problem(AVA.replace(" How many marbles does Ava have at the end?", "")) is None
    assert parse_problem(AVA.replace("Then Ava gives", "Then Liam gives")) is None, "a sentence about someone else"


def test_problems_ingest_as_gsm8k_rows(tmp_path: Path) -> None:
    rows = make_problems(5, (3, 5), seed=11)
    source = tmp_path / "world.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = list(ingest(IngestConfig(source=str(source), format="gsm8k")))
    assert all(isinstance(r, ProblemRecord) for r in records)
    assert [r.gold_answer for r in records] == [str(parse_problem(r["question"]).answer) for r in rows]


def test_cli_writes_the_same_problems() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stepforge.stages.instruments.synthetic", "problems", "--n", "6", "--steps", "3-6", "--seed", "2"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    assert [json.loads(line) for line in out.splitlines()] == make_problems(6, (3, 6), seed=2)


def test_config_validation_and_model_id() -> None:
    with pytest.raises(ValidationError):
        WorldConfig(slip_rate=0.6, wrong_op_rate=0.5)
    with pytest.raises(ValidationError):
        WorldConfig(slip=0.1)
    assert all(f.description for f in WorldConfig.model_fields.values())
    a, b = SyntheticBackend(WorldConfig()), SyntheticBackend(WorldConfig(slip_rate=0.11))
    assert a.model_id.startswith("synthetic-world@") and a.model_id != b.model_id
    assert a.model_id == SyntheticBackend(WorldConfig()).model_id
    assert a.max_in_flight == 256


# ------------------------------------------------------------------------------------- policy


def test_backend_is_deterministic_and_writes_one_step_per_operation() -> None:
    backend = SyntheticBackend(WorldConfig(slip_rate=0.2, wrong_op_rate=0.2))
    texts = set()
    for row in make_problems(10, (2, 6), seed=5):
        problem = parse_problem(row["question"])
        for seed in range(5):
            request = chat(row["question"])
            out = sample(backend, request, seed)
            assert out == sample(backend, request, seed)
            texts.add(out.text)
            steps = split_steps(out.text, SplitConfig())
            assert len(steps) == len(problem.ops)
            assert all(len(equations(s)) == 1 for s in steps)
            last = equations(steps[-1])[0][3]
            assert steps[-1].endswith(f" The answer is \\boxed{{{last}}}.")
            assert extract_final_answer(out.text) == str(last)
            assert out.finish_reason == "stop"
            assert all(s.startswith(problem.name + " " + phrase) for s, phrase in zip(steps, problem.phrases))
    assert len(texts) > 40, "different seeds must give different solutions"


def test_temperature_zero_is_a_correct_solution() -> None:
    backend = SyntheticBackend(WorldConfig(slip_rate=0.4, wrong_op_rate=0.4))
    for row in make_problems(10, (2, 6), seed=6):
        for seed in range(3):
            out = sample(backend, chat(row["question"], temperature=0.0), seed)
            steps = split_steps(out.text, SplitConfig())
            assert first_error(row["question"], steps) == -1
            assert extract_final_answer(out.text) == gsm8k_gold_answer(row["answer"])


def test_a_wrong_prefix_propagates_without_recovery_and_heals_with_it() -> None:
    wrong = ["Ava finds 5 more marbles: 7 + 5 = 13."]
    prefix = "\n\n".join(wrong) + "\n\n"
    propagating = SyntheticBackend(WorldConfig(recover_rate=0.0))
    for seed in range(50):
        text = sample(propagating, chat(AVA, prefix), seed).text
        assert equations(text)[0][0] == 13, "the next step computes from the carried wrong value"
        assert extract_final_answer(text) != "18"
    healing = SyntheticBackend(WorldConfig(recover_rate=1.0))
    text = sample(healing, chat(AVA, prefix, temperature=0.0), 0).text
    assert equations(text)[0][0] == 12
    assert extract_final_answer(text) == "18"
    # Greedy decoding takes the likelier side of the recovery choice, whatever the seed.
    for rate, left in ((0.4, 13), (0.6, 12)):
        greedy = SyntheticBackend(WorldConfig(recover_rate=rate))
        assert {equations(sample(greedy, chat(AVA, prefix, temperature=0.0), s).text)[0][0] for s in range(30)} == {left}
    # The same prefix written in step_prefix mode, and as the tail of a raw prompt.
    stepped = sample(propagating, chat(AVA, "Step 1: " + wrong[0] + "\nStep 2:", temperature=0.0), 0).text
    assert stepped.startswith(" Ava gives away 3 marbles: 13 - 3 = 10.\nStep 3: Ava doubles")
    raw = GenerationRequest(prompt=f"Question: {AVA}\nAnswer: {wrong[0]}", temperature=0.0)
    assert sample(propagating, raw, 0).text == (
        "\n\nAva gives away 3 marbles: 13 - 3 = 10.\n\nAva doubles her marbles: 10 * 2 = 20. "
        "The answer is \\boxed{20}."
    )
    done = sample(propagating, chat(AVA, "\n\n".join(AVA_RIGHT[:2]) + "\n\n" + "9 * 2 = 18.\n\n"), 0).text
    assert done == "The answer is \\boxed{18}."


def test_error_kinds_occur_at_their_rates_and_only_slips_are_calculator_detectable() -> None:
    config = WorldConfig(slip_rate=0.2, wrong_op_rate=0.3)
    backend = SyntheticBackend(config)
    rows = make_problems(20, 4, seed=7)
    slips = wrong_ops = steps = 0
    for index, row in enumerate(rows):
        problem = parse_problem(row["question"])
        texts = sample_many(backend, chat(row["question"]), range(index * 100, (index + 1) * 100))
        for (op, k), (a, symbol, b, c) in (pair for t in texts for pair in zip(problem.ops, equations(t))):
            steps += 1
            assert b == k
            if symbol != SYMBOL[op]:
                wrong_ops += 1
                assert evaluate(a, symbol, b) == c, "a wrong operation is computed correctly"
            elif evaluate(a, symbol, b) != c:
                slips += 1
                assert 0 < abs(evaluate(a, symbol, b) - c) <= 3, "a slip is off by a small amount"
    assert steps == 8000
    assert within_binomial(slips, steps, config.slip_rate), slips
    assert within_binomial(wrong_ops, steps, config.wrong_op_rate), wrong_ops


def test_a_wrong_value_never_turns_right_by_accident() -> None:
    """The ground truth is exact only if errors from a wrong value stay wrong: "gives away 3" from a
    carried 6 must not be miscomputed as 6 + 3 = 9 (the true value), nor slipped from 10 - 3 to 9."""
    wrong_ops = SyntheticBackend(WorldConfig(slip_rate=0.0, wrong_op_rate=1.0))
    slips = SyntheticBackend(WorldConfig(slip_rate=1.0, wrong_op_rate=0.0))
    for seed in range(100):
        a, op, b, c = equations(sample(wrong_ops, chat(AVA, "Ava finds 5 more marbles: 7 + 5 = 6.\n\n"), seed).text)[0]
        assert (a, b) == (6, 3) and op != "-" and evaluate(a, op, b) == c != 9
        a, op, b, c = equations(sample(slips, chat(AVA, "Ava finds 5 more marbles: 7 + 5 = 10.\n\n"), seed).text)[0]
        assert (a, op, b) == (10, "-", 3) and c not in (7, 9)


# ---------------------------------------------------------------------------------- ground truth


def test_step_truths_and_first_error_on_hand_made_solutions() -> None:
    config = WorldConfig(slip_rate=0.1, wrong_op_rate=0.1)  # q = 0.8
    truths = step_truths(AVA, AVA_RIGHT, config)
    assert [t.correct for t in truths] == [True, True, True]
    assert [t.value for t in truths] == pytest.approx([0.64, 0.8, 1.0])
    assert first_error(AVA, AVA_RIGHT) == -1
    assert prefix_value(AVA, [], config) == pytest.approx(0.512)
    assert prefix_value(AVA, AVA_RIGHT[:1], config) == pytest.approx(0.64)

    slipped = [AVA_RIGHT[0], "Ava gives away 3 marbles: 12 - 3 = 10.", "Ava doubles her marbles: 10 * 2 = 20."]
    assert first_error(AVA, slipped) == 1
    truths = step_truths(AVA, slipped, config)
    assert [(t.correct, t.value) for t in truths] == [(True, pytest.approx(0.64)), (False, 0.0), (False, 0.0)]
    # Recovery: from a wrong value with one step left, recover (r) and then do not err (q).
    assert prefix_value(AVA, slipped[:2], config.model_copy(update={"recover_rate": 0.5})) == pytest.approx(0.4)

    wrong_op = ["Ava finds 5 more marbles: 7 - 5 = 2.", "Ava gives away 3 marbles: 2 - 3 = -1."]
    assert first_error(AVA, wrong_op) == 0
    assert [t.correct for t in step_truths(AVA, wrong_op, config)] == [False, False]

    # Steps without an equation carry the value; "Step k:" headers do not count as numbers.
    chatty = ["Let's start.", "Step 1: 7 + 5 = 12.", "Step 2: 12 - 3 = 9.", "So far so good."]
    assert [t.correct for t in step_truths(AVA, chatty, config)] == [True] * 4
    assert [t.value for t in step_truths(AVA, chatty, config)] == pytest.approx([0.512, 0.64, 0.8, 0.8])
    with pytest.raises(ValueError):
        first_error("What is 2 + 2?", ["2 + 2 = 4."])


def test_analytic_prefix_values_match_the_backend() -> None:
    config = WorldConfig(slip_rate=0.15, wrong_op_rate=0.1, recover_rate=0.3)
    backend = SyntheticBackend(config)
    row = make_problems(1, 5, seed=12)[0]
    question, gold = row["question"], gsm8k_gold_answer(row["answer"])
    right = row["answer"].split("\n")[:5]
    a, op, b, c = equations(right[1])[0]
    wrong_2 = [right[0], right[1].replace(f"= {c}.", f"= {c + 2}.")]
    wrong_1 = [right[0].replace(f"= {equations(right[0])[0][3]}.", f"= {equations(right[0])[0][3] - 1}.")]
    trials = 3000
    prefixes = [[], right[:2], wrong_2, wrong_1, right[:4]]
    expected = [prefix_value(question, p, config) for p in prefixes]
    assert expected[0] > 0.75**5 and expected[4] == pytest.approx(0.75), "recovery lifts the solve rate above q^n"
    assert 0 < expected[2] < expected[3] < expected[1], "recovery makes a wrong prefix worth something"
    for prefix, value in zip(prefixes, expected):
        request = chat(question, "".join(s + "\n\n" for s in prefix))
        successes = sum(extract_final_answer(text) == gold for text in sample_many(backend, request, range(trials)))
        assert within_binomial(successes, trials, value), (prefix, successes / trials, value)

    never = SyntheticBackend(config.model_copy(update={"recover_rate": 0.0}))
    request = chat(question, "\n\n".join(wrong_2) + "\n\n")
    assert not any(extract_final_answer(text) == gold for text in sample_many(never, request, range(500)))
    assert prefix_value(question, wrong_2, never.config) == 0.0

    # Each sampled solution's last-step truth is its outcome.
    for text in sample_many(backend, chat(question), range(300)):
        steps = split_steps(text, SplitConfig())
        truths = step_truths(question, steps, config)
        assert truths[-1].value == float(extract_final_answer(text) == gold)
        if first_error(question, steps) == -1:
            assert extract_final_answer(text) == gold


# ------------------------------------------------------------------------------ tokens and limits


def test_tokens_bytes_and_logprobs() -> None:
    backend = SyntheticBackend(WorldConfig(slip_rate=0.2, wrong_op_rate=0.2))
    for row in make_problems(5, (2, 5), seed=13):
        for seed in range(20):
            out = sample(backend, chat(row["question"], logprobs=True), seed)
            tokens = tokenize(out.text)
            assert "".join(tokens) == out.text
            assert out.num_tokens == len(tokens) == len(out.token_bytes) == backend.count_tokens(out.text)
            assert sum(out.token_bytes) == len(out.text.encode("utf-8"))
            assert len(out.logprobs) == out.num_tokens
            operators = {i for i, t in enumerate(tokens) if t.strip() in "+-*"}
            results = {i + 1 for i, t in enumerate(tokens) if t == " ="}
            negative = {i for i, lp in enumerate(out.logprobs) if lp < 0}
            assert operators <= negative, "every operator is a choice"
            assert negative <= operators | results, "nothing else is"
            for i in results:  # the result is a choice exactly when the operation was right
                a, sym, b = int(tokens[i - 4]), tokens[i - 3].strip(), int(tokens[i - 2])
                wrong_op = sym != SYMBOL[parse_problem(row["question"]).ops[sorted(results).index(i)][0]]
                assert (i in negative) == (not wrong_op), (a, sym, b)
            assert sample(backend, chat(row["question"]), seed).logprobs is None
    # After a wrong prefix, whether to recover is a choice shown on the left operand.
    recovering = SyntheticBackend(WorldConfig(slip_rate=0.0, wrong_op_rate=0.0, recover_rate=0.3))
    lefts = set()
    for seed in range(40):
        out = sample(recovering, chat(AVA, "Ava finds 5 more marbles: 7 + 5 = 13.\n\n", logprobs=True), seed)
        tokens = tokenize(out.text)
        left = tokens.index(" -") - 1
        lefts.add(tokens[left])
        assert out.logprobs[left] == pytest.approx(math.log(0.3 if tokens[left] == " 12" else 0.7))
        # In this step (the next may face the same choice, if this one did not recover).
        assert [lp for i, lp in enumerate(out.logprobs[: left + 5]) if i != left] == [0.0] * (left + 4)
    assert lefts == {" 12", " 13"}


def test_unparseable_requests_and_a_stop_inside_a_token() -> None:
    backend = SyntheticBackend()
    out = sample(backend, chat("What is 2 + 2?", logprobs=True), 0)
    assert out.text == "I cannot solve this." and extract_final_answer(out.text) is None
    assert out.logprobs == (0.0,) * out.num_tokens
    stop_inside = sample(backend, chat(AVA, temperature=0.0, stop=("rbles: 7",)), 0)
    assert stop_inside.text == "Ava finds 5 more ma" and stop_inside.finish_reason == "stop"
    assert sum(stop_inside.token_bytes) == len(stop_inside.text.encode())


def test_max_tokens_and_stop_are_honoured() -> None:
    backend = SyntheticBackend()
    full = sample(backend, chat(AVA, temperature=0.0, logprobs=True), 0)
    short = sample(backend, chat(AVA, temperature=0.0, logprobs=True, max_tokens=7), 0)
    assert short.finish_reason == "length" and short.num_tokens == 7
    assert short.text == "".join(tokenize(full.text)[:7]) and short.logprobs == full.logprobs[:7]
    first = sample(backend, chat(AVA, temperature=0.0, stop=("\n\n",)), 0)
    assert first.finish_reason == "stop" and first.text == AVA_RIGHT[0]
    # A stop string that would complete only after the budget: the budget wins.
    late = sample(backend, chat(AVA, temperature=0.0, stop=("boxed",), max_tokens=5), 0)
    assert late.finish_reason == "length" and late.num_tokens == 5
    assert sample(backend, chat(AVA, temperature=0.0, stop=("never",)), 0).finish_reason == "stop"


def test_generation_client_samples_are_independent_and_cached_by_model() -> None:
    backend = SyntheticBackend(WorldConfig(slip_rate=0.3, wrong_op_rate=0.3))
    request = chat(AVA, n=8, seed=1)
    first = asyncio.run(GenerationClient(backend).generate(request))
    again = asyncio.run(GenerationClient(SyntheticBackend(backend.config)).generate(request))
    assert [g.text for g in first] == [g.text for g in again]
    assert len({g.text for g in first}) > 1


# ------------------------------------------------------------------------------ OpenAI server


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, WorldConfig]]:
    config = WorldConfig(slip_rate=0.2, wrong_op_rate=0.2)
    with serving(create_app(config)) as url:
        yield url, config


def test_openai_server_serves_the_backend(server: tuple[str, WorldConfig]) -> None:
    import httpx

    url, config = server
    backend = SyntheticBackend(config)
    with httpx.Client(base_url=url, timeout=30) as http:
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [backend.model_id]

        messages = [{"role": "user", "content": TEMPLATE.format(question=AVA)}]
        body = {"model": "x", "messages": messages, "n": 3, "temperature": 0.8, "seed": 5,
                "max_tokens": 200, "logprobs": True}
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["object"] == "chat.completion" and len(data["choices"]) == 3
        request = GenerationRequest(messages=(("user", messages[0]["content"]),), temperature=0.8, max_tokens=200)
        expected = [sample(backend, request, choice_seed(5, i)) for i in range(3)]
        assert [c["message"]["content"] for c in data["choices"]] == [g.text for g in expected]
        assert [c["index"] for c in data["choices"]] == [0, 1, 2]
        assert all(c["message"]["role"] == "assistant" and c["finish_reason"] == "stop" for c in data["choices"])
        assert data["usage"]["completion_tokens"] == sum(g.num_tokens for g in expected)
        content = data["choices"][0]["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == expected[0].text
        assert len({c["message"]["content"] for c in data["choices"]}) > 1 or len(expected) == 1

        prefix = "Ava finds 5 more marbles: 7 + 5 = 13.\n\n"
        cont = http.post("/v1/chat/completions", json={
            "messages": messages + [{"role": "assistant", "content": prefix}], "continue_final_message": True,
            "add_generation_prompt": False, "temperature": 0.0, "seed": 1}).json()
        assert cont["choices"][0]["message"]["content"].startswith("Ava gives away 3 marbles: 13 - 3 = 10.")

        unseeded = [http.post("/v1/chat/completions", json={"messages": messages, "n": 6}).json() for _ in range(2)]
        texts = [[c["message"]["content"] for c in u["choices"]] for u in unseeded]
        assert texts[0] != texts[1], "without a seed, calls draw fresh samples"

        prompt = f"Question: {AVA}\nAnswer:"
        raw = http.post("/v1/completions", json={"prompt": prompt, "n": 2, "seed": 9, "max_tokens": 12,
                                                  "stop": ["\n\n"], "logprobs": 0}).json()
        assert raw["object"] == "text_completion" and len(raw["choices"]) == 2
        request = GenerationRequest(prompt=prompt, temperature=1.0, max_tokens=12, stop=("\n\n",), logprobs=True)
        for i, choice in enumerate(raw["choices"]):
            g = sample(backend, request, choice_seed(9, i))
            assert (choice["text"], choice["finish_reason"]) == (g.text, g.finish_reason)
            assert choice["logprobs"]["token_logprobs"] == list(g.logprobs)
        assert raw["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in raw["choices"])

        assert http.post("/v1/chat/completions", json={"messages": messages, "n": 0}).status_code == 422


def test_phrasings_vary_the_wording_but_not_the_arithmetic_or_its_truth() -> None:
    """With phrasings > 1 equal steps are often different text (fewer shared nodes), and every
    ground-truth function still reads the same arithmetic."""
    row = make_problems(1, 3, seed=12)[0]
    varied = SyntheticBackend(WorldConfig(slip_rate=0.0, wrong_op_rate=0.0, phrasings=4))
    plain = SyntheticBackend(WorldConfig(slip_rate=0.0, wrong_op_rate=0.0))
    texts = sample_many(varied, chat(row["question"]), range(60))
    first_steps = {split_steps(t, SplitConfig())[0] for t in texts}
    assert len(first_steps) == 4, "each of the four wordings appears"
    assert {tuple(equations(t)) for t in texts} == {tuple(equations(sample_many(plain, chat(row["question"]), range(1))[0]))}
    assert all(first_error(row["question"], split_steps(t, SplitConfig())) == -1 for t in texts)
    assert varied.model_id != plain.model_id
    assert plain.model_id == SyntheticBackend(WorldConfig(slip_rate=0.0, wrong_op_rate=0.0, phrasings=1)).model_id
    # Greedy decoding picks the first wording, so temperature 0 stays one fixed solution.
    greedy = {sample(varied, chat(row["question"], temperature=0.0), s).text for s in range(5)}
    assert len(greedy) == 1
