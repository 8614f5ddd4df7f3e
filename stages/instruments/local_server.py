"""A real OpenAI-compatible server on this machine: llama.cpp's (``python -m llama_cpp.server``).

Tests and benchmarks of the HTTP backend start one on a free loopback port with a packaged
GGUF, and stop it when they are done. The API key, if any, goes to the server through its
environment (``API_KEY``, read by llama-cpp-python's settings), not its command line, so it
does not show in ``ps``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stepforge.stages.llm.models import resolve_model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    base_url: str  # the API root, ending in /v1
    model: str  # the name the server serves the model under
    model_path: Path
    process: subprocess.Popen


@contextlib.contextmanager
def llamacpp_server(
    model: str = "smollm2-135m",
    *,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    n_batch: int = 512,
    api_key: str | None = None,
    port: int | None = None,
    startup_timeout: float = 120.0,
    log_path: Path | None = None,
) -> Iterator[RunningServer]:
    """Start llama.cpp's server with ``model`` (a packaged name or a .gguf path); stop it on exit.

    The server reuses the previous request's KV cache for a shared prompt prefix and evaluates
    the rest as one batch, and a position's values differ in the last bits with the batch it
    was computed in: the same seeded request can sample differently after a different
    predecessor. ``n_batch=1`` evaluates every token alone, so a sample depends only on its
    request (what tests that compare runs need), at the cost of slower prompt evaluation.
    """
    path = resolve_model(model).path
    port = port or free_port()
    threads = str(n_threads or os.cpu_count() or 1)
    env = {**os.environ}
    env.pop("API_KEY", None)
    if api_key:
        env["API_KEY"] = api_key
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", Path(path).stem,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
        "--n_threads", threads, "--n_threads_batch", threads,
        "--n_batch", str(n_batch), "--n_ubatch", str(n_batch),
    ]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(process, port, startup_timeout)
        yield RunningServer(base_url, Path(path).stem, Path(path), process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log is not subprocess.DEVNULL:
            log.close()


def _wait_ready(process: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"llama.cpp server did not listen on port {port} within {timeout:.0f} s")
