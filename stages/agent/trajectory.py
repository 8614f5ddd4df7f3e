"""Agent trajectories on the step tree: what a step is, and how a step's context is rebuilt.

An agent trajectory is an OpenAI-style conversation: context messages (system, the user's
task), then assistant turns, each possibly calling tools, each followed by what came back
(tool results, and any user or environment message before the next assistant turn).

- A **problem** is the task: ``question`` = the user's task message, ``meta.agent`` =
  ``{"context": the messages before the first assistant turn, "tools": the declared tools,
  "gold_answers": every accepted gold answer}``; ``meta.kind`` = ``"agent"``.
- A **step** (node) is one assistant turn together with the messages that followed it up to
  the next assistant turn. Its ``text`` is the canonical JSON ``{"messages": [...]}`` of those
  messages (``step_text``), so the same action that saw the same results under the same
  context is one node, and a different observation after the same action is a different
  node (the next step's context differs). A sampled alternative action has no observation.
- A step's **context** is the problem's context messages plus the messages of its ancestors
  (``context_messages``): exactly what the agent saw when it acted.

Messages are normalised on the way in (``normalize_message``): roles kept, content flattened
to a string, tool calls as ``{"id", "type": "function", "function": {"name", "arguments"}}``
with ``arguments`` kept as the JSON *string* the model wrote (a dict is serialised), because
whether that string parses is itself evidence about the step.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stepforge.stages.ingest.importers import RowError

AGENT_KIND = "agent"
ROLES = ("system", "user", "assistant", "tool")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_FINAL_ANSWER = re.compile(r"(?:^|\n)\s*(?:\*\*)?final answer(?:\*\*)?\s*[:：]\s*(.+)", re.IGNORECASE)
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.IGNORECASE | re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class MessageError(RowError):
    """A message that is not a usable chat message: an importer's row error (reason, detail)."""


@dataclass(frozen=True)
class ToolCall:
    id: str | None
    name: str
    arguments: str  # as the model wrote it: may not be JSON


def normalize_message(message: Any, where: str) -> dict[str, Any]:
    """A chat message in the one form stored and exported (see the module docstring)."""
    if not isinstance(message, Mapping):
        raise MessageError("wrong_type", f"{where} is {type(message).__name__}, expected an object")
    role = message.get("role")
    if role not in ROLES:
        raise MessageError("unknown_role", f"{where}.role is {role!r}, expected one of {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": role, "content": _content_text(message.get("content"), where)}
    if role == "assistant":
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise MessageError("wrong_type", f"{where}.tool_calls is {type(calls).__name__}, expected an array")
        if calls:
            out["tool_calls"] = [_normalize_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    return out


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text parts, in order
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text"]
        return "".join(str(p) for p in parts)
    raise MessageError("wrong_type", f"{where}.content is {type(content).__name__}, expected a string")


def _normalize_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise MessageError("wrong_type", f"{where} is {type(call).__name__}, expected an object")
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise MessageError("missing_tool_name", f"{where}.function.name is missing or not a string")
    arguments = function.get("arguments", function.get("args", "{}"))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def tool_calls(message: Mapping[str, Any]) -> list[ToolCall]:
    return [
        ToolCall(call.get("id"), call["function"]["name"], call["function"]["arguments"])
        for call in message.get("tool_calls") or []
    ]


# -- steps as node text ---------------------------------------------------------------------------
def step_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The node text of one step: canonical JSON of its messages (assistant turn first)."""
    return json.dumps({"messages": list(messages)}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def step_messages(text: str) -> list[dict[str, Any]]:
    return json.loads(text)["messages"]


def action_of(text: str) -> dict[str, Any]:
    """The step's assistant turn (its action), without what came back."""
    return step_messages(text)[0]


def observations_of(text: str) -> list[dict[str, Any]]:
    return step_messages(text)[1:]


def split_steps(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """(context messages before the first assistant turn, one message list per step)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    steps: list[list[dict[str, Any]]] = []
    for message in messages[first:]:
        if message["role"] == "assistant":
            steps.append([message])
        else:
            steps[-1].append(message)
    return list(messages[:first]), steps


# -- problems -------------------------------------------------------------------------------------
def agent_meta(problem_meta: str | Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``agent`` section of a problem's meta, or None for a problem that is not an agent task."""
    meta = json.loads(problem_meta) if isinstance(problem_meta, str) else problem_meta
    if not isinstance(meta, Mapping) or meta.get("kind") != AGENT_KIND:
        return None
    return meta.get("agent") or {}


def is_agent_problem(problem: Any) -> bool:
    meta = problem.meta if hasattr(problem, "meta") else problem["meta"]
    return agent_meta(meta) is not None


def context_messages(agent: Mapping[str, Any], path_texts: Iterable[str]) -> list[dict[str, Any]]:
    """What the agent saw before acting after ``path_texts``: task context plus earlier steps."""
    messages = [dict(m) for m in agent.get("context", [])]
    for text in path_texts:
        messages.extend(step_messages(text))
    return messages


def declared_tools(agent: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Tool name -> its declared function (name, description, parameters JSON schema)."""
    tools: dict[str, dict[str, Any]] = {}
    for tool in agent.get("tools", []):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            tools[function["name"]] = dict(function)
    return tools


# -- answers --------------------------------------------------------------------------------------
def final_answer(message: Mapping[str, Any]) -> str | None:
    """The answer a final assistant turn gives: the last ``<answer>`` tag, a 'Final answer:' line,
    a ``\\boxed{}`` or 'the answer is'; None for a turn that calls tools or states no answer."""
    from stepforge.stages.rollout.answers import extract_final_answer

    if message.get("tool_calls"):
        return None
    content = without_thoughts(message.get("content") or "")
    if tags := _ANSWER_TAG.findall(content):
        return tags[-1].strip() or None
    if lines := _FINAL_ANSWER.findall(content):
        return lines[-1].strip() or None
    return extract_final_answer(content)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def without_thoughts(text: str) -> str:
    """``text`` without its ``<think>`` blocks (an unclosed one runs to the end)."""
    return _THINK.sub("", text)


def thought_of(message: Mapping[str, Any]) -> str:
    """The reasoning an assistant turn wrote before acting (its ``<think>`` block, else its text)."""
    content = message.get("content") or ""
    if found := _THINK.findall(content):
        return found[0].strip()
    return content.strip()


def render_transcript(messages: Sequence[Mapping[str, Any]], max_observation_chars: int) -> str:
    """A plain-text transcript for a judge's prompt; long tool results are cut (the cut is marked)."""
    lines = []
    for message in messages:
        role = message["role"]
        content = message.get("content") or ""
        if role in ("tool",) and len(content) > max_observation_chars:
            content = content[:max_observation_chars] + f" …[{len(content) - max_observation_chars} more characters]"
        head = {"system": "[System]", "user": "[User]", "assistant": "[Agent]", "tool": "[Tool result]"}[role]
        if role == "tool" and message.get("name"):
            head = f"[Tool result: {message['name']}]"
        body = content.strip()
        for call in message.get("tool_calls") or []:
            body += f"\n<call {call['function']['name']}> {call['function']['arguments']}"
        lines.append(f"{head}\n{body.strip() or '(empty)'}")
    return "\n\n".join(lines)
