"""A sandbox for model-written Python: each run is a separate, limited, watched interpreter.

The tool-verification stage runs the code blocks of solution steps and compares what they print with
what the step claims. That code is untrusted: it can loop forever, allocate without bound, print
gigabytes, fork, open sockets, read the parent's API keys or write over the repository. A run is
therefore a fresh ``python -I`` in its own process group, and several independent layers stop it,
so that one failing layer is not the end of protection:

1. **Process and clean-up.** ``sys.executable -I -B -u`` (isolated mode: no ``PYTHON*`` variables,
   no user site, no current directory on ``sys.path``; no ``.pyc`` writes, which the sandbox would
   block; unbuffered, so output printed before a kill is not lost) in a fresh ``tempfile.mkdtemp()``
   as working directory, removed afterwards. ``start_new_session=True`` makes the child the leader
   of its own process group, and the parent SIGKILLs the whole group on timeout and *always* once
   the child is gone, before reaping it (a zombie leader keeps the group id from being reused), so
   grandchildren never outlive a run. No ``preexec_fn``: it is unsafe with threads, and
   ``run_python`` is called from Prefect worker threads; everything the child must do to itself is
   done by a bootstrap (``_child_main``) that runs before the user code.
2. **Kernel limits** (``resource.setrlimit`` in the bootstrap): CPU seconds (SIGXCPU at the soft
   limit, SIGKILL one second later), address space (a big allocation is a ``MemoryError``, not a
   swapping host), file size, no core dumps, a few hundred descriptors. Wall-clock time and output
   volume are enforced by the parent, which reads stdout/stderr incrementally with a cap and kills
   the group when the cap is exceeded, so a huge print never fills the parent's memory.
3. **Environment.** The child gets PATH, LANG=C.UTF-8, HOME and TMPDIR (both the run's directory)
   and the BLAS/OpenMP thread counts set to 1, nothing inherited: the parent's variables (API keys)
   never reach it. The thread counts are not secrets; they exist because OpenBLAS reserves address
   space per core, so on a many-core host ``import numpy`` would not fit in the address-space limit
   (and a pool of threads would spend the CPU budget in parallel). TMPDIR makes ``tempfile`` use the
   run's directory instead of probing ``/tmp``, which the sandbox blocks.
4. **Audit hook** (PEP 578), installed by the bootstrap before the user code and impossible to remove
   afterwards. It blocks network use (connect, bind, sendto, name resolution), new processes
   (fork, exec, spawn, system, ``subprocess``) and signals to other processes, writes and
   directory changes outside the run's directory (paths are resolved: symlinks, ``..``, descriptor
   paths; symlinks and hard links cannot be made), reads outside an allowlist (the run's directory,
   the Python installation, the site-packages directories, a few devices; never ``/etc``,
   ``/proc``, the parent's home), more than ``max_files`` created files, native code outside the
   standard library and a few numeric packages, and the modules that step around the events:
   ``ctypes``/``_ctypes`` and ``_posixsubprocess`` (fork+exec with no event), sub-interpreters
   (hooks are per interpreter), sqlite/dbm (file I/O in C). sympy imports ``ctypes`` (for
   ``sizeof(c_long)``) and ``subprocess`` (thus ``_posixsubprocess``) unconditionally, so the
   bootstrap puts stand-ins in ``sys.modules`` first: a ``ctypes`` with type sizes only and a
   ``_posixsubprocess`` whose ``fork_exec`` is blocked; any other use of them is a block. The hook
   also blocks what could reach into it (``gc.get_referrers``, ``sys.settrace``,
   ``sys._current_frames``) and binds every function it uses before the user code runs, so
   monkeypatching ``os.path`` or ``builtins`` does not change its decisions. The few
   ``os``/``signal``/``time`` functions that reach outside *without* an event (``mkfifo``,
   ``mknod``, ``pidfd_open``/``pidfd_send_signal``, which signal any process, ``setpriority``,
   ``sched_set*``, ``clock_settime``) are deleted from their modules, and a fresh copy of those
   modules is an import the hook refuses. A blocked event raises in the child (``PermissionError``,
   ``ImportError`` for imports) *and* writes a line to a dedicated pipe the parent reads, so user
   code catching the exception cannot hide it: any block makes the run ``blocked``. Closing or
   replacing that pipe is detected (the hook checks its inode) and ends the child with the
   reserved exit code ``CHANNEL_TAMPERED_EXIT``, also ``blocked`` (so is code exiting with it).
5. **Network namespace.** If ``unshare --map-root-user --net`` works (probed once per process),
   the child runs in a new user and network namespace: only a loopback interface that is down, so
   no IP connection is possible even if the audit hook were bypassed. The mapped root also cannot
   read ``/proc/<parent>/environ`` (the kernel's ptrace check fails across the namespace).
   Without a usable ``unshare`` the audit hook alone blocks sockets. RLIMIT_NPROC does not apply
   there (the mapped root is the host's root, which the kernel exempts): forks are stopped by the
   hook and cleaned up by the group kill. When not using the namespace and running as root, the
   child is started as uid/gid 65534 if the interpreter is readable by that user (probed once), so
   that RLIMIT_NPROC applies (set to 1 + ``max_processes``; it counts threads too, and every
   process of uid 65534 on the host, so it errs towards refusing) and other users' ``/proc`` files
   and processes are out of reach; a pyenv interpreter under ``/root`` is not readable by it, and
   then (as for a non-root parent without ``unshare``) the child runs as the parent's user, with the
   audit hook alone between it and the host.

What is not enforced, and why: the audit hook is a tripwire for code that uses Python's APIs, not a
boundary against deliberate attacks on the interpreter. numpy's ``__array_interface__`` and
``as_strided`` and crafted bytecode (``marshal``) give raw memory access, with which the hook could
be switched off, and ``_imp.create_builtin`` (no event; importlib needs it) makes fresh copies of
``posix``/``_signal`` with the deleted functions. Code that goes that far still meets the kernel
layers (limits, network namespace, group kill, clean environment), but not the file and process
rules: writes outside the run's directory, UNIX-domain sockets (the network namespace does not
cover the filesystem) and, in the namespace, signals to the host's root processes (the mapped root
is the host's uid 0; as uid 65534 the kernel refuses) are then possible. A PID and mount namespace
with a read-only root would close that; it is not here because ``unshare --pid`` makes the code
PID 1, which the kernel shields from its own signals (SIGXCPU included). Reads done inside C
libraries (libc's ``/etc/passwd`` lookups for ``pwd``, time zones, OpenBLAS's ``/sys`` probing)
raise no event. Only ``str``/``bytes``/descriptor paths and exact ``pathlib`` paths are accepted
(any other ``os.PathLike`` could answer the hook and the system call differently); a ``pathlib``
class rewritten to do just that is the same kind of deliberate attack. Disk use is bounded only as
``max_files`` x ``file_bytes``, plus unnamed ``O_TMPFILE`` files (at most one per descriptor).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

SandboxStatus = Literal["ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "blocked"]

NOBODY = 65534
"""uid and gid of the unprivileged child when the parent is root and no user namespace is available."""

CHANNEL_TAMPERED_EXIT = 86
"""Exit code of a child whose audit hook found its report pipe replaced or closed; the run is ``blocked``."""

# Native extension modules outside the standard library that user code may load: numeric libraries
# whose file I/O goes through Python's audited open(). Others (duckdb, pyarrow, cffi, torch...) do
# their own I/O in C or load arbitrary libraries.
NATIVE_PACKAGES = ("numpy", "scipy", "gmpy2")

_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_SOLUTION_FILE = "solution.py"
_MAX_DESCRIPTORS = 256
_STATUS_CAP = 65536  # the report pipe is the child's to write; it must not fill the parent's memory either
_READ_CHUNK = 65536
_POLL_SECONDS = 0.1  # how often a silent child is checked for having exited (its grandchildren may hold the pipes)
_DRAIN_SECONDS = 1.0  # after the kill, output still in the pipes is collected this long at most


class SandboxLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="CPU time of the child (RLIMIT_CPU, rounded up to whole seconds): SIGXCPU at the limit, "
        "SIGKILL one second later; the run's status is then cpu_limit.",
    )
    wall_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Wall-clock time after which the parent kills the child's whole process group (status timeout).",
    )
    memory_mb: int = Field(
        default=512,
        ge=32,
        le=1_048_576,
        description="Address space of the child in MiB (RLIMIT_AS); exceeding it is a MemoryError (status memory_limit).",
    )
    max_processes: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Forks the code may make in total (0 = none); each forked process has its own CPU limit, the "
        "wall-clock limit covers them all. Exec, spawn and subprocess stay blocked: a new program would run without "
        "the audit hook.",
    )
    output_bytes: int = Field(
        default=65536,
        ge=1,
        description="Bytes of stdout+stderr captured; more and the child is killed (status output_limit).",
    )
    file_bytes: int = Field(
        default=1_048_576,
        ge=0,
        description="Largest file the code may write in its directory (RLIMIT_FSIZE); more is an OSError.",
    )
    max_files: int = Field(
        default=256,
        ge=0,
        description="Files and directories the code may create; with file_bytes this bounds its disk use.",
    )


@dataclass(frozen=True)
class SandboxResult:
    status: SandboxStatus
    exit_code: int | None
    """The child's exit code, negative for a signal (as in ``subprocess``); None if it could not be collected."""
    stdout: str
    """What the code printed, as UTF-8 (undecodable bytes replaced): stdout and stderr together keep at most ``output_bytes`` bytes."""
    stderr: str
    detail: str
    """Why the status is not ok, e.g. "blocked: socket.connect 127.0.0.1:80", "ZeroDivisionError: division by zero"."""
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Isolation(NamedTuple):
    mode: Literal["namespace", "nobody", "plain"]
    prefix: tuple[str, ...]
    """Command that runs the interpreter command line after it (``unshare ... --``), or nothing."""


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a script in a fresh sandboxed interpreter and report how it ended.

    Safe to call from several threads at once. Never raises because of what the code does; raises
    TypeError for arguments of the wrong type and OSError if the sandboxed interpreter cannot be
    started (before any of the code ran), so that a broken host is not mistaken for broken code.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, not {type(code).__name__}")
    if limits is None:
        limits = SandboxLimits()
    elif not isinstance(limits, SandboxLimits):
        raise TypeError(f"limits must be SandboxLimits, not {type(limits).__name__}")
    return _run(code, limits, _default_isolation(), sys.executable)


