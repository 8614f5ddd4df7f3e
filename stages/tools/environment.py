"""Tool environments for live agent rollouts: what a tool call does, and what comes back to the model.

A policy rolled out as an agent emits OpenAI-style tool calls (``stages/agent/trajectory.py``:
``ToolCall(id, name, arguments)``, ``arguments`` the JSON string the model wrote). An
``Environment`` declares its tools and the instructions the policy gets; ``reset(task)`` starts one
episode's ``Session``, whose ``execute(call)`` runs a call and returns an ``Observation``: the tool
message's content plus a status saying how the call ended. Nothing a call contains makes
``execute`` raise: malformed arguments, unknown tools, hostile or broken code all come back as an
observation with a status and a detail, and the session stays usable.

``identity()`` is the environment's part of cache and shard keys: its name, its ``version`` (bumped
when the observations for the same calls change) and every setting that shapes observations.

Environments are looked up by name with ``environment(name, settings)``; today there is one,
``python`` (``stages/tools/python_env.py``: a sandboxed notebook-like Python interpreter).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

from stepforge.stages.agent.trajectory import ToolCall

ObservationStatus = Literal[
    "ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "blocked", "bad_arguments", "unknown_tool"
]
OBSERVATION_STATUSES: tuple[str, ...] = ObservationStatus.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Observation:
    """What one tool call gave back."""

    content: str
    """The tool message's content: at most the environment's ``max_observation_chars``, plus the mark of the
    cut (``cut_text``) when there was more."""
    status: ObservationStatus
    """``ok``, a sandbox status (``error``, ``timeout``, ``cpu_limit``, ``memory_limit``, ``output_limit``,
    ``blocked``), ``bad_arguments`` or ``unknown_tool``."""
    detail: str
    """Why the status is not ok ("" when it is), e.g. "blocked: socket.connect 1.2.3.4:80"."""
    truncated: bool
    """Whether ``content`` was cut."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@runtime_checkable
class Session(Protocol):
    """One episode's live state. Use it from one thread at a time; different sessions share nothing."""

    def execute(self, call: ToolCall) -> Observation:
        """Run one tool call. Never raises because of what the call contains."""
        ...

    def replay(self, calls: Sequence[ToolCall]) -> list[Observation]:
        """Execute ``calls`` in order (restoring a stored prefix's state), returning their observations."""
        ...

    def close(self) -> None:
        """Release what the session holds; idempotent. A closed session refuses to execute (RuntimeError)."""
        ...

    def __enter__(self) -> Session: ...

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None: ...


@runtime_checkable
class Environment(Protocol):
    name: str
    """e.g. ``python``."""
    version: int
    """Bumped when the observations for the same calls change."""

    def tools(self) -> list[dict[str, Any]]:
        """OpenAI tool declarations: ``[{"type": "function", "function": {"name", "description", "parameters"}}]``."""
        ...

    def system_prompt(self) -> str:
        """The policy's instructions: how to use the tools, how to state the final answer."""
        ...

    def reset(self, task: Mapping[str, Any]) -> Session:
        """A fresh session for one episode of ``task`` (the problem's agent meta)."""
        ...

    def identity(self) -> dict[str, Any]:
        """JSON-able: name, version and every setting that shapes observations (enters cache and shard keys)."""
        ...


# name -> (module, environment class, config class); imported on first use (python_env imports this module).
_ENVIRONMENTS: dict[str, tuple[str, str, str]] = {
    "python": ("stepforge.stages.tools.python_env", "PythonEnvironment", "PythonToolConfig"),
}
ENVIRONMENT_NAMES: tuple[str, ...] = tuple(_ENVIRONMENTS)


def environment(name: str, settings: Any = None) -> Environment:
    """The environment called ``name`` with ``settings``: its config object, a mapping of its fields, or None
    for the defaults. An unknown name is a ValueError naming the choices; bad settings a pydantic ValidationError."""
    if name not in _ENVIRONMENTS:
        raise ValueError(f"unknown tool environment {name!r}; choices: {', '.join(ENVIRONMENT_NAMES)}")
    module_name, class_name, config_name = _ENVIRONMENTS[name]
    module = importlib.import_module(module_name)
    config_class = getattr(module, config_name)
    if settings is None:
        config = config_class()
    elif isinstance(settings, config_class):
        config = settings
    elif isinstance(settings, Mapping):
        config = config_class.model_validate(dict(settings))
    else:
        raise TypeError(f"settings of the {name} environment must be {config_name}, a mapping or None, "
                        f"not {type(settings).__name__}")
    return getattr(module, class_name)(config)


def cut_text(text: str, limit: int, keep_end: int = 0) -> tuple[str, bool]:
    """``text`` in at most ``limit`` characters plus a mark of the cut, and whether it was cut.

    The cut removes the middle: the first ``limit - kept end`` characters stay, then the mark
    ``…[N more characters]``, then the last ``min(keep_end, limit)`` characters (0: the cut is at the end).
    """
    if len(text) <= limit:
        return text, False
    tail = min(max(keep_end, 0), limit)
    head = limit - tail
    marker = f"…[{len(text) - limit} more characters]"
    return text[:head] + marker + (text[len(text) - tail :] if tail else ""), True
