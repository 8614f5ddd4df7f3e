"""``stepforge world serve`` as a simulated continuous-batching server (stages/instruments/batching.py).

The servers run as real subprocesses (``python -m stepforge.stages.instruments.synthetic serve``)
that die with the test process. Only invariants are asserted, never timings a busy machine could
break: the meter never sees more running than the capacity, counts what was sent, holds every
request at least its time to first token, and latency never changes what is sampled.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from stepforge.flows.prefect_server import die_with_parent
from stepforge.stages.instruments.batching import BatchSimulator, LatencyModel
from stepforge.stages.instruments.synthetic import main, make_problems

CAPACITY, TTFT_MS, TPOT_MS, SLOWDOWN = 4, 50.0, 1.0, 4.0
WORLD = ("--slip-rate", "0.2", "--wrong-op-rate", "0.2")
LATENCY = ("--capacity", str(CAPACITY), "--ttft-ms", str(TTFT_MS), "--tpot-ms", str(TPOT_MS),
           "--batch-slowdown", str(SLOWDOWN))
EPS = 1e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def world_server(log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``world serve ARGS`` on a free loopback port; SIGTERM (then SIGKILL) when the block ends."""
    port = free_port()
    with log.open("wb") as out:
        # Killed by the kernel if the test process dies first (pytest-timeout's os._exit included).
        proc = subprocess.Popen(
            [sys.executable, "-m", "stepforge.stages.instruments.synthetic", "serve", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # imports take a while on a busy 2-core machine
        while True:
            assert proc.poll() is None, f"world serve exited:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"world serve did not answer:\n{log.read_text()[-4000:]}"
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def bodies() -> list[tuple[str, dict]]:
    """24 requests of every kind the server answers: seeded, so their outputs are comparable."""
    questions = [row["question"] for row in make_problems(6, (3, 5), seed=3)]
    out: list[tuple[str, dict]] = []
    for i in range(16):
        messages = [{"role": "user", "content": questions[i % 6] + "\n\nSolve it step by step."}]
        if i % 5 == 4:  # vLLM's continuation of a final assistant message
            messages.append({"role": "assistant", "content": "Let me think.\n\n"})
        out.append(("/v1/chat/completions", {"messages": messages, "seed": i, "n": 2 if i % 4 == 3 else 1,
                                             "logprobs": i % 2 == 0, "continue_final_message": i % 5 == 4}))
    for i in range(8):
        out.append(("/v1/completions", {"prompt": f"Question: {questions[i % 6]}\nAnswer:", "seed": 100 + i,
                                        "max_tokens": 30 if i % 2 else 200, "stop": ["\n\n"] if i % 3 else None,
                                        "logprobs": 0}))
    return out


async def fire(url: str, requests: list[tuple[str, dict]]) -> list[dict]:
    """All at once, one connection each; the replies without their (wall-clock) ``created``."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        replies = await asyncio.gather(*(http.post(path, json=body) for path, body in requests))
    for reply in replies:
        assert reply.status_code == 200, reply.text
    return [{k: v for k, v in reply.json().items() if k != "created"} for reply in replies]


def get(url: str, path: str, method: str = "GET") -> dict:
    reply = httpx.request(method, url + path, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """A simulated engine (capacity 4, 50 ms + 1 ms per token, slowing with the batch) and an
    instant server over the same world."""
    logs = tmp_path_factory.mktemp("world-serve")
    with world_server(logs / "slow.log", *WORLD, *LATENCY) as (slow, _), \
            world_server(logs / "instant.log", *WORLD) as (instant, _):
        yield slow, instant


def test_latency_and_capacity_never_change_what_is_sampled_and_the_meter_holds(servers) -> None:
    slow, instant = servers
    requests = bodies()
    get(slow, "/metrics/reset", "POST")
    started = time.monotonic()
    held = asyncio.run(fire(slow, requests))
    elapsed = time.monotonic() - started
    assert held == asyncio.run(fire(instant, requests)), "latency changed an output"

    m = get(slow, "/metrics")
    n = len(requests)
    tokens = sum(r["usage"]["completion_tokens"] for r in held)
    assert (m["requests"], m["failed"], m["running"], m["queued"]) == (n, 0, 0, 0)
    assert m["completion_tokens"] == tokens
    assert m["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in held)
    assert m["capacity"] == CAPACITY and 1 <= m["max_running"] <= CAPACITY
    # Every request held its slot at least its time to first token, and at least what the model asked.
    ttft = TTFT_MS / 1000
    assert m["slot_seconds"] >= m["hold_seconds"] - EPS
    assert m["hold_seconds"] >= n * ttft - EPS
    # Hold = TTFT + longest choice's tokens * TPOT * (1 + running / S), 1 <= running <= capacity;
    # a request's longest choice has at least its mean and at most its total tokens.
    longest_low = sum(r["usage"]["completion_tokens"] / len(r["choices"]) for r in held)
    low = n * ttft + longest_low * TPOT_MS / 1000 * (1 + 1 / SLOWDOWN)
    high = n * ttft + tokens * TPOT_MS / 1000 * (1 + CAPACITY / SLOWDOWN)
    assert low - EPS <= m["hold_seconds"] <= high + EPS
    # Never more than the capacity running: the occupancy fits under capacity x wall time...
    assert 0 < m["wall_seconds"] <= elapsed + EPS
    assert m["busy_seconds"] <= m["wall_seconds"] + EPS
    assert m["mean_running"] <= m["busy_mean_running"] + EPS <= CAPACITY + 2 * EPS
    assert m["slot_seconds"] <= CAPACITY * m["wall_seconds"] + EPS
    assert m["ideal_seconds"] == pytest.approx(m["slot_seconds"] / CAPACITY)
    assert m["utilization"] == pytest.approx(m["mean_running"] / CAPACITY)
    # ... so the requests cannot all have been answered sooner than their holds allow.
    assert elapsed >= n * ttft / CAPACITY
    assert m["mean_queue_ms"] <= m["max_queue_ms"]

    instant_metrics = get(instant, "/metrics")
    assert instant_metrics["capacity"] is None and instant_metrics["hold_seconds"] == 0.0
    assert instant_metrics["requests"] >= n and instant_metrics["utilization"] is None


def test_reset_starts_a_new_window(servers) -> None:
    slow, _ = servers
    path, body = bodies()[0]
    asyncio.run(fire(slow, [(path, body)] * 3))
    closed = get(slow, "/metrics/reset", "POST")
    assert closed["requests"] >= 3 and closed["slot_seconds"] > 0
    fresh = get(slow, "/metrics")
    assert {k: fresh[k] for k in ("requests", "failed", "completion_tokens", "prompt_tokens", "max_running",
                                  "max_queued", "slot_seconds", "hold_seconds", "wall_seconds", "busy_seconds",
                                  "queue_seconds", "mean_running")} == {
        "requests": 0, "failed": 0, "completion_tokens": 0, "prompt_tokens": 0, "max_running": 0,
        "max_queued": 0, "slot_seconds": 0.0, "hold_seconds": 0.0, "wall_seconds": 0.0, "busy_seconds": 0.0,
        "queue_seconds": 0.0, "mean_running": 0.0}
    assert fresh["first_request_unix"] is None and fresh["last_response_unix"] is None
    asyncio.run(fire(slow, [(path, body)]))
    after = get(slow, "/metrics")
    assert after["requests"] == 1 and after["max_running"] == 1
    assert after["slot_seconds"] >= TTFT_MS / 1000 - EPS


def test_shutdown_prints_a_one_line_summary(tmp_path) -> None:
    log = tmp_path / "serve.log"
    with world_server(log, "--capacity", "2", "--ttft-ms", "5") as (url, proc):
        asyncio.run(fire(url, bodies()[:3]))
    assert proc.returncode is not None
    lines = [line for line in log.read_text().splitlines() if line.startswith("world serve (simulated batching):")]
    assert len(lines) == 1, log.read_text()
    assert " requests=3 " in lines[0] and " capacity=2 " in lines[0]


def test_the_cli_refuses_an_impossible_engine(capsys) -> None:
    for args in (["--capacity", "0"], ["--ttft-ms", "-1"], ["--batch-slowdown", "-2"]):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *args])
        assert exit_.value.code == 2
    assert "capacity" in capsys.readouterr().err


# ------------------------------------------------------------------ the simulator itself, in process


def test_the_queue_is_fifo_and_a_cancelled_waiter_takes_no_slot() -> None:
    async def scenario() -> tuple[list[int], BatchSimulator]:
        sim = BatchSimulator(LatencyModel(), capacity=1)
        gate = asyncio.Event()
        order: list[int] = []

        async def request(i: int, wait: bool) -> None:
            async with sim.slot() as slot:
                order.append(i)
                assert sim.running <= 1 and slot.running == 1
                if wait:
                    await gate.wait()
                await slot.hold(10)

        first = asyncio.create_task(request(0, True))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(request(i, False)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        assert sim.running == 1 and len(sim._waiters) == 3
        waiting[1].cancel()  # request 2 leaves the queue
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(first, waiting[0], waiting[2])
        assert waiting[1].cancelled()
        return order, sim

    order, sim = asyncio.run(scenario())
    assert order == [0, 1, 3]
    m = sim.snapshot()
    assert (m["requests"], m["running"], m["queued"], m["max_running"], m["max_queued"]) == (3, 0, 0, 1, 3)
    assert m["completion_tokens"] == 30 and m["hold_seconds"] == 0.0


def test_the_latency_model() -> None:
    reference = LatencyModel(ttft_ms=30, tpot_ms=15, batch_slowdown=128)
    assert reference.hold_seconds(100, 128) == pytest.approx((30 + 100 * 15 * 2) / 1000)
    assert LatencyModel(ttft_ms=30, tpot_ms=15).hold_seconds(100, 256) == pytest.approx(1.53)
    assert LatencyModel().hold_seconds(10**6, 10**6) == 0.0
    with pytest.raises(ValueError):
        LatencyModel(tpot_ms=-1)
    with pytest.raises(ValueError):
        BatchSimulator(capacity=0)
