"""Conversations with tools: how a tool-calling chat reaches a model, and how its calls come back.

A tool-using request carries the whole OpenAI-style conversation (``GenerationRequest.conversation``:
system / user / assistant turns with ``tool_calls`` / ``tool`` results) and the declared tools
(``GenerationRequest.tools``), both as canonical JSON so that they key the generation cache.

- **In-process llama.cpp** renders it with the model's own chat template when the template knows
  tools (Qwen2.5's and Hermes' templates: tools in the system turn, calls as ``<tool_call>``
  blocks, results as ``<tool_response>``), passing each call's arguments as the object the template
  expects. A template without tools (SmolLM2's) gets ``plain_turns``: the same conversation in
  plain chat turns, the tools described in the system turn in the Hermes convention.
- **OpenAI-compatible HTTP** sends ``messages`` and ``tools`` as they are; the server renders them.

Either way the answer comes back as **text in the Hermes convention**: what the model wrote, its
calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks. That is what a
Qwen-style model writes itself; a server that parses calls into ``message.tool_calls`` gets them
written back into that form (``hermes_text``), so one parser (``parse_action``) reads both
backends, and the generation cache stores one kind of thing (text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

TOOL_INSTRUCTIONS = (
    "\n\nYou can call these tools:\n{tools}\n\nTo call a tool, write <tool_call>{{\"name\": <tool name>, "
    "\"arguments\": <JSON object>}}</tool_call>. When you know the final answer, write it inside <answer></answer>."
)
INVALID_CALL = "invalid_tool_call"
"""The name a ``<tool_call>`` block that is not a readable call gets (``parse_action``)."""
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def encode(value: Any) -> str:
    """Canonical JSON for ``GenerationRequest.conversation`` / ``tools`` (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def template_knows_tools(template: str) -> bool:
    """Whether a chat template renders declared tools itself (it reads a ``tools`` variable)."""
    return re.search(r"\btools\b", template) is not None


def template_messages(conversation: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as chat templates expect it: a call's ``arguments`` as an object when the
    model wrote valid JSON (Qwen's template applies ``tojson`` to it), else the raw string."""
    out = []
    for message in conversation:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": json_or_text(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]
        out.append(message)
    return out


def plain_turns(
    conversation: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
    call_text: Callable[[Mapping[str, Any]], str] | None = None,
) -> list[dict[str, str]]:
    """The conversation as plain chat turns any template renders: tools described in the system turn,
    an assistant turn as ``call_text(message)`` (default: its text, then its calls as ``<tool_call>``
    blocks, ``hermes_text``), tool results folded into user turns (``<tool_response>``), consecutive
    turns of one role merged."""
    if call_text is None:
        def call_text(message):
            return hermes_text(message.get("content") or "", message.get("tool_calls") or [])
    declared = [t.get("function", t) for t in tools if isinstance(t, Mapping)]
    turns: list[list[str]] = []

    def add(role: str, text: str) -> None:
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])

    system = next((m["content"] for m in conversation if m["role"] == "system"), "You are a helpful assistant.")
    add("system", system + (TOOL_INSTRUCTIONS.format(tools=json.dumps(declared, ensure_ascii=False)) if declared else ""))
    for message in conversation:
        role = message["role"]
        if role == "system":
            continue
        if role == "assistant":
            add("assistant", call_text(message).strip() or "(no action)")
        elif role == "tool":
            add("user", f"<tool_response>\n{message.get('content') or ''}\n</tool_response>")
        else:
            add("user", message.get("content") or "")
    return [{"role": role, "content": text} for role, text in turns]


def hermes_text(content: str, tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant turn as the model would have written it: its text, then one ``<tool_call>``
    block per call (arguments as the object when they parse, else the raw string)."""
    blocks = []
    for call in tool_calls:
        function = call.get("function", call)
        arguments = function.get("arguments", "{}")
        payload = {"name": function.get("name"), "arguments": json_or_text(arguments) if isinstance(arguments, str) else arguments}
        blocks.append(f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>")
    return "\n".join([content.strip(), *blocks]).strip() if blocks else content


def json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def parse_action(text: str, call_prefix: str = "call") -> dict[str, Any]:
    """An assistant message from generated text: ``<tool_call>`` blocks become tool calls with ids
    ``<call_prefix>_<k>``. A block that is not a JSON object with a ``name`` stays a call named
    ``invalid_tool_call`` whose arguments are the block's raw text, so the step keeps the evidence
    and the tool checks and the environment can flag it (``unknown_tool`` / ``bad_arguments``)."""
    calls = []
    for k, block in enumerate(_TOOL_CALL.findall(text)):
        try:
            parsed = json.loads(block)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("name"), str):
            arguments = parsed.get("arguments", {})
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False, sort_keys=True)
            name = parsed["name"]
        else:
            name, arguments = INVALID_CALL, block
        calls.append({"id": f"{call_prefix}_{k}", "type": "function", "function": {"name": name, "arguments": arguments}})
    content = _TOOL_CALL.sub("", text).strip()
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message
