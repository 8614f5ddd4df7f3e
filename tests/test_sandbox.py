"""The code sandbox against the real mechanism: real processes, limits, audit hook and namespaces, no mocks.

Every test states an attack or a failure mode and fails if the protection against it breaks. Limits
are small (1 s of CPU, a few seconds of wall time) so the whole file stays well under 30 s.
"""

from __future__ import annotations

import ast
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from stepforge.stages.tools.sandbox import (
    NOBODY,
    SandboxLimits,
    SandboxResult,
    _default_isolation,
    _Isolation,
    _run,
    run_python,
)

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3)


def run(code: str, **limits: object) -> SandboxResult:
    return run_python(code, FAST.model_copy(update=limits) if limits else FAST)


def living_members_of_group(pgid: int) -> list[int]:
    """Processes whose process group is ``pgid`` and that are not zombies (a zombie runs nothing)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# Normal runs and failures of the code.


def test_sympy_result_is_printed_and_the_run_is_ok():
    code = "import sympy, numpy\nx = sympy.Symbol('x')\nprint(sympy.integrate(x**2, x), numpy.arange(4).sum())"
    result = run(code, cpu_seconds=10, wall_seconds=20)  # importing sympy takes about a CPU second
    assert result.status == "ok" and result.ok, result
    assert result.stdout == "x**3/3 6\n"
    assert result.exit_code == 0 and result.detail == "" and result.stderr == ""


def test_an_exception_is_an_error_with_the_last_traceback_line():
    result = run("x = 1\nprint('before')\nx / 0")
    assert result.status == "error" and not result.ok
    assert result.detail == "ZeroDivisionError: division by zero"
    assert result.exit_code == 1 and result.stdout == "before\n"
    assert 'File "solution.py", line 3' in result.stderr
    assert "audit_hook" not in result.stderr and "_child_main" not in result.stderr


def test_syntax_errors_and_nonzero_exits_are_errors():
    assert run("def f(:\n    pass").detail.startswith("SyntaxError")
    exited = run("import sys\nsys.exit(3)")
    assert (exited.status, exited.exit_code, exited.detail) == ("error", 3, "exit code 3")


# Time, memory, files and output.


def test_an_infinite_loop_is_stopped_by_the_cpu_limit_within_seconds():
    started = time.monotonic()
    result = run("while True:\n    pass")
    assert result.status in ("cpu_limit", "timeout"), result
    assert time.monotonic() - started < 5
    if result.status == "cpu_limit":
        assert result.exit_code == -24 and "CPU limit" in result.detail  # SIGXCPU


def test_ignoring_sigxcpu_still_ends_in_cpu_limit_by_the_hard_limit():
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    result = run(code, wall_seconds=5)
    assert result.status in ("cpu_limit", "timeout"), result
    if result.status == "cpu_limit":
        assert result.exit_code == -9  # SIGKILL at the hard limit, one second after the soft one


def test_sleeping_is_stopped_by_the_wall_clock():
    started = time.monotonic()
    result = run("import time\nprint('going to sleep')\ntime.sleep(100)", wall_seconds=1.5)
    assert result.status == "timeout"
    assert result.detail == "killed after 1.5 s wall"
    assert result.stdout == "going to sleep\n", "output before the kill is kept"
    assert 1.5 <= time.monotonic() - started < 4


@pytest.mark.parametrize("code", ["x = bytearray(4 * 1024**3)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_memory_hogs_hit_the_address_space_limit_and_the_parent_is_fine(code):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(code, memory_mb=256)
    assert result.status == "memory_limit", result
    assert "MemoryError" in result.detail
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50_000  # KiB: nothing came to us


def test_a_numpy_allocation_error_is_a_memory_limit():
    result = run("import numpy\nnumpy.zeros(10**10)")
    assert result.status == "memory_limit" and "ArrayMemoryError" in result.detail


def test_files_over_the_size_limit_cannot_be_written():
    result = run("open('big.bin', 'wb').write(b'x' * 20000)", file_bytes=10000)
    assert result.status == "error" and "File too large" in result.detail


@pytest.mark.parametrize("code", ["print('x' * 10**8)", "while True:\n    print('spam' * 100)"])
def test_huge_output_is_cut_and_the_child_killed(code):
    started = time.monotonic()
    result = run(code, output_bytes=10000)
    assert result.status == "output_limit"
    assert 0 < len(result.stdout.encode()) <= 10000
    assert set(result.stdout.replace("\n", "")) <= set("xspam")
    assert time.monotonic() - started < 3


def test_writing_inside_the_working_directory_works_and_the_directory_is_removed():
    code = (
        "import os, pathlib, tempfile\n"
        "open('note.txt', 'w').write('kept')\n"
        "os.mkdir('sub')\n"
        "pathlib.Path('sub/inner.txt').write_text('x')\n"
        "os.rename('sub/inner.txt', 'sub/moved.txt')\n"
        "with tempfile.NamedTemporaryFile('w') as handle:\n"
        "    handle.write('y')\n"
        "print(os.getcwd())\n"
        "print(open('note.txt').read(), sorted(os.listdir('sub')))"
    )
    result = run(code)
    assert result.status == "ok", result
    workdir, content = result.stdout.splitlines()
    assert content == "kept ['moved.txt']"
    assert os.path.basename(workdir).startswith("stepforge-sandbox-")
    assert not os.path.exists(workdir), "the run's directory is removed afterwards"


def test_creating_too_many_files_is_blocked():
    result = run("for i in range(20):\n    open(f'f{i}', 'w').close()", max_files=10)
    assert result.status == "blocked" and "more than 10 files" in result.detail


# Processes.


def test_a_fork_bomb_is_blocked_and_leaves_no_process_behind():
    result = run("import os\nprint(os.getpgid(0), flush=True)\nwhile True:\n    os.fork()")
    assert result.status == "blocked"
    assert result.detail == "blocked: os.fork"
    pgid = int(result.stdout.split()[0])
    assert living_members_of_group(pgid) == []


def test_a_fork_bomb_that_catches_the_error_is_still_reported_as_blocked():
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status == "blocked", "the CPU limit ends it, but the block takes precedence"
    assert result.detail.startswith("blocked: os.fork")


@pytest.mark.parametrize(
    ("code", "event"),
    [
        ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])", "subprocess.Popen"),
        ("import os\nos.system('echo hi')", "os.system"),
        ("import os\nos.execv('/bin/sh', ['sh', '-c', 'echo hi'])", "os.exec"),
        ("import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'echo hi'], {})", "os.posix_spawn"),
        ("import _posixsubprocess\n_posixsubprocess.fork_exec()", "_posixsubprocess.fork_exec"),
        ("import os\nos.kill(os.getppid(), 0)", "os.kill"),
    ],
)
def test_new_programs_and_signals_to_others_are_blocked(code, event):
    result = run(code)
    assert result.status == "blocked" and result.detail.startswith(f"blocked: {event}"), result
    assert "hi" not in result.stdout


def test_max_processes_allows_that_many_forks_and_the_group_kill_ends_the_grandchildren():
    code = (
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(100)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "try:\n"
        "    os.fork()\n"
        "except PermissionError:\n"
        "    print('second fork refused')\n"
    )
    result = run(code, max_processes=1)
    assert result.stdout.splitlines()[1] == "second fork refused"
    assert result.status == "blocked" and result.detail == "blocked: os.fork"
    grandchild = int(result.stdout.split()[0])
    assert not is_running(grandchild), "the sleeping grandchild outlived the run"


# Network.


@pytest.fixture
def listener():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.3)
        yield server


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        server.accept()


def test_connecting_to_a_listening_socket_is_blocked(listener):
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')"
    result = run(code)
    assert result.status == "blocked" and result.detail.startswith("blocked: socket."), result
    assert_no_connection(listener)


def test_without_namespaces_the_audit_hook_alone_blocks_the_connection(listener):
    port = listener.getsockname()[1]
    code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')"
    result = _run(code, FAST, _Isolation("plain", ()), sys.executable)
    assert result.status == "blocked" and result.detail == f"blocked: socket.connect 127.0.0.1:{port}"
    assert_no_connection(listener)


def test_name_resolution_and_unix_sockets_are_blocked():
    assert run("import socket\nsocket.getaddrinfo('example.com', 80)").detail.startswith("blocked: socket.getaddrinfo")
    unix = run("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/var/run/docker.sock')")
    assert unix.detail == "blocked: socket.connect /var/run/docker.sock"


@pytest.mark.skipif(_default_isolation().mode != "namespace", reason="no user+network namespace on this host")
def test_in_the_namespace_only_a_loopback_interface_exists():
    # if_nameindex asks the kernel over netlink in C, with no audit event: this sees the namespace itself.
    result = run("import socket\nprint([name for _, name in socket.if_nameindex()])")
    assert result.status == "ok" and result.stdout == "['lo']\n"


# Files outside the sandbox.


def test_writing_outside_the_working_directory_is_blocked():
    name = f"stepforge-escape-{uuid.uuid4().hex}"
    outside = Path(tempfile.gettempdir()) / name
    for code in [f"open({str(outside)!r}, 'w').write('x')", f"open('../{name}', 'w').write('x')"]:
        result = run(code)
        assert result.status == "blocked" and result.detail == f"blocked: open {outside} for writing", result
        assert not outside.exists()


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.open('sub/../../{name}', os.O_WRONLY | os.O_CREAT)",  # dir_fd is invisible to the hook
        "import os\nos.symlink('/tmp', 'link')\nopen('link/{name}', 'w')",
        "import os\nos.chdir('..')\nopen('{name}', 'w')",
        "import os\nfd = os.open(os.path.dirname(os.__file__), os.O_RDONLY)\nos.open('{name}', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        "import os\nos.mkdir('/tmp/{name}')",
        "import os\nos.rename('solution.py', '../{name}')",
    ],
)
def test_detours_to_create_files_outside_are_blocked(code):
    name = f"stepforge-escape-{uuid.uuid4().hex}"
    result = run(code.format(name=name))
    assert result.status == "blocked", result
    assert not (Path(tempfile.gettempdir()) / name).exists()
    assert not list(Path(os.path.dirname(os.__file__)).glob(f"{name}*"))


@pytest.mark.parametrize(
    "change",
    [
        "os.remove(target)",
        "os.rename(target, target + '.moved')",
        "os.chmod(target, 0o666)",
        "os.truncate(target, 0)",
        "os.utime(target, (0, 0))",
        "open(target, 'a').write('appended')",
        "os.link(target, 'alias')\nopen('alias', 'a').write('appended')",  # a hard link inside would alias it
        "shutil.rmtree(os.path.dirname(target))",
    ],
)
def test_files_outside_cannot_be_changed(tmp_path, change):
    target = tmp_path / "outside.txt"
    target.write_text("original")
    target.chmod(0o600)
    before = target.stat()
    result = run(f"import os, shutil\ntarget = {str(target)!r}\n{change}")
    assert result.status == "blocked", result
    after = target.stat()
    assert target.read_text() == "original"
    assert (after.st_mode, after.st_mtime_ns, after.st_size) == (before.st_mode, before.st_mtime_ns, before.st_size)


def test_reading_outside_the_allowlist_is_blocked():
    home = os.path.expanduser("~")
    for path, code in [
        ("/etc/passwd", "print(open('/etc/passwd').read())"),
        ("/etc", "import os\nprint(os.listdir('/etc'))"),
        (f"{home}/.bashrc", f"print(open({home + '/.bashrc'!r}).read())"),
    ]:
        result = run(code)
        assert result.status == "blocked" and path in result.detail, result
        assert result.stdout == ""


def test_catching_the_blocked_error_does_not_hide_the_block():
    result = run("try:\n    open('/etc/passwd')\nexcept OSError:\n    pass\nprint('carried on')")
    assert result.status == "blocked" and result.exit_code == 0
    assert result.detail == "blocked: open /etc/passwd for reading"
    assert result.stdout == "carried on\n"


@pytest.mark.parametrize(
    "silence",
    [
        "for fd in range(3, 4096):\n    try:\n        os.close(fd)\n    except OSError:\n        pass",
        "r, w = os.pipe()\nfor fd in range(3, 4096):\n    if fd not in (r, w):\n        try:\n            os.dup2(w, fd)\n        except OSError:\n            pass",
    ],
)
def test_closing_or_replacing_the_report_pipe_does_not_hide_a_block(silence):
    code = f"import os\n{silence}\ntry:\n    open('/etc/passwd')\nexcept OSError:\n    pass\nprint('carried on')"
    result = run(code)
    assert result.status == "blocked" and result.stdout == ""


def test_monkeypatching_what_the_hook_might_use_changes_nothing():
    name = f"stepforge-escape-{uuid.uuid4().hex}"
    code = (
        "import builtins, os, os.path, pathlib\n"
        "os.path.realpath = os.path.abspath = lambda path, **_: '/nowhere'\n"
        "os.getcwd = lambda: '/tmp'\n"
        "os.lstat = os.stat = lambda *a, **k: None\n"
        "builtins.str, builtins.type = bytes, lambda x: str\n"
        f"open('/tmp/{name}', 'w')\n"
    )
    result = run(code)
    assert result.status == "blocked" and name in result.detail
    assert not (Path(tempfile.gettempdir()) / name).exists()


@pytest.mark.parametrize(
    "code", ["import gc\ngc.get_referrers(open)", "import sys\nsys.settrace(lambda *a: None)", "import sys\nsys._current_frames()"]
)
def test_reaching_into_the_hook_is_blocked(code):
    assert run(code).status == "blocked"


@pytest.mark.parametrize(
    "call",
    [
        "os.mkfifo('/tmp/{name}')",
        "os.mknod('/tmp/{name}')",
        "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGTERM)",
        "os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
        "os.sched_setaffinity(os.getppid(), {{0}})",
        "time.clock_settime(time.CLOCK_REALTIME, 0.0)",
    ],
)
def test_functions_that_reach_outside_without_an_audit_event_are_gone(call):
    name = f"stepforge-escape-{uuid.uuid4().hex}"
    priority, affinity = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0)
    result = run(f"import os, signal, time\n{call.format(name=name)}")
    assert result.status == "error" and result.detail.startswith("AttributeError"), result
    assert not (Path(tempfile.gettempdir()) / name).exists()
    assert (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0)) == (priority, affinity)


def test_a_fresh_copy_of_a_trimmed_module_is_refused():
    result = run("import sys\ndel sys.modules['posix']\nimport posix\nposix.mkfifo('x')")
    assert result.status == "blocked" and result.detail == "blocked: import posix"


# The parent's secrets.


def test_the_parents_environment_is_not_visible(monkeypatch):
    secret = f"stepforge-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("STEPFORGE_TEST_SECRET", secret)
    from_environ = run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('STEPFORGE_TEST_SECRET'))")
    assert from_environ.status == "ok"
    names, value = from_environ.stdout.splitlines()
    assert value == "None"
    assert set(ast.literal_eval(names)) <= {"PATH", "LANG", "HOME", "TMPDIR", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    for proc_file in ["f'/proc/{os.getppid()}/environ'", "'/proc/self/environ'", f"'/proc/{os.getpid()}/environ'"]:
        result = run(f"import os\nprint(open({proc_file}, 'rb').read())")
        assert result.status == "blocked" and "environ" in result.detail, result
        assert secret not in result.stdout + result.stderr + result.detail


# Native code.


def test_ctypes_is_a_harmless_stand_in_and_real_ctypes_is_blocked():
    sizes = run("import ctypes\nprint(ctypes.sizeof(ctypes.c_long))")
    assert sizes.status == "ok" and sizes.stdout == "8\n", "what sympy needs of ctypes still works"
    libc = run("import ctypes\nctypes.CDLL(None).system(b'echo hi')")
    assert libc.status == "blocked" and libc.detail == "blocked: ctypes.CDLL" and "hi" not in libc.stdout
    for name in ["_ctypes", "ctypes.util"]:
        assert run(f"import {name}").detail == f"blocked: import {name}"
    reloaded = run("import sys\ndel sys.modules['ctypes']\nimport ctypes")
    assert reloaded.detail == "blocked: import ctypes"


def test_native_code_outside_the_standard_library_and_numeric_packages_is_blocked():
    copied = run(
        "import glob, importlib.util, os, shutil\n"
        "source = glob.glob(os.path.dirname(os.__file__) + '/lib-dynload/_json*.so')[0]\n"
        "shutil.copy(source, 'mine.so')\n"
        "try:\n"
        "    importlib.util.module_from_spec(importlib.util.spec_from_file_location('_json', 'mine.so'))\n"
        "except ImportError:\n"
        "    print('no luck')"
    )
    assert copied.status == "blocked" and "native code from" in copied.detail and "mine.so" in copied.detail
    assert copied.stdout == "no luck\n", "reported although the code caught the error"
    assert run("import sqlite3").detail == "blocked: import _sqlite3", "the standard library's refusal, uncaught"
    caught = run("try:\n    import _cffi_backend\nexcept ImportError:\n    pass")
    assert caught.detail == "blocked: import _cffi_backend", "the code's own import is reported even when caught"


def test_a_librarys_optional_import_of_refused_native_code_fails_quietly():
    # sympy's lambdify pulls in numpy.f2py, which tries charset_normalizer (mypyc native code) and copes without.
    code = "from sympy import lambdify, symbols\nx = symbols('x')\nprint(lambdify(x, x**2, 'numpy')(3))"
    result = run(code, cpu_seconds=10, wall_seconds=20)
    assert result.status == "ok" and result.stdout == "9\n", result


# The interface.


def test_concurrent_calls_from_threads_are_independent():
    programs = [f"print({n} ** 2)" for n in range(6)] + ["1 / 0", "open('/etc/passwd')"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, programs))
    assert [r.stdout for r in results[:6]] == [f"{n**2}\n" for n in range(6)]
    assert all(r.ok for r in results[:6])
    assert results[6].detail == "ZeroDivisionError: division by zero"
    assert results[7].status == "blocked"


def test_bad_arguments_raise():
    with pytest.raises(TypeError):
        run_python(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        run_python("print(1)", {"cpu_seconds": 1})  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SandboxLimits(cpu_seconds=0)
    with pytest.raises(ValidationError):
        SandboxLimits(network=True)


def system_python_runnable_by_nobody() -> str | None:
    """A system interpreter the unprivileged user can start, for the uid-dropping fallback (root only)."""
    if os.geteuid() != 0:
        return None
    for candidate in ["/usr/bin/python3", "/usr/local/bin/python3"]:
        if shutil.which(candidate) is None:
            continue
        probe = subprocess.run(
            [candidate, "-I", "-c", "import sys; assert sys.version_info >= (3, 11)"],
            user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, cwd="/", check=False,
        )  # fmt: skip
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(system_python_runnable_by_nobody() is None, reason="needs root and a python3 readable by uid 65534")
def test_without_namespaces_root_drops_to_nobody_and_rlimit_nproc_applies():
    interpreter = system_python_runnable_by_nobody()
    ids = _run("import os\nprint(os.getuid(), os.getgid(), os.getgroups())", FAST, _Isolation("nobody", ()), interpreter)
    assert ids.status == "ok" and ids.stdout == f"{NOBODY} {NOBODY} []\n"
    # The audit hook does not stop threads; the kernel does: RLIMIT_NPROC counts them, and none is allowed.
    thread = _run("import threading\nthreading.Thread(target=print).start()", FAST, _Isolation("nobody", ()), interpreter)
    assert thread.status == "error" and "can't start new thread" in thread.detail, thread
