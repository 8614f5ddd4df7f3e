"""LLM-as-judge: parsing every answer format (and malformed ones), voting, and the stage on a real model."""

from __future__ import annotations

import json

import pytest

from stepforge.schemas.ids import node_id
from stepforge.schemas.records import Evaluation, Problem, Reject
from stepforge.stages.verify import judge
from stepforge.stages.verify.judge import JudgeConfig, JudgementError, parse_critic, parse_stepwise, vote
from stepforge.stages.llm import GenerationClient
from stepforge.stages.llm.base import Generation, GenerationRequest


# -- critic answers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"analysis": "Paragraph 1 adds wrongly.", "earliest_error": 1}', 1),
        ('{"analysis": "All fine.", "earliest_error": -1}', -1),
        ('{"earliest_error": "2", "analysis": "x"}', 2),  # a numeric string
        ('Let me check.\n```json\n{"analysis": "ok", "earliest_error": 0}\n```', 0),  # fenced, with a preamble
        ('{"a": 1} then {"earliest_error": 3}', 3),  # the object that has the key wins
        ("Paragraph 2 multiplies 4 by 3 and gets 13. \\boxed{2}", 2),
        ("I first thought \\boxed{1}, but on reflection \\boxed{-1}", -1),  # the last box is the answer
        ("\\boxed{paragraph_3}", 3),
        ("The earliest error is in paragraph 4, where the total is wrong.", 4),
        ("Paragraph 1 is the first error because 6 x 3 is not 20.", 1),
        ("Every step is checked. There is no error in this solution.", -1),
        ("All paragraphs are correct.", -1),
    ],
)
def test_critic_answers_are_read_in_every_format(text: str, expected: int) -> None:
    assert parse_critic(text, num_steps=5).value == expected


def test_critic_rationale_comes_from_the_json_analysis() -> None:
    judgement = parse_critic('{"analysis": "18 - 6 is 12, not 13.", "earliest_error": 1}', num_steps=3)
    assert judgement.rationale == "18 - 6 is 12, not 13."


@pytest.mark.parametrize(
    ("text", "finish_reason", "reason"),
    [
        ("", "stop", "empty_judgement"),
        ("   \n", "stop", "empty_judgement"),
        ('{"analysis": "The first paragraph sets up the sum and then the sec', "length", "truncated_judgement"),
        ("The solution looks plausible but I am not sure.", "stop", "no_verdict"),
        ("\\boxed{the second one}", "stop", "no_verdict"),
        ('{"earliest_error": 7}', "stop", "index_out_of_range"),
        ('{"earliest_error": -2}', "stop", "index_out_of_range"),
        ("\\boxed{5}", "stop", "index_out_of_range"),
    ],
)
def test_unreadable_critic_answers_raise_with_a_reason(text: str, finish_reason: str, reason: str) -> None:
    with pytest.raises(JudgementError) as caught:
        parse_critic(text, num_steps=5, finish_reason=finish_reason)
    assert caught.value.reason == reason


def test_a_json_boolean_is_not_an_index() -> None:
    # json.loads gives True for `true`; bool is an int subclass in Python, so this must be refused.
    with pytest.raises(JudgementError):
        parse_critic('{"earliest_error": true}', num_steps=3)


# -- stepwise answers -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"rationale": "18 - 6 = 12 holds.", "verdict": "correct"}', 1),
        ('{"rationale": "Restates the question.", "verdict": "neutral"}', 0),
        ('{"rationale": "4 x 3 is 12, not 13.", "verdict": "incorrect"}', -1),
        ('{"verdict": "Incorrect", "rationale": "x"}', -1),
        ('{"verdict": -1}', -1),
        ('{"label": "+1"}', 1),
        ("The step computes 12 + 6 = 18, which is right.\nVerdict: correct", 1),
        ("It says the step is correct at first glance, but 5*4 is 20.\nVerdict: **incorrect**", -1),
        ("verdict = neutral", 0),
        ("incorrect", -1),
        ("The step is correct.", 1),
    ],
)
def test_stepwise_answers_are_read_in_every_format(text: str, expected: int) -> None:
    assert parse_stepwise(text).value == expected


@pytest.mark.parametrize(
    ("text", "finish_reason", "reason"),
    [
        ("", "stop", "empty_judgement"),
        ("The step is correct in its setup but the result is incorrect.", "stop", "ambiguous_verdict"),
        ('{"rationale": "hmm", "verdict": "mostly fine"}', "stop", "no_verdict"),
        ("I need to think about this more carefully, the", "length", "truncated_judgement"),
        ("No opinion.", "stop", "no_verdict"),
    ],
)
def test_unreadable_stepwise_answers_raise_with_a_reason(text: str, finish_reason: str, reason: str) -> None:
    with pytest.raises(JudgementError) as caught:
        parse_stepwise(text, finish_reason)
    assert caught.value.reason == reason


# -- voting -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("votes", "critic", "expected"),
    [
        ([2, 2, -1], True, 2),
        ([-1, -1, 2], True, -1),
        ([3, 1], True, 1),  # a tie between errors: the earlier one
        ([-1, 2], True, 2),  # a tie between "no error" and an error: the error
        ([1, 1, -1], False, 1),
        ([1, -1], False, -1),  # ties go to the more severe verdict
        ([1, 0], False, 0),
    ],
)
def test_votes_take_the_majority_and_break_ties_towards_errors(votes: list[int], critic: bool, expected: int) -> None:
    assert vote(votes, critic=critic) == expected


def test_votes_need_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        JudgeConfig(samples=3, temperature=0.0)


