"""Importers for agent trajectories: OpenAI-style conversations and a generic JSONL of steps.

Both map a source row to an ``importers.ImportedRow`` whose positions are the trajectory's
steps (``stages.agent.trajectory``: one assistant turn plus what came back), so ``TreeImporter`` stores
them like any imported solution: a problem per task, a node per step, a policy rollout per
trajectory, a ``human`` evaluation per labelled step.

``agent_messages`` (AgentProcessBench, OpenAI chat logs): ``messages`` (system / user /
assistant with ``tool_calls`` / tool), ``tools`` (OpenAI function declarations), optional
``step_labels`` (assistant *message index* -> +1 / 0 / -1), ``final_label`` (+1 / -1: the
rollout's outcome), ``ground_truth`` (a string, a list, or ``{"target": ...}``; also
``gold_answer`` / ``golden_answers``), ``question``, ``id``.

``agent_steps`` (a generic log): ``task`` (or ``question``), optional ``system``, ``tools``,
``steps``: ``[{observation?, thought?, action, result?, label?}]`` where ``action`` is a string
(a free-form action, e.g. ``click [42]``) or ``{name|tool, arguments|args|input}`` (a tool
call), then ``final_answer`` (or ``answer``) and ``gold_answer``. It becomes the same
conversation: the task (and the first observation) as the user message, each step as an
assistant turn (thought as content; a string action appended as ``Action: ...``, a structured
one as a tool call), its result as the tool message (or ``Observation: ...`` for string
actions), a later observation that differs from the last result as a user message, and the
final answer as a last assistant turn ``Final answer: ...``.

Rows that cannot be a trajectory are rejected with a reason: ``missing_field`` /
``wrong_type``, ``unknown_role``, ``no_assistant_turn``, ``no_task_message``,
``last_turn_not_assistant`` (the log stops after a tool result or a user message: no final
turn), ``missing_tool_result`` (a call nothing answered), ``orphan_tool_result`` (a result for
no call), ``label_not_assistant`` / ``bad_label`` (a step label on a non-assistant message or
not -1/0/+1). A malformed *call* (bad JSON arguments, an unknown tool, arguments that break the
tool's schema) is a fact about the agent's step, not about the data: by default the trajectory
is kept and the tool checks label that step -1 (``invalid_calls: label``); with
``invalid_calls: reject`` the row is rejected with the check's reason (``bad_json_arguments``,
``unknown_tool``, ``schema_mismatch``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Literal

from stepforge.stages.agent import trajectory as agent
from stepforge.stages.verify.agent_checks import call_checks
from stepforge.stages.ingest.importers import (
    Candidate,
    ImportedRow,
    Position,
    RowError,
    StepLabel,
    check_type,
    optional_field,
    raw_row_hash,
    required_field,
    scalar_fields,
)

InvalidCalls = Literal["label", "reject"]
CALL_CHECKS = ("arguments_json", "known_tool", "arguments_schema")


def agent_messages_row(row: Mapping[str, Any], invalid_calls: InvalidCalls = "label") -> ImportedRow:
    raw = required_field(row, "messages", list)
    messages = [agent.normalize_message(message, f"messages[{index}]") for index, message in enumerate(raw)]
    tools = optional_field(row, "tools", list) or []
    labels = _step_labels(row, messages)
    return _trajectory(
        row, messages, tools, labels, invalid_calls, "agent_messages",
        question_hint=optional_field(row, "question", str),
        used={"messages", "tools", "step_labels", "final_label", "ground_truth", "gold_answer", "golden_answers"},
    )


def agent_steps_row(row: Mapping[str, Any], invalid_calls: InvalidCalls = "label") -> ImportedRow:
    task_key = "task" if row.get("task") is not None else "question"
    task = required_field(row, task_key, str)
    if not task.strip():
        raise RowError("empty_text", f"field {task_key!r} is empty")
    steps = required_field(row, "steps", list)
    if not steps:
        raise RowError("empty_steps", "field 'steps' is an empty list")
    messages: list[dict[str, Any]] = []
    if system := optional_field(row, "system", str):
        messages.append({"role": "system", "content": system})
    labels: dict[int, int] = {}
    last_result: str | None = None
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        step = check_type(step, dict, where)
        observation = optional_field(step, "observation", str, f"{where}.observation")
        if i == 0:
            messages.append({"role": "user", "content": task + (f"\n\nObservation: {observation}" if observation else "")})
        elif observation and observation != last_result:
            messages.append({"role": "user", "content": f"Observation: {observation}"})
        thought = optional_field(step, "thought", str, f"{where}.thought") or ""
        action = step.get("action")
        if action is None:
            raise RowError("missing_field", f"field '{where}.action' is missing or null")
        result = step.get("result")
        result_text = None if result is None else (result if isinstance(result, str) else json.dumps(result, ensure_ascii=False))
        if isinstance(action, str):
            assistant = {"role": "assistant", "content": (thought + "\n" if thought else "") + f"Action: {action}"}
            messages.append(assistant)
            if result_text is not None:
                messages.append({"role": "user", "content": f"Observation: {result_text}"})
        elif isinstance(action, dict):
            name = action.get("name", action.get("tool"))
            arguments = action.get("arguments", action.get("args", action.get("input", {})))
            call = {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
            assistant = agent.normalize_message({"role": "assistant", "content": thought, "tool_calls": [call]}, where)
            messages.append(assistant)
            if result_text is not None:
                messages.append({"role": "tool", "tool_call_id": f"call_{i}", "name": str(name), "content": result_text})
        else:
            raise RowError("wrong_type", f"field '{where}.action' is {type(action).__name__}, expected string or object")
        if (label := step.get("label")) is not None:
            labels[sum(1 for m in messages if m["role"] == "assistant") - 1] = _label_value(label, f"{where}.label")
        last_result = result_text
    answer = optional_field(row, "final_answer", str) or optional_field(row, "answer", str)
    if answer is not None:
        messages.append({"role": "assistant", "content": f"Final answer: {answer}"})
    tools = optional_field(row, "tools", list) or []
    return _trajectory(
        row, messages, tools, labels, invalid_calls, "agent_steps", question_hint=task,
        used={"task", "question", "system", "steps", "tools", "final_answer", "answer", "gold_answer", "ground_truth"},
    )


def _trajectory(
    row: Mapping[str, Any],
    messages: list[dict[str, Any]],
    tools: list,
    labels: dict[int, int],
    invalid_calls: InvalidCalls,
    format: str,
    question_hint: str | None,
    used: set[str],
) -> ImportedRow:
    """Checks that the messages form a trajectory and builds the imported row (labels by step index)."""
    context, steps = agent.split_steps(messages)
    if not steps:
        raise RowError("no_assistant_turn", "no message has role 'assistant'")
    users = [m for m in context if m["role"] == "user"]
    if not users or not users[-1]["content"].strip():
        raise RowError("no_task_message", "no user message with text comes before the first assistant turn")
    if messages[-1]["role"] != "assistant":
        raise RowError(
            "last_turn_not_assistant",
            f"the last message is {messages[-1]['role']!r}: the trajectory stops before the agent's final turn",
        )
    declared = agent.declared_tools({"tools": tools})
    first_step_index = len(context)
    offset = first_step_index
    for step in steps:
        _check_results(step, offset)
        if invalid_calls == "reject":
            for call in agent.tool_calls(step[0]):
                for check in call_checks(call, declared, CALL_CHECKS):
                    if check.status == "fail":
                        raise RowError(check.reason, f"messages[{offset}]: {check.detail}")
        offset += len(step)
    for step_index in labels:
        if not 0 <= step_index < len(steps):
            raise RowError("label_not_assistant", f"a step label points past the last step ({step_index})")
    golds = _golds(row)
    meta = {"source": "import", "row": row.get("id")}
    positions = tuple(
        Position(
            (Candidate(agent.step_text(step), StepLabel("human", labels[i], int(labels[i] > 0), meta=meta) if i in labels else None),),
            chosen=0,
        )
        for i, step in enumerate(steps)
    )
    final_label = optional_field(row, "final_label", int)
    task = users[-1]["content"]
    problem_meta = {
        **scalar_fields(row, used),
        "kind": agent.AGENT_KIND,
        "agent": {"context": context, "tools": tools, "gold_answers": golds},
    }
    if question_hint and question_hint != task:
        problem_meta["question"] = question_hint
    identity = row.get("id", row.get("total_index"))
    return ImportedRow(
        format=format,  # type: ignore[arg-type]
        identity=identity if identity is not None else raw_row_hash(row),
        question=task, positions=positions, generation_key=raw_row_hash(row),
        gold_answer=golds[0] if golds else None,
        outcome=None if final_label in (None, 0) else final_label > 0,
        generator=optional_field(row, "generator", str) or optional_field(row, "model", str),
        problem_meta=problem_meta, gold_required=False,
        rollout_text=agent.step_text([m for step in steps for m in step]),
        rollout_final_answer=agent.final_answer(steps[-1][0]),
    )


def _check_results(step: list[dict[str, Any]], offset: int) -> None:
    calls = agent.tool_calls(step[0])
    results = [m for m in step[1:] if m["role"] == "tool"]
    ids = {c.id for c in calls if c.id}
    for k, message in enumerate(step[1:], 1):
        answered = message.get("tool_call_id")
        if message["role"] == "tool" and (not calls or (ids and answered and answered not in ids)):
            raise RowError("orphan_tool_result", f"messages[{offset + k}] is a tool result for no call of messages[{offset}]")
    if ids and len(ids) == len(calls):
        missing = ids - {m.get("tool_call_id") for m in results}
        if missing:
            name = next(c.name for c in calls if c.id in missing)
            raise RowError("missing_tool_result", f"messages[{offset}] calls {name!r} ({sorted(missing)[0]}) and no tool message answers it")
    elif len(results) < len(calls):
        raise RowError("missing_tool_result", f"messages[{offset}] makes {len(calls)} calls and gets {len(results)} results")


def _step_labels(row: Mapping[str, Any], messages: list[dict[str, Any]]) -> dict[int, int]:
    """Step index -> label, from labels keyed by assistant message index."""
    raw = optional_field(row, "step_labels", dict) or {}
    assistant_index = {i: k for k, i in enumerate(i for i, m in enumerate(messages) if m["role"] == "assistant")}
    labels = {}
    for key, value in raw.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise RowError("bad_label", f"step_labels key {key!r} is not a message index") from None
        if index not in assistant_index:
            role = messages[index]["role"] if 0 <= index < len(messages) else "nothing"
            raise RowError("label_not_assistant", f"step_labels[{key!r}] labels message {index}, which is {role!r}, not an assistant turn")
        labels[assistant_index[index]] = _label_value(value, f"step_labels[{key!r}]")
    return labels


def _label_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or value not in (-1, 0, 1):
        raise RowError("bad_label", f"{where} is {value!r}, expected -1, 0 or 1")
    return int(value)


def _golds(row: Mapping[str, Any]) -> list[str]:
    for key in ("ground_truth", "gold_answer", "golden_answers"):
        value = row.get(key)
        if isinstance(value, Mapping):
            value = value.get("target", value.get("answer"))
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            golds = [str(v).strip() for v in value if isinstance(v, str | int | float) and str(v).strip()]
            if golds:
                return golds
    return []


def row_parser(format: str, invalid_calls: InvalidCalls) -> Callable[[Mapping[str, Any]], ImportedRow]:
    return partial({"agent_messages": agent_messages_row, "agent_steps": agent_steps_row}[format], invalid_calls=invalid_calls)
