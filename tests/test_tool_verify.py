"""Tool verification over step-tree nodes: calculations, final answers, and code run in the sandbox."""

from __future__ import annotations

import json

from stepforge.schemas.ids import node_id
from stepforge.schemas.records import Evaluation, Problem, Reject
from stepforge.stages.verify import math_checks as tool_verify
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.tools.sandbox import SandboxLimits
from stepforge.stages.verify.math_checks import ToolConfig

PROBLEM = Problem(problem_id="p", source="t", source_index=0, question="q", gold_answer="14")


def tree(*steps: str) -> tuple[list[dict], dict]:
    nodes, parent = [], None
    for depth, text in enumerate(steps, 1):
        nid = node_id("p", parent, text)
        nodes.append({"node_id": nid, "problem_id": "p", "parent_id": parent, "depth": depth, "text": text,
                      "origin": "policy", "num_tokens": 1})
        parent = nid
    return nodes, {"rollout_id": "r", "problem_id": "p", "node_ids": [n["node_id"] for n in nodes]}


def verify(*steps: str, **config) -> tuple[list[Evaluation | None], list[Reject]]:
    nodes, rollout = tree(*steps)
    with AnswerChecker() as checker:
        records = list(tool_verify.run([PROBLEM], [rollout], nodes, ToolConfig(**config), checker))
    by_node = {r.node_id: r for r in records if isinstance(r, Evaluation)}
    return [by_node.get(n["node_id"]) for n in nodes], [r for r in records if isinstance(r, Reject)]


def checks(evaluation: Evaluation) -> list[dict]:
    return json.loads(evaluation.meta)["checks"]


def test_calculations_and_final_answers_are_checked_and_prose_is_not() -> None:
    (first, second, third, last), _ = verify(
        "We need the total.", "3 * 4 = 12 apples.", "2 + 12 = 15, so", "The answer is \\boxed{15}."
    )
    assert first is None, "a step with nothing checkable gets no tool evaluation"
    assert second.verdict == 1 and (second.n, second.successes) == (1, 1) and second.confidence is None
    assert third.verdict == -1 and third.confidence == 1.0 and "not 15" in third.rationale
    assert last.verdict == -1 and checks(last)[0]["kind"] == "final_answer" and last.model == "math-verify"
    assert second.model == "sympy" and second.source == "tool" and second.cost_tokens == 0


def test_code_blocks_run_in_the_sandbox_after_the_code_above_them() -> None:
    (define, right, wrong, raises), rejects = verify(
        "```python\nx = 3 * 4\nprint(x)\n```\n```output\n12\n```",
        "```python\nprint(x + 2)\n```\n```output\n14\n```",
        "```python\nprint(x * 2)\n```\n```output\n25\n```",
        "```python\nprint(1 / 0)\n```",
    )
    assert define.verdict == 1 and right.verdict == 1 and right.model == "sandbox"
    assert wrong.verdict == -1 and "prints '24'" in wrong.rationale
    assert raises.verdict == -1 and "ZeroDivisionError" in raises.rationale
    assert not rejects


def test_code_without_a_claimed_output_decides_nothing_but_keeps_its_value() -> None:
    (step,), _ = verify("```python\nprint(6 * 7)\n```")
    assert step is None


def test_a_sandbox_that_stops_the_code_is_a_reject_not_a_verdict() -> None:
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=3)
    (loop,), rejects = verify("```python\nwhile True:\n    pass\n```\n```output\n1\n```", sandbox=limits)
    assert loop is None
    assert [r.reason for r in rejects] in (["sandbox_cpu_limit"], ["sandbox_timeout"])
    assert rejects[0].stage == "tool" and rejects[0].item.endswith("#code0") and "while True" in rejects[0].payload
    (blocked,), rejects = verify("```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\n```\n```output\nx\n```")
    assert blocked is None and [r.reason for r in rejects] == ["sandbox_blocked"]


def test_checkers_can_be_switched_off() -> None:
    (step,), _ = verify("2 + 2 = 5. The answer is \\boxed{14}.", arithmetic=False)
    assert step.verdict == 1 and [c["kind"] for c in checks(step)] == ["final_answer"]
