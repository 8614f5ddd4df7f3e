"""The ``python`` tool environment: a notebook-like Python interpreter in the sandbox.

One tool, ``python``, with one argument ``code``. An episode behaves like a Jupyter notebook whose
cells are the episode's calls: what a cell defines (variables, functions, imports, files it wrote)
is there for the later cells, and the value of a final bare expression is shown.

**Notebook semantics by re-running.** There is no long-lived kernel: every call is one fresh
sandboxed interpreter (``run_python``, ``stages/tools/sandbox.py``), so an episode holds no
process, nothing leaks between calls but their source, and sessions share nothing. ``execute``
runs, in that one interpreter, the episode's *kept* cells in order with their output sent to
``/dev/null`` (file descriptors 1 and 2, so output written below Python is silent too), then the
new cell, whose output alone (stdout and stderr merged in the order written) becomes the
observation. Python's ``random`` is seeded with 0 before the first cell, so a replay recomputes
the values the model was shown and the same calls give the same observations.

- **Which cells are kept: only those whose status was ok.** A cell that fails leaves nothing behind
  (the policy's system prompt says so); it is as if it never ran, and it is not replayed. Replaying
  it would not work anyway: a blocked cell makes every run that contains it ``blocked`` (the
  sandbox reports any blocked event, even one the code caught), a killed cell (timeout, limits)
  would be killed again and spend every later call's budget, and an error would have to be told
  apart from a new failure of the replay. The price: a cell like ``import sympy; x = 1/0`` leaves
  no ``sympy`` defined, unlike Jupyter; the model sees a ``NameError`` and imports it again.
- **A replayed cell that fails now** (rare: the same code ran fine before; causes are other
  randomness than ``random``'s, hash order, the clock, or the limits, which cover the replay plus
  the new cell) is reported as the observation's status (``error``, ``timeout``...) with a detail
  beginning "replaying <cell N> failed:" (or "replaying the earlier cells failed:" when the run was
  killed, or a kept cell called ``os._exit``, before it could say which), the new cell is not run, and the session's state is reset, as
  after a kernel restart: the kept cells are dropped and the content tells the model to define again
  what it needs. Keeping them would make every later call fail the same way.
- **Cell numbers** count the calls with valid arguments, from 1, failed ones included; each cell is
  compiled as ``<cell N>`` (and registered with ``linecache``), so a traceback names the cells and
  shows their lines. A replayed cell keeps its number.
- **The last expression.** With ``display_last_expression``, a cell whose last statement is an
  expression not followed by ``;`` prints its ``repr`` if it is not None, like Jupyter (``_`` is not
  set). A replay evaluates it too (with the output discarded), so it runs exactly as it first ran.
- ``sys.exit()`` / ``sys.exit(0)`` end a cell early and it counts as ok (and ends early when
  replayed); another exit code is an ``error`` with detail ``SystemExit: <code>``.

**What comes back.** Content is what the new cell printed; an empty ok output is "(no output)". An
error adds the traceback from the first frame of a cell on (the driver's frames are cut). Blocked,
timeout, CPU, memory and output-limit ends add a one-line explanation after what was printed (and
after the traceback if there was one). Content longer than ``max_observation_chars`` is cut in the
middle with ``…[N more characters]``: the head of the output stays, and for a failure the end of the
explanation stays too (half to three quarters of the budget), since the exception line and the
innermost frames matter most. Values that differ between runs (``id()``, set order of strings, the
clock, ``numpy.random`` without a seed) can differ between an observation and its replay.

**Cost.** The limits cover the whole run, replay included (a timeout or CPU explanation says so when
earlier cells were re-run), and every call re-runs the kept cells: an episode of n calls costs
O(n²) cell runs, cheap for the small cells of a math episode (an ``import sympy`` re-run is about
0.3 s). ``replay(calls)`` is one run per call, as when the episode first ran.

``execute`` raises only for the host, not the call: OSError if the sandboxed interpreter cannot be
started (as ``run_python``), RuntimeError on a closed session.

**Arguments.** ``arguments`` must be a JSON object whose only key is ``code``, a string. One
leniency, because small models often write multi-line code as a JSON string with raw newlines or
tabs in it: control characters inside JSON strings are accepted (``json.loads(strict=False)``);
the meaning is unambiguous. Anything else (not JSON, not an object, no ``code``, ``code`` not a
string, other keys) is ``bad_arguments`` with a detail saying what was wrong and a content showing
the expected form; a tool name other than ``python`` is ``unknown_tool``. Neither runs anything
nor takes a cell number.
"""

from __future__ import annotations

