"""The temporary Prefect API of a command dies with the command, however the command ends.

Why. Without ``PREFECT_API_URL``, Prefect 3.8 starts a temporary API server (uvicorn serving
``prefect.server.api.server:create_app``, about 200 MB) as a child process the first time anything
needs the API, and stops it from an ``atexit`` hook. A ``stepforge run`` that is SIGKILLed (``kill
-9``, the OOM killer) or dies of a signal Python does not turn into an exit (SIGTERM, SIGHUP) never
runs that hook, and the server outlives it, orphaned, for as long as the machine is up.

How. ``guard_temporary_server()`` has Prefect start that server now, on the main thread, with the
command and environment Prefect uses, plus one request to the kernel made in the child before it
executes the server: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, "kill me when my parent dies". Only the
kernel is sure to act after a SIGKILL; nothing in the dying process runs. The server is registered
where Prefect's own code looks for its temporary server (``SubprocessASGIServer()`` without a port:
the slot Prefect's test harness uses for the same purpose), so every Prefect client of the process
(flow engine, logs, events) uses it, it is still an ephemeral API to them, and Prefect's ``atexit``
hook still stops it on a normal exit.

Why the main thread. The kernel sends the death signal when the *thread* that forked the child ends,
not the process. Left to Prefect, the server may be started by whichever thread first needs the API,
and a short-lived thread would take the server down with it; the main thread lives as long as the
command.

Elsewhere, nothing changes: with ``PREFECT_API_URL`` set (the server is someone else's), with the
temporary server disabled, off Linux, or when ``prctl`` cannot be reached, Prefect starts (or does
not start) its server exactly as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child killed (SIGKILL) when the calling thread's process
    dies; None where the kernel offers no such request (not Linux, no libc ``prctl``).

    Call it on the thread that will start the child, and start the child from that thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent, sigkill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:
        # Runs in the forked child before exec: one system call, then one check.
        if prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0) != 0:
            return  # not honoured: the server runs unguarded, as it would have without us
        if os.getppid() != parent:
            # The parent died between fork and prctl, so the signal will never come.
            os.kill(os.getpid(), sigkill)

    return preexec


@functools.cache
def _guarded_server_class() -> type:
    # Imported here: the server module pulls in FastAPI and SQLAlchemy, which only a command
    # that runs flows needs.
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class GuardedServer(SubprocessASGIServer):
        """Prefect's temporary server whose process is killed when this process dies."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect 3.8's command and environment (SubprocessASGIServer._run_uvicorn_command),
            # plus the guard. Off the main thread the guard would die with that thread: none then.
            on_main = threading.current_thread() is threading.main_thread()
            return subprocess.Popen(
                args=[
                    sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                    "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                    "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
                ],
                env={
                    **os.environ,
                    "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                preexec_fn=die_with_parent() if on_main else None,
            )

    return GuardedServer


def guard_temporary_server() -> None:
    """Start Prefect's temporary API for this process now, so that it dies with the process.

    Call it on the main thread of a command, before it runs a flow. Does nothing when the process
    uses a configured API, when it already has a temporary one, or where the guard is unavailable.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    if threading.current_thread() is not threading.main_thread() or die_with_parent() is None:
        return
    from prefect.server.api.server import SubprocessASGIServer

    current = SubprocessASGIServer._instances.get(None)
    if current is not None and current.running:
        return  # started already (unguarded); a second server would only add a process
    SubprocessASGIServer._instances.pop(None, None)
    server = _guarded_server_class()()  # registers itself under None, where Prefect's clients look
    server.start()