_isolation_lock = threading.Lock()
_isolation: _Isolation | None = None


def _default_isolation() -> _Isolation:
    """The strongest isolation that works here, probed on first use and then kept for the process."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe_isolation(sys.executable)
        return _isolation


def _probe_isolation(executable: str) -> _Isolation:
    unshare = shutil.which("unshare")
    if unshare is not None:
        prefix = (unshare, "--map-root-user", "--net", "--")
        if _starts([*prefix, executable, "-I", "-c", "pass"]):
            return _Isolation("namespace", prefix)
    if os.geteuid() == 0 and _starts([executable, "-I", "-c", "pass"], user=NOBODY, group=NOBODY, extra_groups=[]):
        return _Isolation("nobody", ())
    return _Isolation("plain", ())


def _starts(argv: list[str], **popen_options: object) -> bool:
    try:
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": _CHILD_PATH, "LANG": "C.UTF-8"},
            cwd="/",
            timeout=30,
            check=False,
            **popen_options,  # type: ignore[arg-type]
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return completed.returncode == 0


def _run(code: str, limits: SandboxLimits, isolation: _Isolation, executable: str) -> SandboxResult:
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="stepforge-sandbox-")
    try:
        solution = os.path.join(workdir, _SOLUTION_FILE)
        with open(solution, "w", encoding="utf-8", errors="surrogatepass") as file:
            file.write(code)
        popen_options: dict[str, object] = {}
        if isolation.mode == "nobody":
            os.chmod(solution, 0o644)
            os.chown(workdir, NOBODY, NOBODY)
            popen_options = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        cpu_limit = max(1, math.ceil(limits.cpu_seconds))
        status_read, status_write = os.pipe()
        try:
            config = {
                "status_fd": status_write,
                "cpu_seconds": cpu_limit,
                "memory_bytes": limits.memory_mb * 1024 * 1024,
                "file_bytes": limits.file_bytes,
                "descriptors": _MAX_DESCRIPTORS,
                # The child itself counts as one of its user's processes.
                "nproc": 1 + limits.max_processes if isolation.mode == "nobody" else None,
                "max_processes": limits.max_processes,
                "max_files": limits.max_files,
                "native_packages": list(NATIVE_PACKAGES),
                "tampered_exit": CHANNEL_TAMPERED_EXIT,
                "solution": _SOLUTION_FILE,
            }
            argv = [*isolation.prefix, executable, "-I", "-B", "-u", "-c", _CHILD_SOURCE, json.dumps(config)]
            env = {
                "PATH": _CHILD_PATH,
                "LANG": "C.UTF-8",
                "HOME": workdir,
                "TMPDIR": workdir,
                "OPENBLAS_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(status_write,),
                    start_new_session=True,
                    **popen_options,  # type: ignore[arg-type]
                )
            finally:
                os.close(status_write)
            try:
                watched = _watch(process, status_read, limits, started)
            finally:
                _kill_group(process.pid)
                exit_code, cpu_used = _reap(process)
                process.stdout.close()  # type: ignore[union-attr]
                process.stderr.close()  # type: ignore[union-attr]
        finally:
            os.close(status_read)
        return _result(watched, exit_code, cpu_used, cpu_limit, limits, time.monotonic() - started)
    finally:
        _remove_tree(workdir)


@dataclass
class _Watched:
    stdout: bytes
    stderr: bytes
    reports: bytes
    stopped_for: Literal["timeout", "output_limit"] | None


def _watch(process: subprocess.Popen, status_read: int, limits: SandboxLimits, started: float) -> _Watched:
    """Collect the child's output and reports until the pipes close, killing it for time or output."""
    names = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr", status_read: "reports"}  # type: ignore[union-attr]
    captured = {"stdout": bytearray(), "stderr": bytearray(), "reports": bytearray()}
    output_seen = 0
    stopped_for: Literal["timeout", "output_limit"] | None = None
    killed_at: float | None = None
    deadline = started + limits.wall_seconds
    with selectors.DefaultSelector() as selector:
        for fd in names:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if killed_at is None and now >= deadline:
                stopped_for, killed_at = "timeout", now
                _kill_group(process.pid)
            elif killed_at is None and _has_exited(process.pid):
                # Whatever still holds the pipes is a leftover of the group: kill it, then drain.
                killed_at = now
                _kill_group(process.pid)
            if killed_at is not None and now - killed_at >= _DRAIN_SECONDS:
                break
            wait = deadline - now if killed_at is None else killed_at + _DRAIN_SECONDS - now
            for key, _ in selector.select(max(0.0, min(wait, _POLL_SECONDS))):
                try:
                    chunk = os.read(key.fd, _READ_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                name = names[key.fd]
                if name == "reports":
                    captured[name] += chunk[: _STATUS_CAP - len(captured[name])]
                    continue
                captured[name] += chunk[: max(0, limits.output_bytes - output_seen)]
                output_seen += len(chunk)
                if output_seen > limits.output_bytes and stopped_for is None:
                    stopped_for = "output_limit"
                    if killed_at is None:
                        killed_at = time.monotonic()
                        _kill_group(process.pid)
    return _Watched(bytes(captured["stdout"]), bytes(captured["stderr"]), bytes(captured["reports"]), stopped_for)


def _has_exited(pid: int) -> bool:
    """Whether the child has ended, without reaping it: while it is a zombie its group id stays ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


def _reap(process: subprocess.Popen) -> tuple[int | None, float]:
    """The child's exit code and CPU seconds; reaped here with wait4 because Popen does not give rusage."""
    try:
        _, wait_status, usage = os.wait4(process.pid, 0)
    except ChildProcessError:
        return process.returncode, 0.0
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    return process.returncode, usage.ru_utime + usage.ru_stime


def _result(
    watched: _Watched, exit_code: int | None, cpu_used: float, cpu_limit: int, limits: SandboxLimits, seconds: float
) -> SandboxResult:
    blocked, exception, memory_error, started = [], None, False, False
    for line in watched.reports.decode("utf-8", "replace").splitlines():
        kind, _, text = line.partition(" ")
        if kind == "S":
            started = True
        elif kind == "B":
            blocked.append(text)
        elif kind == "E":
            exception = text
        elif kind == "M":
            memory_error = True
    stdout = watched.stdout.decode("utf-8", "replace")
    stderr = watched.stderr.decode("utf-8", "replace")
    if not started and watched.stopped_for is None:
        # Not the code's failure (unshare refused, the interpreter would not start): not a verdict on it.
        raise OSError(f"the sandbox did not start (exit code {exit_code}): {stderr.strip()[-500:]}")

    def result(status: SandboxStatus, detail: str) -> SandboxResult:
        return SandboxResult(status, exit_code, stdout, stderr, detail, round(seconds, 3))

    if blocked:
        more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
        return result("blocked", f"blocked: {blocked[0]}{more}")
    if exception is not None and "blocked by the sandbox: " in exception:
        # A library's import that the hook let fail quietly, but the code needed it.
        return result("blocked", "blocked: " + exception.partition("blocked by the sandbox: ")[2])
    if exit_code == CHANNEL_TAMPERED_EXIT:
        return result("blocked", "blocked: the sandbox's report pipe was replaced or closed")
    if watched.stopped_for == "timeout":
        return result("timeout", f"killed after {limits.wall_seconds} s wall")
    if watched.stopped_for == "output_limit":
        return result("output_limit", f"killed after more than {limits.output_bytes} bytes of output")
    killed_by = -exit_code if exit_code is not None and exit_code < 0 else None
    if killed_by == signal.SIGXCPU or (killed_by == signal.SIGKILL and cpu_used >= cpu_limit - 0.05):
        return result("cpu_limit", f"CPU limit of {cpu_limit} s exceeded")
    if memory_error or (exception or "").startswith("MemoryError"):
        return result("memory_limit", exception or "MemoryError")
    if exit_code == 0:
        return result("ok", "")
    if exception is not None:
        return result("error", exception)
    if killed_by is not None:
        return result("error", f"killed by {signal.Signals(killed_by).name}")
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return result("error", f"exit code {exit_code}" + (f": {last_line}" if last_line else ""))


def _remove_tree(path: str) -> None:
    """Remove the run's directory even where the code took permissions away (as a non-root parent)."""
    try:
        shutil.rmtree(path)
    except OSError:
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                try:
                    os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


def _child_main() -> None:
    """The child's bootstrap, sent as source to ``python -c``: limits, stand-ins, audit hook, then the code.

    Nothing of this module exists in the child, only this function's text: it must be self-contained.
    Its configuration comes as JSON in ``sys.argv[1]``.
    """
    import builtins
    import errno
    import json
    import os
    import pathlib
    import resource
    import signal
    import site
    import stat
    import struct
    import sys
    import time
    import traceback
    import types

    config = json.loads(sys.argv[1])
    status_fd = config["status_fd"]
    audit = sys.audit
    os.write(status_fd, b"S\n")  # the sandbox itself started: what follows is the code's doing

    def lower_limit(which, soft, hard=None):
        hard = soft if hard is None else hard
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))

    lower_limit(resource.RLIMIT_CORE, 0)
    lower_limit(resource.RLIMIT_CPU, config["cpu_seconds"], config["cpu_seconds"] + 1)
    lower_limit(resource.RLIMIT_FSIZE, config["file_bytes"])
    lower_limit(resource.RLIMIT_NOFILE, config["descriptors"])
    if config["nproc"] is not None:
        lower_limit(resource.RLIMIT_NPROC, config["nproc"])

    # Fork tokens live in a pipe whose write end is closed: shared by every process of the run, and
    # nothing can add to them.
    fork_tokens = -1
    if config["max_processes"] > 0:
        fork_tokens, token_writer = os.pipe()
        os.write(token_writer, b"t" * config["max_processes"])
        os.close(token_writer)
        os.set_blocking(fork_tokens, False)

    with open(config["solution"], encoding="utf-8", errors="surrogateescape") as file:
        source = file.read()

    def report(kind, text=""):
        try:
            line = f"{kind} {text}".replace("\n", "\\n")[:1000]
            os.write(status_fd, line.encode("utf-8", "backslashreplace") + b"\n")
        except OSError:
            pass

    def blocked_use(what):
        audit("stepforge.sandbox.blocked", what)  # reported by the hook even if the error below is caught
        return PermissionError(errno.EPERM, f"blocked by the sandbox: {what}")

    # Stand-ins for the modules that step around the audit events (see the module docstring).
    ctypes_stand_in = types.ModuleType("ctypes", "The sandbox's stand-in for ctypes: C type sizes only.")

    class CTypeStandIn:
        _size_ = 0

        def __new__(cls, *args, **kwargs):
            raise blocked_use(f"ctypes.{cls.__name__}()")

    c_types = {
        "c_bool": "?", "c_char": "c", "c_byte": "b", "c_ubyte": "B", "c_short": "h", "c_ushort": "H",
        "c_int": "i", "c_uint": "I", "c_long": "l", "c_ulong": "L", "c_longlong": "q", "c_ulonglong": "Q",
        "c_size_t": "N", "c_ssize_t": "n", "c_float": "f", "c_double": "d", "c_void_p": "P", "c_char_p": "P",
        "c_wchar_p": "P", "c_int8": "b", "c_uint8": "B", "c_int16": "h", "c_uint16": "H", "c_int32": "i",
        "c_uint32": "I", "c_int64": "q", "c_uint64": "Q",
    }  # fmt: skip
    for name, code in c_types.items():
        setattr(ctypes_stand_in, name, type(name, (CTypeStandIn,), {"_size_": struct.calcsize(code), "__module__": "ctypes"}))

    def sizeof(ctype):
        if isinstance(ctype, type) and issubclass(ctype, CTypeStandIn):
            return ctype._size_
        raise blocked_use("ctypes.sizeof")

    def ctypes_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        audit("stepforge.sandbox.blocked", f"ctypes.{name}")
        raise AttributeError(f"ctypes.{name} is blocked by the sandbox")

    ctypes_stand_in.sizeof = sizeof
    ctypes_stand_in.__getattr__ = ctypes_getattr
    ctypes_stand_in.__all__ = ["sizeof", *c_types]
    posixsubprocess_stand_in = types.ModuleType("_posixsubprocess", "The sandbox's stand-in: no fork_exec.")

    def fork_exec(*args, **kwargs):
        raise blocked_use("_posixsubprocess.fork_exec")

    posixsubprocess_stand_in.fork_exec = fork_exec
    sys.modules["ctypes"] = ctypes_stand_in
    sys.modules["_posixsubprocess"] = posixsubprocess_stand_in
    for name in [name for name in sys.modules if name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    # Functions with no audit event that reach outside: FIFOs and device nodes anywhere, signals to
    # other processes through a pidfd, other processes' priority and CPUs, the clock. Removed; a fresh
    # copy of their modules is an import the hook refuses.
    unaudited_os = ["mkfifo", "mknod", "pidfd_open", "setpriority", "sched_setaffinity", "sched_setscheduler", "sched_setparam"]
    for module, names in [
        (os, unaudited_os),
        (sys.modules["posix"], unaudited_os),
        (signal, ["pidfd_send_signal"]),
        (sys.modules["_signal"], ["pidfd_send_signal"]),
        (time, ["clock_settime", "clock_settime_ns"]),
    ]:
        for name in names:
            if hasattr(module, name):
                delattr(module, name)

    def install_audit_hook(status_fd, fork_tokens, max_files, tampered_exit, native_packages):
        # Everything the hook uses is bound here, before the user code can replace os.path, builtins
        # or module attributes; the parameters make its cells its own, not shared with this frame.
        lstat, stat_path, readlink, getcwd, getpid, fstat = os.lstat, os.stat, os.readlink, os.getcwd, os.getpid, os.fstat
        write, read, exit_now, fspath, getframe = os.write, os.read, os._exit, os.fspath, sys._getframe
        is_link, is_dir, is_device = stat.S_ISLNK, stat.S_ISDIR, (stat.S_ISCHR, stat.S_ISBLK)
        type_, str_, bytes_, int_, tuple_, len_ = type, str, bytes, int, tuple, len
        permission_error, import_error, base_exception = PermissionError, ImportError, BaseException
        eperm = errno.EPERM
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        o_creat = os.O_CREAT
        path_classes = (pathlib.PurePosixPath, pathlib.PosixPath)
        any_ = any
        created = 0

        def realpath(path):
            """``path`` (absolute) with symlinks, ``.`` and ``..`` resolved; missing components kept as they are."""
            pending = path.split("/")[::-1]
            parts = []
            links = 0
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if parts:
                        parts.pop()
                    continue
                candidate = "/" + "/".join(parts + [name])
                try:
                    mode = lstat(candidate).st_mode
                except OSError:
                    parts.append(name)
                    continue
                if is_link(mode):
                    links += 1
                    if links > 40:
                        raise permission_error(eperm, "too many symbolic links")
                    target = readlink(candidate)
                    if target.startswith("/"):
                        parts = []
                    pending.extend(target.split("/")[::-1])
                    continue
                parts.append(name)
            return "/" + "/".join(parts)

        tmp = realpath(getcwd())
        roots = [tmp, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(os.__file__)]
        roots += site.getsitepackages()
        read_roots = tuple_({realpath(os.path.abspath(root)) for root in roots})
        stdlib = realpath(os.path.dirname(os.__file__))
        native_roots = [stdlib + "/"]
        for packages in site.getsitepackages():
            packages = realpath(os.path.abspath(packages))
            native_roots += [f"{packages}/{name}/" for name in native_packages]
            native_roots += [f"{packages}/{name}." for name in native_packages]
        native_roots = tuple_(native_roots)
        library_roots = tuple_({f"{root}/" for root in roots[1:] + [realpath(root) for root in roots[1:]]} | {"<frozen "})
        importlib_files = ("<frozen importlib.", f"{stdlib}/importlib/", f"{os.path.dirname(os.__file__)}/importlib/")
        readable_files = frozenset({"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"})
        writable_files = frozenset({"/dev/null"})
        channel = fstat(status_fd)
        channel_id = (channel.st_dev, channel.st_ino)

        network = frozenset({
            "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
            "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo",
            "socket.sethostname",
        })  # fmt: skip
        processes = frozenset({
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.startfile", "pty.spawn",
            "os.killpg", "os.setns", "os.unshare",
        })  # fmt: skip
        forks = frozenset({"os.fork", "os.forkpty"})
        # Reaching into the hook (its frame, its closure), weakening the limits, links that alias outside files.
        never = frozenset({
            "gc.get_referrers", "gc.get_referents", "gc.get_objects", "sys.settrace", "sys.setprofile",
            "sys._current_frames", "resource.setrlimit", "resource.prlimit", "cpython.PyInterpreterState_New",
            "sqlite3.connect", "sqlite3.enable_load_extension", "sqlite3.load_extension", "os.link", "os.symlink",
        })  # fmt: skip
        denied_modules = frozenset({
            "ctypes", "_ctypes", "_posixsubprocess", "_sqlite3", "_dbm", "_gdbm", "readline", "_curses",
            "_curses_panel", "_tkinter", "_multiprocessing", "_posixshmem", "_cffi_backend", "cffi",
            "posix", "_signal", "time",  # already loaded, with functions removed: a fresh copy would restore them
        })  # fmt: skip
        # event: (what it does, ((path argument, dir_fd argument or None), ...))
        path_events = {
            "os.remove": ("change", ((0, 1),)),
            "os.rmdir": ("change", ((0, 1),)),
            "shutil.rmtree": ("change", ((0, 1),)),
            "os.rename": ("change", ((0, 2), (1, 3))),
            "os.chmod": ("change", ((0, 2),)),
            "os.chown": ("change", ((0, 3),)),
            "os.utime": ("change", ((0, 3),)),
            "os.truncate": ("change", ((0, None),)),
            "os.chflags": ("change", ((0, None),)),
            "os.lchflags": ("change", ((0, None),)),
            "os.setxattr": ("change", ((0, None),)),
            "os.removexattr": ("change", ((0, None),)),
            "os.mkdir": ("create", ((0, 2),)),
            "os.listdir": ("read", ((0, None),)),
            "os.scandir": ("read", ((0, None),)),
            "os.getxattr": ("read", ((0, None),)),
            "os.listxattr": ("read", ((0, None),)),
            "os.chdir": ("chdir", ((0, None),)),
        }
        watched = network | processes | forks | never | frozenset(path_events) | frozenset({
            "open", "import", "os.kill", "stepforge.sandbox.blocked",
        })  # fmt: skip
        watched_prefixes = ("ctypes.", "syslog.")

        def text_of(path):
            if type_(path) is str_:
                return path
            if type_(path) is bytes_:
                return path.decode("utf-8", "surrogateescape")
            if type_(path) in path_classes:
                text = fspath(path)
                return text if type_(text) is str_ else None
            return None

        def resolve(path, dir_fd):
            """The real absolute path an event's path argument names, or None if that cannot be known."""
            if path is None:
                path = "."
            if type_(path) is int_:
                target = readlink(f"/proc/self/fd/{path}")
                return target if target.startswith("/") else None
            text = text_of(path)
            if text is None:
                return None
            if not text.startswith("/"):
                if dir_fd is None or dir_fd == -1:
                    base = getcwd()
                elif type_(dir_fd) is int_:
                    base = readlink(f"/proc/self/fd/{dir_fd}")
                    if not base.startswith("/"):
                        return None
                else:
                    return None
                text = base + "/" + text
            return realpath(text)

        def inside(path, root):
            return path == root or path.startswith(root + "/")

        def strictly_in_tmp(path):
            return path.startswith(tmp + "/")

        def readable(path):
            if path in readable_files:
                return True
            for root in read_roots:
                if inside(path, root):
                    return True
            return False

        def exists(path):
            try:
                lstat(path)
            except OSError:
                return False
            return True

        def count_creation(path):
            nonlocal created
            if exists(path):
                return None
            created += 1
            return None if created <= max_files else f"{path} (more than {max_files} files created)"

        def describe(value):
            if type_(value) is str_:
                return value[:300]
            if type_(value) is bytes_:
                return value[:300].decode("utf-8", "backslashreplace")
            if type_(value) is int_:
                return f"{value}"
            if type_(value) is tuple_ and len_(value) == 2 and type_(value[0]) in (str_, bytes_) and type_(value[1]) is int_:
                return f"{describe(value[0])}:{value[1]}"
            return "..."

        def check_open(path, mode, flags):
            if type_(path) is int_:
                return None  # an already open descriptor: it passed this check when it was opened
            text = text_of(path)
            if text is None:
                return "open (a path of a type the sandbox cannot check)"
            if type_(flags) is int_:
                writing = flags & write_flags != 0
            elif type_(mode) is str_:
                writing = any_(letter in mode for letter in "wax+")
            else:
                return f"open {text} (unknown mode)"
            if mode is None and not text.startswith("/") and ".." in text.split("/"):
                # os.open may be relative to a dir_fd the event does not show.
                return f"open {text} (relative path with '..')"
            real = resolve(text, None)
            if real is None:
                return f"open {text}"
            if real in (writable_files if writing else readable_files):
                return None
            try:
                mode = stat_path(real).st_mode
            except OSError:
                mode = 0  # does not exist (yet)
            if is_device[0](mode) or is_device[1](mode):
                return f"open {real} (a device)"
            if writing:
                if not inside(real, tmp):  # tmp itself: O_TMPFILE, an unnamed file in it
                    return f"open {real} for writing"
                if mode == 0 and type_(flags) is int_ and flags & o_creat:
                    return count_creation(real)
                return None
            if not readable(real):
                return f"open {real} for reading"
            if is_dir(mode) and not inside(real, tmp):
                # A directory descriptor outside would let os.open(..., dir_fd=) write anywhere.
                return f"open {real} (a directory outside the sandbox)"
            return None

        def check_path_event(event, args):
            kind, operands = path_events[event]
            for path_index, dir_fd_index in operands:
                dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
                real = resolve(args[path_index], dir_fd)
                shown = f"{event} {real if real is not None else describe(args[path_index])}"
                if real is None:
                    return shown
                if kind == "read" and not readable(real):
                    return shown
                if kind == "chdir" and real != tmp:
                    return shown
                if kind in ("change", "create") and not strictly_in_tmp(real):
                    return shown
                if kind == "create":
                    over = count_creation(real)
                    if over is not None:
                        return f"{event} {over}"
            return None

        def check_import(name, path):
            if type_(name) is not str_:
                return "import (a module name the sandbox cannot check)"
            top = name.partition(".")[0]
            if top in denied_modules or top.startswith(("_test", "_xx")):
                return f"import {name}"
            if path is None:
                return None
            real = resolve(path, None)
            if real is None or not real.startswith(native_roots):
                return f"import {name} (native code from {real or describe(path)})"
            return None

        def imported_by_library():
            """Whether the refused import comes from installed code (an optional import it handles) or from the run's."""
            frame = getframe(2)  # 0 is this function, 1 the hook
            while frame is not None:
                filename = frame.f_code.co_filename
                if type_(filename) is not str_:
                    return False
                if not filename.startswith(importlib_files):
                    return filename.startswith(library_roots)
                frame = frame.f_back
            return False

        def take_fork_token():
            if fork_tokens < 0:
                return False
            try:
                return len_(read(fork_tokens, 1)) == 1
            except base_exception:
                return False

        def verdict(event, args):
            """None to allow the event, else what to report."""
            if event == "open":
                return check_open(args[0], args[1], args[2])
            if event == "import":
                return check_import(args[0], args[1])
            if event in path_events:
                return check_path_event(event, args)
            if event in network:
                # The address or host name; the socket object itself says nothing.
                shown = [describe(value) for value in args[:2] if type_(value) in (str_, bytes_, tuple_)]
                return " ".join([event, *shown])
            if event in forks:
                return None if take_fork_token() else event
            if event == "os.kill":
                return None if type_(args[0]) is int_ and args[0] == getpid() else f"os.kill pid {describe(args[0])}"
            if event in processes:
                return f"{event} {describe(args[0])}" if args else event
            if event == "stepforge.sandbox.blocked":
                return describe(args[0])
            return event  # never, ctypes.*, syslog.*

        def record(detail):
            # At most 4000 bytes: below PIPE_BUF, so lines from several threads or processes never interleave.
            line = ("B " + detail.replace("\n", "\\n"))[:1000].encode("utf-8", "backslashreplace") + b"\n"
            try:
                current = fstat(status_fd)
                if (current.st_dev, current.st_ino) != channel_id:
                    exit_now(tampered_exit)
                write(status_fd, line)
            except base_exception:
                exit_now(tampered_exit)

        def audit_hook(event, args):
            if event not in watched and not event.startswith(watched_prefixes):
                return
            try:
                detail = verdict(event, args)
            except base_exception:
                detail = f"{event} (could not be checked)"
            if detail is None:
                return
            if event == "import":
                # A library's optional import (numpy.f2py tries charset_normalizer, whose native code is not
                # allowed) fails quietly: nothing was loaded. The run's own imports are reported, caught or not;
                # a library import the code depends on fails the code with this message, which reads as blocked.
                try:
                    quiet = imported_by_library()
                except base_exception:
                    quiet = False
                if not quiet:
                    record(detail)
                raise import_error(f"blocked by the sandbox: {detail}")
            record(detail)
            raise permission_error(eperm, f"blocked by the sandbox: {detail}")

        sys.addaudithook(audit_hook)

    lower_limit(resource.RLIMIT_AS, config["memory_bytes"])
    install_audit_hook(status_fd, fork_tokens, config["max_files"], config["tampered_exit"], config["native_packages"])
    del install_audit_hook

    main = types.ModuleType("__main__")
    main.__file__ = config["solution"]
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [config["solution"]]
    try:
        exec(compile(source, config["solution"], "exec", dont_inherit=True), main.__dict__)  # noqa: S102 - the point
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - every failure of the code is reported, then exit 1
        if isinstance(error, MemoryError):
            main.__dict__.clear()  # room to format the traceback
            report("M")
        try:
            report("E", traceback.format_exception_only(type(error), error)[-1].strip())
            shown = traceback.TracebackException(type(error), error, error.__traceback__.tb_next, compact=True)
            shown.stack = traceback.StackSummary.from_list(
                [frame for frame in shown.stack if not (frame.filename == "<string>" and frame.name == "audit_hook")]
            )
            sys.stderr.write("".join(shown.format()))
        except BaseException:  # noqa: BLE001 - an exception whose formatting fails is still an error
            report("E", type(error).__name__)
        raise SystemExit(1) from None


# Read once, when this module is imported: a later edit of the file must not change what children run.
_CHILD_SOURCE = inspect.getsource(_child_main) + "\n_child_main()\n"
