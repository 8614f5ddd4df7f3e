"""The ``python`` tool environment against the real sandbox: real interpreters, limits and audit hook, no mocks.

Notebook semantics by re-running the kept cells, what an observation shows and where it is cut,
hostile code contained and the session usable afterwards, arguments, replay of a stored prefix.
Limits are small where a test waits for one (1 s of CPU, 3 s of wall time, as in test_sandbox.py),
and no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from stepforge.stages.agent.trajectory import ToolCall, final_answer
from stepforge.stages.tools.environment import (
    OBSERVATION_STATUSES,
    Environment,
    Observation,
    Session,
    cut_text,
    environment,
)
from stepforge.stages.tools.python_env import NO_OUTPUT, Cell, PythonEnvironment, PythonToolConfig, parse_arguments
from stepforge.stages.tools.sandbox import SandboxLimits, run_python

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3)
MARK = re.compile(r"…\[(\d+) more characters\]")


def python(code: str, call_id: str = "call") -> ToolCall:
    return ToolCall(call_id, "python", json.dumps({"code": code}))


def env(**settings: object) -> PythonEnvironment:
    settings.setdefault("limits", FAST)
    return PythonEnvironment(PythonToolConfig(**settings))


def within_limit(observation: Observation, limit: int) -> bool:
    """At most ``limit`` characters besides the marks of cuts."""
    marks = MARK.findall(observation.content)
    shown = len(MARK.sub("", observation.content))
    return shown <= limit and bool(marks) == observation.truncated


# The interface.


def test_the_registry_builds_the_python_environment_and_names_the_choices_otherwise():
    default = environment("python", None)
    assert isinstance(default, PythonEnvironment) and isinstance(default, Environment)
    assert default.name == "python" and default.version >= 1
    assert default.config == PythonToolConfig()
    small = environment("python", {"max_observation_chars": 500})
    assert small.config.max_observation_chars == 500
    assert environment("python", small.config).config is small.config
    with pytest.raises(ValueError, match="'shell'.*choices: python"):
        environment("shell", None)
    with pytest.raises(ValidationError):
        environment("python", {"max_chars": 5})  # extra="forbid"


def test_config_defaults_and_identity():
    config = PythonToolConfig()
    assert config.max_observation_chars == 2000 and config.display_last_expression is True
    assert config.limits.memory_mb == 512 and config.limits.wall_seconds == 10 and config.limits.cpu_seconds <= 10
    with pytest.raises(ValidationError):
        config.max_observation_chars = 10  # frozen
    identity = PythonEnvironment(config).identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["name"] == "python" and identity["version"] == PythonEnvironment.version
    assert identity["limits"] == config.limits.model_dump(mode="json")
    for changed in ({"max_observation_chars": 999}, {"display_last_expression": False}, {"limits": FAST}):
        assert PythonEnvironment(PythonToolConfig(**changed)).identity() != identity


def test_tools_and_system_prompt():
    environment_ = PythonEnvironment()
    [tool] = environment_.tools()
    assert tool["type"] == "function"
    function = tool["function"]
    assert function["name"] == "python" == environment_.code_tool and function["description"]
    assert function["parameters"]["required"] == ["code"]
    assert function["parameters"]["properties"]["code"]["type"] == "string"
    prompt = environment_.system_prompt()
    assert "python" in prompt and "<answer>" in prompt
    example = prompt[prompt.index("<answer>") :]
    assert final_answer({"role": "assistant", "content": example}) == "42"


def test_a_session_is_a_context_manager_and_refuses_calls_once_closed():
    with env().reset({"question": "ignored"}) as session:
        assert isinstance(session, Session)
        assert session.execute(python("x = 1")).ok
    with pytest.raises(RuntimeError, match="closed"):
        session.execute(python("print(1)"))
    session.close()  # idempotent


def test_cut_text_marks_the_cut_and_keeps_the_end_when_asked():
    assert cut_text("abc", 3) == ("abc", False)
    assert cut_text("abcdef", 4) == ("abcd…[2 more characters]", True)
    assert cut_text("abcdef", 4, keep_end=1) == ("abc…[2 more characters]f", True)


# Notebook semantics.


def test_state_carries_across_calls():
    session = env().reset({})
    first = session.execute(python("x = 3"))
    assert first == Observation(NO_OUTPUT, "ok", "", False)
    assert session.execute(python("print(x * 2)")) == Observation("6\n", "ok", "", False)
    assert session.execute(python("def double(n):\n    return 2 * n\nimport math")).ok
    assert session.execute(python("print(double(x), math.factorial(x))")).content == "6 6\n"
    assert [cell.number for cell in session.cells] == [1, 2, 3, 4]
    assert session.cells[0] == Cell(1, "x = 3")


def test_a_failing_cell_keeps_nothing_and_is_not_replayed():
    session = env().reset({})
    assert session.execute(python("x = 1")).ok
    failed = session.execute(python("y = 2\nx = 100\nprint('partial')\n1 / 0"))
    assert failed.status == "error" and failed.detail == "ZeroDivisionError: division by zero"
    assert failed.content.startswith("partial\nTraceback (most recent call last):\n")
    assert failed.content.endswith("ZeroDivisionError: division by zero\n")
    assert [cell.code for cell in session.cells] == ["x = 1"]
    # Were the failing cell replayed, its ZeroDivisionError would fail this call, and x would be 100.
    after = session.execute(python("print(x, 'y' in globals())"))
    assert after == Observation("1 False\n", "ok", "", False)
    assert [cell.number for cell in session.cells] == [1, 3]


def test_the_earlier_cells_output_is_not_repeated():
    session = env().reset({})
    session.execute(python("import sys\nprint('once')\nprint('err once', file=sys.stderr)\nimport os\nos.write(1, b'raw once')"))
    assert session.execute(python("print('second')")).content == "second\n"


def test_stdout_and_stderr_are_merged_in_the_order_written():
    code = "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')"
    assert env().reset({}).execute(python(code)).content == "a\nb\nc\n"


def test_the_last_expression_is_displayed_like_jupyter():
    session = env().reset({})
    assert session.execute(python("x = 21\nx * 2")).content == "42\n"
    assert session.execute(python("'text'")).content == "'text'\n"  # the repr
    assert session.execute(python("x * 2;")).content == NO_OUTPUT  # a trailing semicolon hides it
    assert session.execute(python("x * 2  ;  # hidden")).content == NO_OUTPUT
    assert session.execute(python("x * 2  # shown;")).content == "42\n"
    assert session.execute(python("None")).content == NO_OUTPUT
    assert session.execute(python("print('once')")).content == "once\n"  # print's None is not shown
    assert session.execute(python("if x:\n    x")).content == NO_OUTPUT  # only a top-level last statement
    assert session.execute(python("y = 1\n[y, 'é']")).content == "[1, 'é']\n"
    quiet = env(display_last_expression=False).reset({})
    assert quiet.execute(python("1 + 1")).content == NO_OUTPUT


def test_an_observation_matches_running_the_same_code_directly():
    """A first cell without a final expression is the same program as a script: same output, status and detail."""
    codes = [
        "print(sum(range(10)))\nprint('done')",
        "import sympy\nx = sympy.Symbol('x')\nprint(sympy.integrate(x**2, x))",
        "import numpy\nprint(numpy.arange(6).reshape(2, 3).sum(axis=0))",
        "print('before')\n{}['missing']",
        "int('x')",
        "import socket\nsocket.socket().connect(('1.2.3.4', 80))",
        "open('/etc/passwd').read()",
    ]
    limits = SandboxLimits(cpu_seconds=10, wall_seconds=30)  # importing sympy takes about a CPU second
    for code in codes:
        direct = run_python(code, limits)
        observed = PythonEnvironment(PythonToolConfig(limits=limits)).reset({}).execute(python(code))
        assert (observed.status, observed.detail) == (direct.status, direct.detail), code
        assert observed.content.startswith(direct.stdout), code
        if direct.ok:
            assert observed.content == direct.stdout


def test_tracebacks_name_the_cells_show_their_lines_and_hide_the_driver():
    session = env().reset({})
    session.execute(python("def inverse(n):\n    return 1 / n"))
    session.execute(python("x = ("))  # a syntax error: cell 2
    failed = session.execute(python("total = 0\ninverse(total)"))
    assert failed.status == "error"
    content = failed.content
    assert 'File "<cell 3>", line 2, in <module>' in content and "inverse(total)" in content
    assert 'File "<cell 1>", line 2, in inverse' in content and "return 1 / n" in content
    assert "solution.py" not in content and "_notebook" not in content and "audit_hook" not in content
    syntax = env().reset({}).execute(python("x = ("))
    assert syntax.status == "error" and syntax.detail.startswith("SyntaxError")
    assert syntax.content.startswith('  File "<cell 1>", line 1\n')


def test_the_sandbox_allows_what_the_notebook_needs():
    """The driver compiles and executes source strings and uses ast and linecache; so may the cells."""
    code = (
        "import ast, linecache, traceback\n"
        "tree = ast.parse('a = 6 * 7')\n"
        "namespace = {}\n"
        "exec(compile(tree, '<mine>', 'exec'), namespace)\n"
        "print(namespace['a'], eval('a + 1', namespace), ast.literal_eval('[1, 2]'))"
    )
    observed = env().reset({}).execute(python(code))
    assert observed == Observation("42 43 [1, 2]\n", "ok", "", False)


def test_exit_ends_a_cell_like_a_script():
    session = env().reset({})
    assert session.execute(python("import sys\nprint('a')\nsys.exit()\nprint('b')")).content == "a\n"
    assert session.execute(python("print('c')")).content == "c\n"  # the replayed exit ends only its cell
    failed = session.execute(python("sys.exit(3)"))
    assert (failed.status, failed.detail) == ("error", "SystemExit: 3")
    message = session.execute(python("sys.exit('bye')"))
    assert (message.status, message.detail) == ("error", "SystemExit: bye") and message.content.startswith("bye\n")
    assert [cell.number for cell in session.cells] == [1, 2]


def test_random_is_seeded_so_a_replay_recomputes_what_was_shown():
    session = env().reset({})
    shown = session.execute(python("import random\nr = random.random()\nprint(r)")).content
    assert session.execute(python("print(r)")).content == shown
    assert env().reset({}).execute(python("import random\nr = random.random()\nprint(r)")).content == shown


def test_sessions_share_nothing_and_run_concurrently():
    environment_ = env(limits=SandboxLimits(cpu_seconds=5, wall_seconds=60))

    def episode(i: int) -> list[str]:
        with environment_.reset({}) as session:
            session.execute(python(f"x = {i}"))
            session.execute(python("x = x * 10"))
            return [session.execute(python("print(x)")).content, session.execute(python("x")).content]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(episode, range(6)))
    assert results == [[f"{i * 10}\n", f"{i * 10}\n"] for i in range(6)]


# What comes back, and where it is cut.


def test_long_output_is_cut_at_the_limit_with_a_marked_cut():
    session = env(max_observation_chars=300).reset({})
    observed = session.execute(python("for i in range(3000):\n    print(i)"))
    assert observed.status == "ok" and observed.truncated and within_limit(observed, 300)
    assert observed.content.startswith("0\n1\n2\n")
    full_length = len("".join(f"{i}\n" for i in range(3000)))
    assert MARK.search(observed.content).group(1) == str(full_length - 300)


def test_an_error_after_long_output_keeps_the_head_of_the_output_and_the_end_of_the_traceback():
    session = env(max_observation_chars=400).reset({})
    observed = session.execute(python("print('x' * 5000)\ndef deep(n):\n    return deep(n - 1) if n else 1 / n\ndeep(50)"))
    assert observed.status == "error" and observed.truncated and within_limit(observed, 400)
    assert observed.content.startswith("xxxxx")
    assert observed.content.endswith("ZeroDivisionError: division by zero\n")
    assert observed.detail == "ZeroDivisionError: division by zero"


def test_a_long_traceback_alone_keeps_its_beginning_and_its_end():
    observed = env(max_observation_chars=400).reset({}).execute(python("raise ValueError('v' * 3000 + 'END')"))
    assert observed.status == "error" and within_limit(observed, 400)
    assert observed.content.startswith("Traceback (most recent call last):\n")
    assert observed.content.endswith("vvvEND\n")


# Hostile calls: each contained, reported, and the session still usable.

HOSTILE = {
    "socket": ("import socket\ns = socket.socket()\ns.connect(('1.2.3.4', 80))", {"blocked"}, "socket.connect 1.2.3.4:80"),
    "urllib": (
        "import urllib.request\nurllib.request.urlopen('http://example.com/', timeout=2).read()",
        {"blocked"},
        "socket.getaddrinfo example.com",
    ),
    "caught_socket": (
        "import socket\ntry:\n    socket.create_connection(('1.2.3.4', 80), timeout=2)\nexcept OSError:\n    print('caught')",
        {"blocked"},
        "socket.getaddrinfo 1.2.3.4",
    ),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", {"blocked"}, "os.fork"),
    "subprocess": ("import subprocess\nsubprocess.run(['cat', '/etc/passwd'])", {"blocked"}, "blocked:"),
    "etc_passwd": ("print(open('/etc/passwd').read())", {"blocked"}, "open /etc/passwd for reading"),
    "parent_file": (f"print(open({str(ROOT / 'pyproject.toml')!r}).read())", {"blocked"}, "pyproject.toml for reading"),
    "parent_listing": (f"import os\nprint(os.listdir({str(ROOT)!r}))", {"blocked"}, "os.listdir"),
    "infinite_loop": ("while True:\n    pass", {"cpu_limit", "timeout"}, ""),
    "sleep": ("import time\ntime.sleep(60)", {"timeout"}, "killed after 3"),
    "huge_output": ("print('x' * 10**7)", {"output_limit"}, "bytes of output"),
    "endless_output": ("while True:\n    print('spam' * 100)", {"output_limit"}, "bytes of output"),
    "memory_at_once": ("x = bytearray(4 * 1024**3)", {"memory_limit"}, "MemoryError"),
    # 256 MB as in test_sandbox.py: filling 512 MB can take more than the test's 1 s of CPU.
    "memory_growing": ("x = []\nwhile True:\n    x.append(' ' * 10**6)", {"memory_limit"}, "MemoryError", 256),
    "recursion": ("def f():\n    return f()\nf()", {"error"}, "RecursionError"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_call_is_contained_and_the_session_goes_on(name):
    code, statuses, detail, *memory_mb = HOSTILE[name]
    limits = FAST.model_copy(update={"memory_mb": memory_mb[0]}) if memory_mb else FAST
    session = env(max_observation_chars=500, limits=limits).reset({})
    assert session.execute(python("x = 3")).ok
    observed = session.execute(python(code))
    assert observed.status in statuses and observed.status in OBSERVATION_STATUSES, observed
    assert detail in observed.detail, observed
    assert observed.content and within_limit(observed, 500), observed
    if observed.status not in ("ok", "error"):
        assert "nothing from this cell is kept" in observed.content.lower(), observed
    assert [cell.code for cell in session.cells] == ["x = 3"]
    assert session.execute(python("print(x * 2)")) == Observation("6\n", "ok", "", False)


def test_what_a_blocked_cell_printed_comes_back_with_the_explanation():
    observed = env().reset({}).execute(python(HOSTILE["caught_socket"][0]))
    assert observed.status == "blocked" and observed.content.startswith("caught\n")
    assert "Blocked by the sandbox: socket.getaddrinfo 1.2.3.4" in observed.content


def test_writing_outside_the_sandbox_is_blocked_and_nothing_is_written(tmp_path):
    target = tmp_path / "written.txt"
    session = env().reset({})
    observed = session.execute(python(f"open({str(target)!r}, 'w').write('x')"))
    assert observed.status == "blocked" and f"open {target} for writing" in observed.detail
    assert not target.exists()
    # Inside its own directory a cell may write, and a later cell finds the file: the replay writes it again.
    assert session.execute(python("with open('notes.txt', 'w') as f:\n    f.write('kept')")).ok
    assert session.execute(python("print(open('notes.txt').read())")).content == "kept\n"


def test_reading_the_parents_secret_file_is_blocked(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("sk-do-not-leak")
    observed = env().reset({}).execute(python(f"print(open({str(secret)!r}).read())"))
    assert observed.status == "blocked" and "sk-do-not-leak" not in observed.content


def test_the_limits_explanation_mentions_the_replayed_cells():
    session = env().reset({})
    session.execute(python("x = 1"))
    observed = session.execute(python("while True:\n    pass"))
    assert observed.status in ("cpu_limit", "timeout")
    assert "re-running the 1 earlier cell" in observed.content


# Arguments.


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ("print(1)", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"code": "print(1)"', "not valid JSON"),
        ('"print(1)"', "a JSON string, not an object"),
        ("[1, 2]", "a JSON array, not an object"),
        ("null", "a JSON null, not an object"),
        ('{"cmd": "print(1)"}', "no 'code' key (keys: 'cmd')"),
        ("{}", "no 'code' key (keys: none)"),
        ('{"code": 3}', "'code' is a JSON number, not a string"),
        ('{"code": ["print(1)"]}', "'code' is a JSON array"),
        ('{"code": "print(1)", "timeout": 5}', "unexpected argument 'timeout'"),
    ],
)
def test_bad_arguments_run_nothing_and_say_what_is_wrong(arguments, problem):
    session = env().reset({})
    session.execute(python("x = 1"))
    observed = session.execute(ToolCall("c", "python", arguments))
    assert observed.status == "bad_arguments"
    assert observed.detail.startswith("arguments are not a JSON object with a 'code' string: ")
    assert problem in observed.detail
    assert '{"code": ' in observed.content and "Nothing was run" in observed.content
    # No cell number taken, state intact.
    assert session.execute(python("x")).content == "1\n"
    assert [cell.number for cell in session.cells] == [1, 2]


def test_raw_newlines_inside_the_code_string_are_accepted():
    arguments = '{"code": "x = 2\nprint(x * 3)"}'  # a literal newline: strict JSON refuses it
    with pytest.raises(json.JSONDecodeError):
        json.loads(arguments)
    assert parse_arguments(arguments) == ("x = 2\nprint(x * 3)", "")
    assert env().reset({}).execute(ToolCall("c", "python", arguments)).content == "6\n"


def test_an_unknown_tool_is_reported_and_runs_nothing():
    session = env().reset({})
    observed = session.execute(ToolCall("c", "bash", json.dumps({"code": "ls"})))
    assert (observed.status, observed.detail) == ("unknown_tool", "unknown tool 'bash' (tools: python)")
    assert "'python'" in observed.content
    assert session.cells == ()


# Replay.

PREFIX = [
    python("import sympy\nx = sympy.Symbol('x')\nroots = sympy.solve(x**2 - 4, x)\nroots", "a"),
    python("1 / 0", "b"),
    ToolCall("c", "python", "not json"),
    python("import random\nnoise = random.random()\nprint(len(roots))", "d"),
    python("roots[0] * 10", "e"),
]


def test_replay_restores_a_prefix_in_a_fresh_session():
    environment_ = env(limits=SandboxLimits(cpu_seconds=10, wall_seconds=30))
    original = environment_.reset({})
    first = [original.execute(call) for call in PREFIX]
    assert [o.status for o in first] == ["ok", "error", "bad_arguments", "ok", "ok"]
    assert first[0].content == "[-2, 2]\n" and first[4].content == "-20\n"
    fresh = environment_.reset({})
    assert fresh.replay(PREFIX) == first
    assert fresh.cells == original.cells
    assert [cell.number for cell in fresh.cells] == [1, 3, 4]
    follow_up = python("print(roots, noise)")
    assert fresh.execute(follow_up) == original.execute(follow_up)


def test_a_replayed_cell_that_fails_now_resets_the_state_and_says_so():
    session = env().reset({})
    session.execute(python("x = 1"))
    # Descriptor 1 is a pipe when a cell runs and /dev/null when it is replayed: fine now, failing on replay.
    trap = "import os, stat\nif stat.S_ISCHR(os.fstat(1).st_mode):\n    raise RuntimeError('replayed')"
    assert session.execute(python(trap)).ok
    observed = session.execute(python("print(x)"))
    assert observed.status == "error"
    assert observed.detail == "replaying <cell 2> failed: RuntimeError: replayed"
    assert "state was reset" in observed.content and "This cell was not run" in observed.content
    assert 'File "<cell 2>", line 3' in observed.content
    assert session.cells == ()
    assert session.execute(python("print('x' in globals())")).content == "False\n"


def test_a_replay_killed_by_the_limits_resets_the_state():
    session = env().reset({})
    trap = "import os, stat\nif stat.S_ISCHR(os.fstat(1).st_mode):\n    while True:\n        pass"
    assert session.execute(python(trap)).ok
    observed = session.execute(python("print(1)"))
    assert observed.status in ("cpu_limit", "timeout")
    assert observed.detail.startswith("replaying the earlier cells failed: ")
    assert session.cells == ()
    assert session.execute(python("print(2)")).content == "2\n"
