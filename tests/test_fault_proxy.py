"""The fault-injection proxy, in front of a small real upstream (FastAPI on uvicorn, not a fault)."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from asgi_server import serving
from stepforge.stages.instruments.fault_proxy import ALL_KINDS, FaultConfig, choose_fault, running_proxy

FAST_KINDS = ("http_500", "http_503", "http_429", "truncated_json", "garbage_json")


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, collections.Counter]]:
    """A stand-in for an OpenAI-compatible server: echoes the prompt; counts the calls it serves."""
    app = FastAPI()
    hits: collections.Counter = collections.Counter()

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        hits["completions"] += 1
        content = {
            "object": "text_completion",
            "choices": [{"index": 0, "text": body.get("prompt", "")}],
            "query": dict(request.query_params),
            "x_test": request.headers.get("x-test"),
            "padding": "x" * 200,  # so half a body is clearly not the whole of it
        }
        return JSONResponse(content, headers={"x-upstream": "yes"})

    @app.get("/v1/models")
    async def models() -> dict:
        hits["models"] += 1
        return {"object": "list", "data": [{"id": "echo", "object": "model"}]}

    with serving(app) as url:
        yield url, hits


def client(base_url: str, timeout: float = 5.0) -> httpx.Client:
    # trust_env off: an HTTP_PROXY in the environment must not sit between test and proxy.
    return httpx.Client(base_url=base_url, timeout=timeout, trust_env=False)


def completion_body(prompt: str) -> bytes:
    return json.dumps({"model": "echo", "prompt": prompt, "max_tokens": 8}).encode()


def complete(http: httpx.Client, prompt: str) -> httpx.Response:
    return http.post("/v1/completions", content=completion_body(prompt), headers={"content-type": "application/json"})


def outcome(response: httpx.Response) -> str:
    """Which fault (or none) a response shows, for the fast kinds."""
    if response.status_code != 200:
        return {500: "http_500", 503: "http_503", 429: "http_429"}[response.status_code]
    try:
        json.loads(response.content)
    except ValueError:
        return "truncated_json" if response.content.startswith(b"{") else "garbage_json"
    return "forwarded"


def test_rate_zero_forwards_everything_verbatim(upstream):
    url, _ = upstream
    params = {"x": "1", "path": "/a b"}
    body = {"model": "echo", "prompt": "hello ünïcode", "max_tokens": 8}
    with running_proxy(url, FaultConfig(rate=0.0)) as proxy, client(url) as direct, client(proxy.base_url) as http:
        for target in (direct, http):
            target.headers["x-test"] = "kept"
        want = direct.post("/v1/completions", params=params, json=body)
        got = http.post("/v1/completions", params=params, json=body)
        assert (got.status_code, got.content) == (want.status_code, want.content)
        assert got.json()["query"] == params and got.json()["x_test"] == "kept"
        assert got.headers["content-type"] == want.headers["content-type"]
        assert got.headers["x-upstream"] == "yes"
        assert int(got.headers["content-length"]) == len(want.content)
        models = http.get("/v1/models")
        assert models.content == direct.get("/v1/models").content
        assert proxy.counts == {"forwarded": 2}


def test_chunked_request_bodies_are_forwarded(upstream):
    url, _ = upstream
    payload = json.dumps({"prompt": "in chunks"}).encode()
    with running_proxy(url, FaultConfig(rate=0.0)) as proxy, client(proxy.base_url) as http:
        reply = http.post("/v1/completions", content=iter([payload[:5], payload[5:]]))
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "in chunks"


@pytest.mark.parametrize("kind,status", [("http_500", 500), ("http_503", 503)])
def test_server_errors(upstream, kind, status):
    url, hits = upstream
    before = hits["completions"]
    with running_proxy(url, FaultConfig(rate=1.0, kinds=(kind,))) as proxy, client(proxy.base_url) as http:
        reply = complete(http, "x")
        assert reply.status_code == status
        assert reply.json()["error"]["type"] == "fault_injection"
        assert proxy.counts == {kind: 1}
    assert hits["completions"] == before  # never reached the upstream


@pytest.mark.parametrize("seconds,header,ms", [(1.0, "1", "1000"), (2.5, "3", "2500")])
def test_rate_limit_carries_retry_after(upstream, seconds, header, ms):
    url, _ = upstream
    config = FaultConfig(rate=1.0, kinds=("http_429",), retry_after_seconds=seconds)
    with running_proxy(url, config) as proxy, client(proxy.base_url) as http:
        reply = complete(http, "x")
        assert reply.status_code == 429
        assert (reply.headers["retry-after"], reply.headers["retry-after-ms"]) == (header, ms)
        assert proxy.counts == {"http_429": 1}


def test_hang_times_the_client_out(upstream):
    url, hits = upstream
    before = hits["completions"]
    config = FaultConfig(rate=1.0, kinds=("hang",), hang_seconds=2.0)
    with running_proxy(url, config) as proxy, client(proxy.base_url, timeout=0.3) as http:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            complete(http, "x")
        assert time.monotonic() - start < 1.5
        assert proxy.counts == {"hang": 1}
    assert hits["completions"] == before


def test_hang_closes_after_hang_seconds(upstream):
    url, _ = upstream
    config = FaultConfig(rate=1.0, kinds=("hang",), hang_seconds=0.3)
    with (
        running_proxy(url, config) as proxy,
        client(proxy.base_url, timeout=3) as http,
        pytest.raises(httpx.RemoteProtocolError),  # closed without a response
    ):
        complete(http, "x")


def test_stop_does_not_wait_out_a_hang(upstream):
    url, _ = upstream
    config = FaultConfig(rate=1.0, kinds=("hang",), hang_seconds=60.0)
    errors: list[Exception] = []
    with running_proxy(url, config) as proxy:

        def hung() -> None:
            try:
                with client(proxy.base_url, timeout=30) as http:
                    complete(http, "x")
            except httpx.HTTPError as exc:
                errors.append(exc)

        thread = threading.Thread(target=hung)
        thread.start()
        deadline = time.monotonic() + 5
        while not proxy.counts["hang"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.monotonic()
    assert time.monotonic() - start < 2
    thread.join(timeout=5)
    assert isinstance(errors[0], httpx.RemoteProtocolError)


def test_drop_cuts_the_connection_mid_body(upstream):
    url, hits = upstream
    before = hits["completions"]
    with running_proxy(url, FaultConfig(rate=1.0, kinds=("drop",))) as proxy, client(proxy.base_url) as http:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            complete(http, "x")
        assert proxy.counts == {"drop": 1}
    assert hits["completions"] == before + 1  # the real answer was fetched, then cut


def test_drop_sends_headers_and_half_the_body(upstream):
    url, _ = upstream
    with running_proxy(url, FaultConfig(rate=1.0, kinds=("drop",))) as proxy:
        body = json.dumps({"prompt": "raw"}).encode()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
    head, _, partial = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])
    assert len(partial) == length // 2


def test_truncated_json_is_a_complete_response_with_half_a_body(upstream):
    url, hits = upstream
    with client(url) as direct:
        full = complete(direct, "cut me").content
    before = hits["completions"]
    with running_proxy(url, FaultConfig(rate=1.0, kinds=("truncated_json",))) as proxy, client(proxy.base_url) as http:
        reply = complete(http, "cut me")
        assert reply.status_code == 200
        assert reply.content == full[: len(full) // 2]
        assert int(reply.headers["content-length"]) == len(reply.content)
        with pytest.raises(ValueError):
            json.loads(reply.content)
        assert proxy.counts == {"truncated_json": 1}
    assert hits["completions"] == before + 1


def test_garbage_json(upstream):
    url, hits = upstream
    before = hits["completions"]
    with running_proxy(url, FaultConfig(rate=1.0, kinds=("garbage_json",))) as proxy, client(proxy.base_url) as http:
        bodies = set()
        for i in range(8):
            reply = complete(http, f"garbage {i}")
            assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
            with pytest.raises(ValueError):
                json.loads(reply.content)
            bodies.add(reply.content.startswith(b"<html>"))
        assert bodies == {True, False}  # both variants: an HTML page and bytes
        assert proxy.counts == {"garbage_json": 8}
    assert hits["completions"] == before


def test_get_and_exempt_paths_are_never_faulted(upstream):
    url, _ = upstream
    config = FaultConfig(rate=1.0, kinds=("http_500",), exempt_paths=("/v1/completions",))
    with running_proxy(url, config) as proxy, client(proxy.base_url) as http:
        for _ in range(5):
            assert http.get("/v1/models").status_code == 200
            assert complete(http, "exempt").status_code == 200
        assert http.post("/v1/chat/completions", json={}).status_code == 500  # not exempt
        assert proxy.counts == {"forwarded": 10, "http_500": 1}


def test_max_faults_per_request_then_forwarded(upstream):
    url, _ = upstream
    config = FaultConfig(rate=1.0, kinds=("http_500",), max_faults_per_request=2)
    with running_proxy(url, config) as proxy, client(proxy.base_url) as http:
        assert [complete(http, "retry me").status_code for _ in range(4)] == [500, 500, 200, 200]
        assert complete(http, "another").status_code == 500  # the cap is per body
        assert proxy.counts == {"http_500": 3, "forwarded": 2}
    with running_proxy(url, FaultConfig(rate=1.0, max_faults_per_request=0)) as proxy, client(proxy.base_url) as http:
        assert complete(http, "never").status_code == 200


def run_sequence(url: str, config: FaultConfig, prompts: list[str], workers: int = 1) -> dict[tuple[str, int], str]:
    """Outcome of each (prompt, attempt); with workers > 1 the distinct prompts go concurrently."""
    results: dict[tuple[str, int], str] = {}
    with running_proxy(url, config) as proxy, client(proxy.base_url) as http:

        def attempts(prompt: str) -> None:
            for attempt in range(3):  # a retrying client: the same body again
                results[(prompt, attempt)] = outcome(complete(http, prompt))

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(attempts, prompts))
    return results


def test_fault_decisions_are_reproducible(upstream):
    url, _ = upstream
    prompts = [f"problem {i}" for i in range(12)]
    config = FaultConfig(rate=0.5, kinds=FAST_KINDS, seed=7, max_faults_per_request=10)
    first = run_sequence(url, config, prompts)
    assert run_sequence(url, config, prompts) == first
    # Arrival order does not matter: reversed and concurrent gives the same faults per body.
    assert run_sequence(url, config, prompts[::-1], workers=4) == first
    other_seed = FaultConfig(rate=0.5, kinds=FAST_KINDS, seed=8, max_faults_per_request=10)
    assert run_sequence(url, other_seed, prompts) != first
    # And they are exactly what the pure function predicts.
    for (prompt, attempt), seen in first.items():
        assert seen == (choose_fault(config, completion_body(prompt), attempt) or "forwarded")
    assert len(set(first.values())) > 2


def test_counts_match_what_clients_saw(upstream):
    url, _ = upstream
    config = FaultConfig(rate=0.5, kinds=FAST_KINDS, seed=3)
    with running_proxy(url, config) as proxy, client(proxy.base_url) as http:
        seen = collections.Counter(outcome(complete(http, f"count {i}")) for i in range(40))
        http.get("/v1/models")
        seen["forwarded"] += 1
        assert proxy.counts == seen
    assert 10 < sum(v for k, v in seen.items() if k != "forwarded") < 30


def test_keep_alive_serves_several_requests_on_one_connection(upstream):
    url, _ = upstream
    with running_proxy(url, FaultConfig(rate=0.0)) as proxy, client(proxy.base_url) as http:
        assert complete(http, "one").json()["choices"][0]["text"] == "one"
        assert complete(http, "two").json()["choices"][0]["text"] == "two"
        assert proxy.connections_accepted == 1
    # An error status is a complete response: the connection stays open for the retry.
    config = FaultConfig(rate=1.0, kinds=("http_503",), max_faults_per_request=1)
    with running_proxy(url, config) as proxy, client(proxy.base_url) as http:
        assert [complete(http, "again").status_code for _ in range(2)] == [503, 200]
        assert proxy.connections_accepted == 1


def test_unreachable_upstream_is_a_502_not_a_fault():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
        with running_proxy(dead, FaultConfig(rate=0.0)) as proxy, client(proxy.base_url) as http:
            assert complete(http, "x").status_code == 502
            assert proxy.counts == {"upstream_error": 1}


def test_choose_fault_rate_and_kinds():
    config = FaultConfig(rate=0.2, seed=1)
    drawn = [choose_fault(config, f"body {i}".encode(), 0) for i in range(3000)]
    faults = [k for k in drawn if k is not None]
    assert 0.17 < len(faults) / len(drawn) < 0.23
    assert set(faults) == set(ALL_KINDS)
    assert choose_fault(FaultConfig(rate=0.0), b"x", 0) is None
    assert choose_fault(FaultConfig(rate=1.0, kinds=("drop",)), b"x", 5) == "drop"


@pytest.mark.parametrize(
    "kwargs", [{"rate": 1.5}, {"rate": -0.1}, {"kinds": ("http_418",)}, {"kinds": ()}, {"max_faults_per_request": -1}]
)
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        FaultConfig(**kwargs)


def test_cli_prints_counts_on_sigterm(upstream):
    url, _ = upstream
    process = subprocess.Popen(
        [sys.executable, "-m", "stepforge.stages.instruments.fault_proxy", "--upstream", url, "--port", "0",
         "--rate", "1", "--kinds", "http_500,http_503", "--max-faults-per-request", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        banner = process.stderr.readline()
        base_url = banner.split()[2]
        assert base_url.startswith("http://127.0.0.1:"), banner
        with client(base_url) as http:
            assert complete(http, "cli").status_code in (500, 503)
            assert complete(http, "cli").status_code == 200
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["forwarded"] == 1 and sum(counts.values()) == 2