# -- the stage --------------------------------------------------------------------------------
class ScriptedJudgeBackend:
    """Fault injection, not a model: answers every judge request from a script of texts (by sample
    seed order), so aggregation and unreadable-answer handling are tested exactly."""

    model_id = "scripted-judge"
    max_in_flight = 8
    supports_json_schema = True

    def __init__(self, answers: list[str]):
        self.answers = answers
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest, seed: int) -> Generation:
        self.requests.append(request)
        text = self.answers[len(self.requests) - 1]
        return Generation(text=text, num_tokens=10, finish_reason="stop")

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def close(self) -> None:
        pass


def _tree(steps: list[str]) -> tuple[Problem, dict, list[dict]]:
    problem = Problem(problem_id="p1", source="t", source_index=0, question="What is 2 + 3 * 4?", gold_answer="14")
    nodes, parent = [], None
    for depth, text in enumerate(steps, 1):
        nid = node_id(problem.problem_id, parent, text)
        nodes.append({"node_id": nid, "problem_id": "p1", "parent_id": parent, "depth": depth, "text": text,
                      "origin": "policy", "num_tokens": 3})
        parent = nid
    rollout = {"rollout_id": "r1", "problem_id": "p1", "origin": "policy", "node_ids": [n["node_id"] for n in nodes]}
    return problem, rollout, nodes


STEPS = ["3 * 4 = 12", "2 + 12 = 15", "The answer is \\boxed{15}"]


def test_critic_votes_become_per_step_evaluations_and_unreadable_samples_become_rejects() -> None:
    problem, rollout, nodes = _tree(STEPS)
    backend = ScriptedJudgeBackend(
        ['{"analysis": "2 + 12 is 14.", "earliest_error": 1}', '{"analysis": "x", "earliest_error": 1}',
         '{"analysis": "fine", "earliest_error": -1}', "I cannot tell."]
    )
    config = JudgeConfig(samples=4, temperature=0.7)
    records = list(judge.run([problem], [rollout], nodes, config, GenerationClient(backend)))
    evaluations = [r for r in records if isinstance(r, Evaluation)]
    rejects = [r for r in records if isinstance(r, Reject)]
    assert [r.reason for r in rejects] == ["no_verdict"] and rejects[0].payload == "I cannot tell."
    by_step = {json.loads(e.meta)["step_index"]: e for e in evaluations}
    assert sorted(by_step) == [0, 1], "nothing is said about steps after the predicted error"
    assert by_step[0].verdict == 1 and (by_step[0].n, by_step[0].successes) == (3, 3)
    assert by_step[1].verdict == -1 and (by_step[1].n, by_step[1].successes) == (3, 1)
    assert by_step[1].confidence == pytest.approx(2 / 3)
    assert by_step[1].rationale == "2 + 12 is 14."
    assert sum(e.cost_tokens for e in evaluations) == 40, "every generated token is accounted for once"
    assert all(r.json_schema for r in backend.requests), "a backend that can constrain output is asked to"
    assert json.loads(backend.requests[0].json_schema)["properties"]["earliest_error"]["enum"] == [-1, 0, 1, 2]


def test_an_item_whose_every_judgement_is_unreadable_gets_no_evaluation() -> None:
    problem, rollout, nodes = _tree(STEPS)
    backend = ScriptedJudgeBackend(["", "\\boxed{9}"])
    records = list(judge.run([problem], [rollout], nodes, JudgeConfig(samples=2, temperature=0.5), GenerationClient(backend)))
    assert sorted(r.reason for r in records) == ["empty_judgement", "index_out_of_range"]


def test_stepwise_judges_each_step_in_its_context() -> None:
    problem, rollout, nodes = _tree(STEPS)
    backend = ScriptedJudgeBackend(
        ['{"rationale": "ok", "verdict": "correct"}', '{"rationale": "14, not 15", "verdict": "incorrect"}',
         "Verdict: incorrect"]
    )
    records = list(judge.run([problem], [rollout], nodes, JudgeConfig(style="stepwise"), GenerationClient(backend)))
    verdicts = {r.node_id: r.verdict for r in records if isinstance(r, Evaluation)}
    assert [verdicts[n["node_id"]] for n in nodes] == [1, -1, -1]
    shown = [dict(r.messages)["user"] for r in backend.requests]
    assert "[Steps so far]\n(none" in shown[0]
    assert "Step 1: 3 * 4 = 12\nStep 2: 2 + 12 = 15" in shown[2] and "[Step to check]\nStep 3:" in shown[2]


@pytest.mark.slow
def test_critic_on_the_real_model_is_constrained_to_readable_json(tmp_path) -> None:
    """SmolLM2 cannot grade arithmetic, but with a grammar every answer it gives is readable."""
    from stepforge.stages.llm import BackendConfig, GenerationCache, load_backend

    problem, rollout, nodes = _tree(STEPS)
    client = GenerationClient(load_backend(BackendConfig()), GenerationCache(tmp_path / "gen.sqlite"))
    config = JudgeConfig(samples=3, temperature=0.8, max_tokens=160, max_rationale_chars=120)
    records = list(judge.run([problem], [rollout], nodes, config, client))
    evaluations = [r for r in records if isinstance(r, Evaluation)]
    rejects = [r for r in records if isinstance(r, Reject)]
    assert {r.reason for r in rejects} <= {"truncated_judgement"}, "constrained answers only fail by running out of tokens"
    assert evaluations, "at least one of three constrained judgements is complete"
    votes = json.loads(evaluations[0].meta)["votes"]
    assert all(-1 <= v <= 2 for v in votes) and len(votes) + len(rejects) == 3
    assert all(e.model == client.model_id and e.source == "judge" for e in evaluations)