import inspect
import json
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stepforge.stages.agent.trajectory import ToolCall
from stepforge.stages.tools.environment import Observation, cut_text
from stepforge.stages.tools.sandbox import SandboxLimits, SandboxResult, run_python

TOOL_NAME = "python"
NO_OUTPUT = "(no output)"
RANDOM_SEED = 0


def _default_limits() -> SandboxLimits:
    # Spelled out so that a change of the sandbox's defaults does not silently change this tool's observations.
    return SandboxLimits(cpu_seconds=5, wall_seconds=10, memory_mb=512, max_processes=0, output_bytes=65536)


class PythonToolConfig(BaseModel):
    """The ``python`` tool: a notebook-like sandboxed interpreter (see ``stages/tools/python_env.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_observation_chars: int = Field(
        default=2000,
        ge=200,
        description="Characters of a call's output shown to the model; the rest is cut in the middle and marked "
        "'…[N more characters]' (the end of an error's explanation is kept).",
    )
    limits: SandboxLimits = Field(
        default_factory=_default_limits,
        description="Sandbox limits of each call's run, which also re-runs the episode's earlier successful cells.",
    )
    display_last_expression: bool = Field(
        default=True,
        description="Print the repr of a cell's final bare expression when it is not None, as Jupyter does.",
    )


@dataclass(frozen=True)
class Cell:
    """A kept cell of a session: its number (``<cell N>``) and source."""

    number: int
    code: str


class PythonEnvironment:
    """The ``python`` environment; immutable, so one instance serves any number of sessions and threads."""

    name = TOOL_NAME
    version = 1
    code_tool = TOOL_NAME
    """The tool whose one argument is ``{"code": ...}``: a runner may read fenced code blocks as calls of it."""

    def __init__(self, config: PythonToolConfig | None = None) -> None:
        self.config = config if config is not None else PythonToolConfig()

    def tools(self) -> list[dict[str, Any]]:
        limits = self.config.limits
        return [
            {
                "type": "function",
                "function": {
                    "name": TOOL_NAME,
                    "description": (
                        "Run Python 3 code, like a notebook cell: variables, functions and imports of earlier "
                        "successful calls are kept; a call that fails keeps nothing. Returns what the code "
                        "prints (stdout and stderr) and the value of a final bare expression. numpy and sympy "
                        f"are available; no network, no subprocesses; about {_seconds(limits.wall_seconds)} s "
                        "per call."
                    ),
                    "parameters": {
                        "type": "object",
                        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
                        "required": ["code"],
                        "additionalProperties": False,
                    },
                },
            }
        ]

    def system_prompt(self) -> str:
        # Stored in each task's context at ingest, so it names no setting: a setting changed later
        # must not leave the policy reading stale numbers. Fenced code blocks are offered first:
        # small code models write them far more reliably than JSON tool calls (both are read).
        return (
            "You are a careful math assistant with a Python tool. Work step by step: first say what to compute, "
            "then write Python code in a ```python code block and stop; the block runs like a notebook cell and you then see what it prints. "
            "Variables, functions and imports of earlier cells that ran without error are kept; a cell that "
            "fails keeps nothing, so fix it and run it again whole. Use the tool for every calculation and "
            "print the results you need. numpy and sympy are installed; there is no internet access, no "
            "subprocess, no file access outside the working directory, and long output is cut.\n"
            "Only after the code's output has shown the result, reply without code and end with the final "
            "answer inside answer tags, for example: <answer>42</answer>"
        )

    def reset(self, task: Mapping[str, Any] | None = None) -> PythonSession:
        """A new episode; the task is not used (the interpreter starts empty whatever the problem)."""
        return PythonSession(self.config)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "max_observation_chars": self.config.max_observation_chars,
            "display_last_expression": self.config.display_last_expression,
            "limits": self.config.limits.model_dump(mode="json"),
            "random_seed": RANDOM_SEED,
        }


class PythonSession:
    """One episode of the ``python`` environment: the kept cells, nothing else (no process between calls)."""

    def __init__(self, config: PythonToolConfig) -> None:
        self._config = config
        self._cells: tuple[Cell, ...] = ()
        self._numbered = 0
        self._closed = False
        self._lock = threading.Lock()  # one call at a time per session; different sessions never wait on each other

    @property
    def cells(self) -> tuple[Cell, ...]:
        """The cells a new call re-runs first: the ok cells since the start or the last reset, in order."""
        return self._cells

    def execute(self, call: ToolCall) -> Observation:
        with self._lock:
            if self._closed:
                raise RuntimeError("the session is closed")
            if call.name != TOOL_NAME:
                return self._observation(
                    f"Error: there is no tool named {call.name!r}. The only tool is {TOOL_NAME!r}, called with "
                    '{"code": "<python code>"}.',
                    "unknown_tool",
                    f"unknown tool {call.name!r} (tools: {TOOL_NAME})",
                )
            code, problem = parse_arguments(call.arguments)
            if code is None:
                return self._observation(
                    f"Error: {problem}. Call the python tool with a JSON object holding one string, for example "
                    '{"code": "x = 2 + 3\\nprint(x)"}. Nothing was run.',
                    "bad_arguments",
                    f"arguments are not a JSON object with a 'code' string: {problem}",
                )
            self._numbered += 1
            cell = Cell(self._numbered, code)
            observation, keep, reset = self._run(cell)
            if reset:
                self._cells = ()
            elif keep:
                self._cells = (*self._cells, cell)
            return observation

    def replay(self, calls: Sequence[ToolCall]) -> list[Observation]:
        """Execute ``calls`` in order: the state (and cell numbers) a stored prefix of calls leads to.

        Each call is one run that re-runs the cells kept before it, as when the episode first ran; compare
        the observations with the stored ones to see whether the prefix replayed faithfully."""
        return [self.execute(call) for call in calls]

    def close(self) -> None:
        self._closed = True
        self._cells = ()

    def __enter__(self) -> PythonSession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # -- one run --------------------------------------------------------------------------------------
    def _run(self, cell: Cell) -> tuple[Observation, bool, bool]:
        """(observation, whether to keep the cell, whether the state was lost and must be reset)."""
        token = secrets.token_hex(16)
        program = driver_program(self._cells, cell, token, self._config.display_last_expression)
        result = run_python(program, self._config.limits)
        reports = _Reports.parse(result.stderr, token)
        limits = self._config.limits
        if self._cells and not reports.replayed:
            return self._replay_failure(result, reports, token), False, True
        output = result.stdout
        status = result.status
        if status == "ok":
            return self._observation(output or NO_OUTPUT, "ok", ""), True, False
        detail = result.detail
        replay_note = ""
        if self._cells:
            count = len(self._cells)
            replay_note = f" (this limit includes re-running the {count} earlier cell{'s' if count > 1 else ''})"
        # Every explanation starts "Error:", on a line of its own, so a reader of the transcript (the
        # agent tool checks' ``tool_error`` patterns, a judge) sees the cell failed whatever it printed.
        explanation = reports.traceback
        if status == "error":
            detail = reports.exit or _clean_detail(result, token)
            explanation = explanation or detail
        elif status == "blocked":
            what = detail.removeprefix("blocked: ")
            explanation += (
                f"Error: Blocked by the sandbox: {what}. There is no network, no subprocess and no file access outside "
                "the working directory; nothing from this cell is kept."
            )
        elif status == "timeout":
            explanation += (
                f"Error: Timed out: the cell was stopped after {_seconds(limits.wall_seconds)} s{replay_note}; nothing "
                "from this cell is kept."
            )
        elif status == "cpu_limit":
            explanation += (
                f"Error: Stopped: the cell used more than {_seconds(limits.cpu_seconds)} s of CPU time{replay_note}; "
                "nothing from this cell is kept."
            )
        elif status == "memory_limit":
            explanation += (
                f"Error: Out of memory: the cell went over the {limits.memory_mb} MB limit; nothing from this cell is kept."
            )
        elif status == "output_limit":
            explanation += (
                f"Error: Stopped: the cell printed more than {limits.output_bytes} bytes; print less (a summary or a "
                "slice). Nothing from this cell is kept."
            )
        return self._failure(output, explanation, status, detail), False, False

    def _replay_failure(self, result: SandboxResult, reports: _Reports, token: str) -> Observation:
        count = len(self._cells)
        status = result.status if result.status != "ok" else "error"
        cause = reports.exit or _clean_detail(result, token)
        if reports.replay_failed is not None:
            detail = f"replaying <cell {reports.replay_failed}> failed: {cause}"
        else:
            detail = f"replaying the earlier cells failed: {cause}"
        explanation = (
            f"{reports.traceback}The {count} earlier cell{'s' if count > 1 else ''} of this session could not be "
            f"re-run to restore its state ({detail}). The state was reset, as after a kernel restart: nothing "
            "defined before is kept. This cell was not run; run again what it needs."
        )
        return self._failure("", explanation, status, detail)

    def _failure(self, output: str, explanation: str, status: str, detail: str) -> Observation:
        limit = self._config.max_observation_chars
        tail = ("\n" if output and not output.endswith("\n") else "") + explanation
        # The end of the explanation (the exception line, the innermost frames) is kept: what the output leaves
        # of the budget, at least half and at most three quarters of it (the first frames name the cell's lines).
        keep_end = min(len(tail), max(limit // 2, min(limit - len(output), limit * 3 // 4)))
        content, truncated = cut_text(output + tail, limit, keep_end)
        return Observation(content, status, detail, truncated)  # type: ignore[arg-type]

    def _observation(self, text: str, status: str, detail: str) -> Observation:
        content, truncated = cut_text(text, self._config.max_observation_chars)
        return Observation(content, status, detail, truncated)  # type: ignore[arg-type]


def parse_arguments(arguments: str) -> tuple[str | None, str]:
    """(the code, "") for valid arguments, else (None, what is wrong with them). See the module docstring."""
    if not isinstance(arguments, str):
        return None, f"the arguments are {type(arguments).__name__}, not a JSON string"
    try:
        value = json.loads(arguments, strict=False)
    except ValueError as error:
        return None, f"the arguments are not valid JSON ({error})"
    if not isinstance(value, dict):
        return None, f"the arguments are a JSON {_json_type(value)}, not an object"
    if "code" not in value:
        keys = ", ".join(repr(k) for k in value) or "none"
        return None, f"the arguments have no 'code' key (keys: {keys})"
    if not isinstance(value["code"], str):
        return None, f"'code' is a JSON {_json_type(value['code'])}, not a string"
    if extra := [key for key in value if key != "code"]:
        return None, f"unexpected argument{'s' if len(extra) > 1 else ''} {', '.join(repr(k) for k in extra)} ('code' is the only one)"
    return value["code"], ""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _seconds(value: float) -> str:
    return f"{value:g}"


def _exit_detail(result: SandboxResult) -> str:
    return f"exit code {result.exit_code}"


def _clean_detail(result: SandboxResult, token: str) -> str:
    """The sandbox's detail, or the exit code where that detail would quote a line of the driver's reports."""
    if not result.detail or token in result.detail:
        return _exit_detail(result)
    return result.detail


@dataclass(frozen=True)
class _Reports:
    """What the driver wrote to its report channel (the run's stderr): see ``_notebook``."""

    replayed: bool
    replay_failed: int | None
    exit: str | None
    traceback: str

    @classmethod
    def parse(cls, stderr: str, token: str) -> _Reports:
        replayed, replay_failed, exit, traceback = False, None, None, []
        in_traceback = False
        for line in stderr.splitlines(keepends=True):
            word, _, rest = line.rstrip("\n").partition(" ")
            if word != token:
                if in_traceback:
                    traceback.append(line)
                continue
            kind, _, argument = rest.partition(" ")
            in_traceback = False
            if kind == "replayed":
                replayed = True
            elif kind == "replay-failed" and argument.isdigit():
                replay_failed, in_traceback = int(argument), True
            elif kind == "error":
                in_traceback = True
            elif kind == "exit":
                exit = f"SystemExit: {argument}"
        text = "".join(traceback)
        if text and not text.endswith("\n"):
            text += "\n"
        return cls(replayed, replay_failed, exit, text)


def driver_program(cells: Sequence[Cell], cell: Cell, token: str, display: bool) -> str:
    """The script one call runs in the sandbox: ``_notebook``'s source and a call with the cells."""
    config = {
        "token": token,
        "replay": [[c.number, c.code] for c in cells],
        "cell": [cell.number, cell.code],
        "display": display,
        "seed": RANDOM_SEED,
    }
    return f"{_DRIVER_SOURCE}\nglobals().pop({_notebook.__name__!r})({json.dumps(config)!r})\n"


def _notebook(config_json: str) -> None:
    """The driver, run in the sandbox as ``__main__`` (only this function's source is there).

    It removes its own name from ``__main__`` before the cells run, so their namespace holds only what they
    define. That namespace is also this function's globals: every builtin it uses is bound to a local name
    first, so a cell defining ``len``, ``list`` or ``print`` changes nothing here. Report channel: the run's
    original stderr (a duplicate of descriptor 2, taken before 1 and 2 are pointed elsewhere), lines
    ``<token> <kind> [argument]``: ``replayed`` once the kept cells ran, ``replay-failed <n>`` or ``error``
    followed by the traceback, ``exit <code>``. The token is new for every run, and the cells' output never
    reaches that channel.
    """
    import ast
    import builtins
    import json
    import linecache
    import os
    import random
    import sys
    import traceback

    config = json.loads(config_json)
    token = config["token"]
    display = config["display"]
    namespace = globals()
    write, dup, dup2, devnull, write_only = os.write, os.dup, os.dup2, os.devnull, os.O_WRONLY
    print_, repr_, exec_, eval_, compile_ = builtins.print, builtins.repr, builtins.exec, builtins.eval, builtins.compile
    isinstance_, type_, int_, open_ = builtins.isinstance, builtins.type, builtins.int, builtins.open
    base_exception, system_exit = builtins.BaseException, builtins.SystemExit
    parse, expression_node, expression_class = ast.parse, ast.Expression, ast.Expr
    exception_report, stack_summary = traceback.TracebackException, traceback.StackSummary
    lines_cache = linecache.cache

    real_stdout, reports = dup(1), dup(2)
    sink = os.open(devnull, write_only)
    quiet = open_(devnull, "w")  # noqa: SIM115 - stays open for the process's life
    random.seed(config["seed"])

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except base_exception:  # noqa: S110 - a stream a cell replaced or closed
                pass

    def report(text):
        data = text.encode("utf-8", "backslashreplace")
        while data:
            data = data[write(reports, data) :]

    def formatted(error):
        """The traceback from the first frame of a cell on, or at least the exception's name."""
        try:
            trace = error.__traceback__
            while trace is not None and not trace.tb_frame.f_code.co_filename.startswith("<cell "):
                trace = trace.tb_next
            shown = exception_report(type_(error), error, trace, compact=True)
            pending = [shown]
            while pending:  # the sandbox's audit hook is no frame of the code's (it raised a blocked call's error)
                one = pending.pop()
                if one is None:
                    continue
                one.stack = stack_summary.from_list(
                    [frame for frame in one.stack if not (frame.filename == "<string>" and frame.name == "audit_hook")]
                )
                pending += [one.__cause__, one.__context__]
            text = "".join(shown.format())
        except base_exception:  # e.g. out of memory while formatting
            text = type_(error).__name__ + "\n"
        return text

    def ends_with_semicolon(code, node):
        """Whether ``;`` follows the statement ``node`` (Jupyter's way to not display the last value)."""
        lines = code.encode("utf-8", "surrogatepass").splitlines(keepends=True)
        rest = b"".join([lines[node.end_lineno - 1][node.end_col_offset :], *lines[node.end_lineno :]])
        return rest.lstrip().startswith(b";")

    def run_cell(number, code):
        name = f"<cell {number}>"
        lines_cache[name] = (code.__len__(), None, code.splitlines(keepends=True), name)  # mtime None: kept
        tree = parse(code, name)
        last = None
        if display and tree.body and isinstance_(tree.body[-1], expression_class):
            if not ends_with_semicolon(code, tree.body[-1]):
                last = tree.body.pop()
        exec_(compile_(tree, name, "exec", dont_inherit=True), namespace)
        if last is not None:
            value = eval_(compile_(expression_node(last.value), name, "eval", dont_inherit=True), namespace)
            if value is not None:
                print_(repr_(value))

    def to_output():
        flush()
        dup2(real_stdout, 1)
        dup2(real_stdout, 2)  # stderr into stdout: the cell's output in the order it was written

    def fail(kind, error):
        """Report the failure, then end the run as the error would have (the sandbox classifies it)."""
        to_output()
        if isinstance_(error, system_exit):
            code = error.code
            if not isinstance_(code, int_):
                print_(code, file=sys.__stderr__)  # as the interpreter does with sys.exit("message")
            shown = f"{code}".partition("\n")[0]
            report(f"{token} {kind}\n{token} exit {shown}\n")
            raise system_exit(code if isinstance_(code, int_) else 1) from None
        report(f"{token} {kind}\n")
        report(formatted(error))
        sys.stderr = quiet  # the sandbox's own traceback would name the driver's frames
        raise error

    flush()
    dup2(sink, 1)
    dup2(sink, 2)
    for number, code in config["replay"]:
        try:
            run_cell(number, code)
        except system_exit as stop:
            if stop.code is None or stop.code == 0:
                continue  # it ended early, as it did when it ran
            fail(f"replay-failed {number}", stop)
        except base_exception as error:  # reported, then re-raised
            fail(f"replay-failed {number}", error)
    to_output()
    report(f"{token} replayed\n")
    number, code = config["cell"]
    try:
        run_cell(number, code)
    except system_exit as stop:
        if stop.code is None or stop.code == 0:
            raise
        fail("error", stop)
    except base_exception as error:  # reported, then re-raised
        fail("error", error)
    flush()


# Read once, when this module is imported: a later edit of the file must not change what runs.
_DRIVER_SOURCE = inspect.getsource(_notebook)
