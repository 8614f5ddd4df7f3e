"""What the HTTP backend's client costs per request, at a full queue: the old httpx transport and
the aiohttp one, in one run against the same server.

The server is the synthetic world's OpenAI endpoint (``python -m stepforge.stages.instruments.synthetic
serve``) in a subprocess; when it has latency flags (``--ttft-ms``/``--tpot-ms``/``--capacity``) they are
used, so that every request spends real time at the server and ``--concurrency`` requests are really in
flight at once. The requests are Monte Carlo labelling's: the problem as a chat (system + user message)
and a partial solution as ``assistant_prefix``, continued with ``continue_final_message`` (``server:
vllm``), one sample each with its own seed, sent through ``OpenAIBackend.generate`` by ``--concurrency``
workers on the caller's own event loop (the backend's loop runs on its thread, as in a run).

Reported per transport, after a warm-up that opens the connections:

- client CPU ms/request: this process's CPU time (``getrusage(RUSAGE_SELF)`` user + system: the
  caller's loop, the backend's loop, everything but the server) over the requests sent;
- requests/s;
- mean in flight: the backend's time-weighted mean of requests in flight at the server while any
  was (``stats.mean_in_flight``), and the same integral over the whole wall time;
- server CPU ms/request (the subprocess's), for context: on a 2-core machine the server and the
  client share the CPU, so requests/s is bounded by their sum.

The httpx transport is the backend's previous one (``httpx.AsyncClient``, its pool limited to the
bound on requests in flight), kept here as a subclass for comparison only; it sends the same
bytes (the body is encoded once per sample by the backend) and decodes with ``response.json()``.

Usage: python benchmarks/http_client.py [--requests 5000] [--concurrency 256] [--transports httpx,aiohttp]
       [--ttft-ms 20] [--tpot-ms 1] [--capacity 256] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stepforge.stages.instruments.synthetic import make_problems
from stepforge.stages.llm.base import GenerationError, GenerationRequest
from stepforge.stages.llm.openai_http import HttpConfig, OpenAIBackend, _retry_after, _Retry, _text, parse_response

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATE = "{question}\n\nSolve it step by step, one step per line. End with 'The answer is: <number>'."


class HttpxBackend(OpenAIBackend):
    """The previous transport: one ``httpx.AsyncClient`` on the backend's loop (benchmark only)."""

    async def _open_session(self) -> None:
        import httpx

        self._httpx = httpx
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        self._client = httpx.AsyncClient(
            base_url=self.http.base_url.rstrip("/"), headers={"Content-Type": "application/json", **self._auth()},
            limits=limits, timeout=httpx.Timeout(self.http.timeout_seconds),
        )

    def _auth(self) -> dict[str, str]:
        return {k: v for k, v in self._headers.items() if k == "Authorization"}

    async def _close_session(self) -> None:
        await self._client.aclose()

    async def _attempt(self, path: str, payload: bytes, request: GenerationRequest):
        httpx = self._httpx
        self.usage["http_requests"] += 1
        try:
            response = await self._client.post(path, content=payload)
        except httpx.TimeoutException as exc:
            raise _Retry("timeout", type(exc).__name__) from None
        except httpx.TransportError as exc:
            raise _Retry("connection", f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retry(f"http_{status}", _text(response.content, 200), _retry_after(response.headers.get("retry-after")))
        if status != 200:
            raise GenerationError(f"http_{status}: {response.text[:300]}")
        try:
            answer = response.json()
        except ValueError:
            raise _Retry("bad_json", response.text[:80]) from None
        return parse_response(path, answer, request)


TRANSPORTS = {"httpx": HttpxBackend, "aiohttp": OpenAIBackend}


def cpu_seconds() -> tuple[float, float]:
    """This process's user and system CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def latency_flags(args: argparse.Namespace) -> list[str]:
    """The server's latency flags, if this checkout's synthetic server has them."""
    help_text = subprocess.run(
        [sys.executable, "-m", "stepforge.stages.instruments.synthetic", "serve", "--help"],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    flags = []
    for flag, value in (("--capacity", args.capacity), ("--ttft-ms", args.ttft_ms), ("--tpot-ms", args.tpot_ms)):
        if flag in help_text and value is not None:
            flags += [flag, str(value)]
    return flags


def start_server(port: int, flags: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "stepforge.stages.instruments.synthetic", "serve", "--port", str(port), *flags],
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as reply:
                model = json.loads(reply.read())["data"][0]["id"]
            return process, model
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the synthetic server did not start")
            time.sleep(0.2)


def mc_requests(n: int, max_tokens: int) -> list[tuple[GenerationRequest, int]]:
    """``n`` (request, seed) pairs as Monte Carlo labelling sends them: each prefix of each problem's
    reference solution, continued by several seeded samples."""
    pairs: list[tuple[GenerationRequest, int]] = []
    problem = 0
    while len(pairs) < n:
        for row in make_problems(64, (3, 6), seed=problem):
            steps = row["answer"].split("\n")[:-1]
            messages = (("system", SYSTEM), ("user", TEMPLATE.format(question=row["question"])))
            for k in range(1, len(steps)):
                request = GenerationRequest(
                    messages=messages, assistant_prefix="\n".join(steps[:k]) + "\n", n=1,
                    temperature=0.7, max_tokens=max_tokens, seed=1,
                )
                pairs.extend((request, seed) for seed in range(4))
        problem += 1
    return pairs[:n]


async def drive(backend: OpenAIBackend, pairs: list[tuple[GenerationRequest, int]], concurrency: int) -> int:
    """Send every pair through ``backend.generate`` from ``concurrency`` workers; the failures."""
    work = iter(pairs)
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for request, seed in work:
            try:
                await backend.generate(request, seed)
            except GenerationError:
                failures += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def measure(name: str, base_url: str, model: str, server_pid: int, args: argparse.Namespace,
            pairs: list[tuple[GenerationRequest, int]]) -> dict:
    http = HttpConfig(base_url=base_url, server="vllm", timeout_seconds=600, api_key_env="STEPFORGE_BENCH_NO_KEY")
    backend = TRANSPORTS[name](model, http, max_in_flight=args.concurrency)
    try:
        warm = pairs[: args.warmup]
        asyncio.run(drive(backend, warm, args.concurrency))  # opens the connections
        requests_before, area, busy = backend.usage["http_requests"], backend.stats.in_flight_area, backend.stats.busy_seconds
        cpu, server_cpu, wall = cpu_seconds(), process_cpu_seconds(server_pid), time.perf_counter()
        failures = asyncio.run(drive(backend, pairs[args.warmup :], args.concurrency))
        wall = time.perf_counter() - wall
        user, system = (after - before for after, before in zip(cpu_seconds(), cpu))
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
        requests = backend.usage["http_requests"] - requests_before
        area, busy = backend.stats.in_flight_area - area, backend.stats.busy_seconds - busy
        counters = backend.counters()
    finally:
        backend.close()
    return {
        "transport": name, "requests": requests, "failures": failures, "retries": counters["retries"],
        "seconds": round(wall, 2), "requests_per_second": round(requests / wall, 1),
        "client_cpu_ms_per_request": round((user + system) * 1000 / requests, 3),
        "client_system_cpu_ms_per_request": round(system * 1000 / requests, 3),
        "server_cpu_ms_per_request": round(server_cpu * 1000 / requests, 3),
        "mean_in_flight": round(area / busy, 1) if busy else 0.0,
        "mean_in_flight_over_wall": round(area / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="Measured requests per transport.")
    parser.add_argument("--warmup", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--transports", default="httpx,aiohttp")
    parser.add_argument("--repeat", type=int, default=1, help="Measure each transport this many times, alternating.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ttft-ms", type=float, default=20, help="Server latency flag, when the server has it.")
    parser.add_argument("--tpot-ms", type=float, default=1, help="Server latency flag, when the server has it.")
    parser.add_argument("--capacity", type=int, default=None, help="Server flag, when it has it (default: its own).")
    args = parser.parse_args()

    pairs = mc_requests(args.warmup + args.requests, args.max_tokens)
    flags = latency_flags(args)
    port = free_port()
    server, model = start_server(port, flags)
    print(json.dumps({"server_flags": flags, "cores": os.cpu_count()}), flush=True)
    results = []
    try:
        for _ in range(args.repeat):
            for name in args.transports.split(","):
                result = measure(name, f"http://127.0.0.1:{port}/v1", model, server.pid, args, pairs)
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"\n{args.requests} requests, {args.concurrency} in flight, server flags: {' '.join(flags) or 'none'}")
    print("| transport | client CPU ms/request | requests/s | mean in flight (over wall) | server CPU ms/request |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['transport']} | {r['client_cpu_ms_per_request']} | {r['requests_per_second']} "
              f"| {r['mean_in_flight']} ({r['mean_in_flight_over_wall']}) | {r['server_cpu_ms_per_request']} |")


if __name__ == "__main__":
    main()
