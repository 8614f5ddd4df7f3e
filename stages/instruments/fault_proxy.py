"""A fault-injection HTTP proxy: a measuring instrument for tests and benchmarks, not a server.

It sits in front of an OpenAI-compatible server (``python -m llama_cpp.server``, ``stepforge
world serve``, vLLM, ...) and, on a set fraction of requests, answers with a deliberate fault
instead of (or in the middle of) the real answer, so a client's retry and timeout handling
can be tested and its cost measured against a known fault rate:

- ``http_500`` / ``http_503``: a 5xx with a small JSON error body;
- ``http_429``: 429 with ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms``;
- ``hang``: read the request, send nothing for ``hang_seconds``, then close;
- ``drop``: forward, send the real status line and headers (real Content-Length) and half
  the body, then close the connection mid-body;
- ``truncated_json``: forward, answer 200 with the first half of the body and a
  Content-Length that matches it (a well-formed HTTP response carrying broken JSON);
- ``garbage_json``: 200, ``content-type: application/json``, a body that is not JSON.

Everything else is forwarded verbatim (method, path, query, headers minus hop-by-hop ones,
body) and the upstream's answer relayed (status, headers minus hop-by-hop ones, raw body,
Content-Length recomputed). Non-streaming only: an SSE answer is relayed, but only once the
upstream has finished it.

Why raw asyncio and not a web framework: ``drop`` must close a connection after half a body
whose Content-Length promised all of it, and ``hang`` must hold a connection silent. An ASGI
server frames responses itself and will not let an application send a short body, so this
speaks the small subset of HTTP/1.1 it needs (request line, headers, Content-Length or
chunked request bodies, keep-alive) on ``asyncio.start_server``.

Reproducibility. Drawing from one ``random.Random(seed)`` in arrival order would give a
different fault pattern whenever concurrent requests arrive in a different order. Instead
each request's fate is a hash of (seed, sha256 of its body, how many times this proxy has
seen that body before): the same seed and the same bodies give the same faults however the
requests interleave, and a retry of a faulted request (same body, next attempt) draws
afresh. (Identical bodies in flight at the same time still race for attempt numbers; for
LLM requests those are retries of one another, whose order is the client's.)

Guaranteed progress. After ``max_faults_per_request`` faults on one body the proxy forwards
that body from then on, so a client that retries a failed request at least that many times
always finishes: the fault rate measures the cost of retries, never a lost request. Note
that ``hang`` costs the client a full timeout per attempt.

GET and HEAD requests (``/v1/models``, health checks) and paths in ``exempt_paths`` are
never faulted and do not touch the attempt counts.

Use it from sync code (tests, benchmarks) with ``running_proxy``, from async code with
``FaultProxy.start``/``stop``, or from a shell::

    python -m stepforge.stages.instruments.fault_proxy --upstream http://127.0.0.1:8000 --port 8001 --rate 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import urlsplit

import httpx

ALL_KINDS: tuple[str, ...] = ("http_500", "http_503", "http_429", "hang", "drop", "truncated_json", "garbage_json")

# The kinds that need the real upstream answer to deform; the others never reach the upstream.
_FORWARDING_KINDS = frozenset({"drop", "truncated_json"})

# Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the message; host and
# content-length are recomputed for the next hop.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length"}

_MAX_HEAD_BYTES = 64 * 1024


@dataclass
class FaultConfig:
    """Which faults, how often, and how they behave."""

    rate: float = 0.2  # fraction of faultable requests (per attempt) answered with a fault
    kinds: tuple[str, ...] = ALL_KINDS
    seed: int = 0
    retry_after_seconds: float = 1.0
    hang_seconds: float = 30.0  # longer than a client's timeout, so a hang is seen as a timeout
    max_faults_per_request: int = 3
    exempt_paths: tuple[str, ...] = ()  # exact paths (no query) never faulted

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.exempt_paths = tuple(self.exempt_paths)
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        unknown = set(self.kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
        if self.rate > 0 and not self.kinds:
            raise ValueError("a positive fault rate needs at least one fault kind")
        if self.max_faults_per_request < 0:
            raise ValueError("max_faults_per_request must be >= 0")
        if self.retry_after_seconds < 0 or self.hang_seconds < 0:
            raise ValueError("retry_after_seconds and hang_seconds must be >= 0")


def choose_fault(config: FaultConfig, body: bytes, attempt: int) -> str | None:
    """The fault for the ``attempt``-th (0-based) sighting of ``body``, or None to forward.

    Pure: the proxy adds the attempt bookkeeping and the ``max_faults_per_request`` cap.
    """
    return _choose(config, hashlib.sha256(body).digest(), attempt)


def _choose(config: FaultConfig, body_digest: bytes, attempt: int) -> str | None:
    digest = hashlib.sha256(f"{config.seed}\0{body_digest.hex()}\0{attempt}".encode()).digest()
    if not config.kinds or int.from_bytes(digest[:8], "big") / 2**64 >= config.rate:
        return None
    # Independent bytes of the same hash, so the kind does not correlate with the coin.
    return config.kinds[int.from_bytes(digest[8:16], "big") % len(config.kinds)]


class _BadRequest(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str  # origin-form path and query, as the next hop needs it
    path: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


class FaultProxy:
    """The proxy on one event loop. ``counts`` has "forwarded" and one entry per fault kind injected.

    Also counted, apart from faults: "upstream_error" (the upstream could not be reached; the
    client gets a 502) and "bad_request" (unparseable HTTP; 400 and close).
    """

    def __init__(self, upstream: str, config: FaultConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.upstream = upstream.rstrip("/")
        self.config = config or FaultConfig()
        self.host = host
        self.port = port
        self.counts: collections.Counter[str] = collections.Counter()
        self.connections_accepted = 0  # lets a benchmark see whether its client reuses connections
        # sha256 of a body -> (times seen, faults injected); one small entry per distinct body.
        self._history: dict[bytes, tuple[int, int]] = {}
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._handlers: set[asyncio.Task] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        # Made here, not in __init__, so its pool belongs to the loop that serves.
        # No timeout: the client's own timeout is the one under test. Cookies refused, so
        # one client's Set-Cookie never rides on another's request. trust_env off: the
        # upstream is normally on loopback and must not be routed through an HTTP_PROXY.
        self._client = httpx.AsyncClient(
            timeout=None,
            trust_env=False,
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        # httpx adds its own Accept-Encoding, User-Agent, ... unless told otherwise; forwarding
        # is verbatim, so the client's headers are the only ones sent.
        for name in list(self._client.headers):
            del self._client.headers[name]
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port, limit=_MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Hung connections would otherwise hold wait_closed for hang_seconds.
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ connection loop

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections_accepted += 1
        try:
            while True:
                try:
                    request = await self._read_request(reader, writer)
                except _BadRequest as exc:
                    self.counts["bad_request"] += 1
                    await self._respond(writer, 400, _error_body(str(exc), "bad_request", 400), close=True)
                    return
                if request is None or not await self._handle(request, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away (or sent an absurd chunk header); nothing to answer
        except asyncio.CancelledError:
            pass  # stop(): a handler mid-hang or mid-forward ends here
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _BadRequest("connection closed inside the request head") from None
            return None  # a clean close between requests
        except asyncio.LimitOverrunError:
            raise _BadRequest("request head too large") from None
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(f"malformed request line {lines[0]!r}") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(f"unsupported version {version!r}")
        if target.startswith(("http://", "https://")):
            # Absolute form, as sent to a forward proxy: only the path and query go on.
            parts = urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(f"malformed header line {line!r}")
            headers.append((name, value.strip()))
        request = _Request(method, target, target.split("?", 1)[0], version, headers, b"")

        if (request.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in (request.header("transfer-encoding") or "").lower():
            request.body = await _read_chunked(reader)
        elif (length := request.header("content-length")) is not None:
            if not length.isdigit():
                raise _BadRequest(f"bad content-length {length!r}")
            request.body = await reader.readexactly(int(length))
        return request

    # ------------------------------------------------------------------ one request

    def _decide(self, request: _Request) -> str | None:
        if request.method in ("GET", "HEAD") or request.path in self.config.exempt_paths:
            return None
        # Synchronous between awaits, so concurrent requests cannot interleave here.
        key = hashlib.sha256(request.body).digest()
        attempt, faults = self._history.get(key, (0, 0))
        kind = None if faults >= self.config.max_faults_per_request else _choose(self.config, key, attempt)
        self._history[key] = (attempt + 1, faults + (kind is not None))
        return kind

    async def _handle(self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        kind = self._decide(request)
        keep_alive = request.keep_alive
        if kind in ("http_500", "http_503"):
            status = 500 if kind == "http_500" else 503
            self.counts[kind] += 1
            body = _error_body(f"injected fault: {kind}", "fault_injection", status)
            await self._respond(writer, status, body, not keep_alive)
            return keep_alive
        if kind == "http_429":
            self.counts[kind] += 1
            seconds = self.config.retry_after_seconds
            # Retry-After only takes whole seconds; retry-after-ms (read by the OpenAI clients)
            # carries the exact value.
            headers = [
                ("Content-Type", "application/json"),
                ("Retry-After", str(math.ceil(seconds))),
                ("retry-after-ms", str(round(seconds * 1000))),
            ]
            body = _error_body("injected fault: http_429 (rate limited)", "fault_injection", 429)
            await self._respond(writer, 429, body, not keep_alive, headers)
            return keep_alive
        if kind == "hang":
            self.counts[kind] += 1
            await self._hang(reader)
            return False
        if kind == "garbage_json":
            self.counts[kind] += 1
            await self._respond(writer, 200, _garbage(self.config.seed, request.body), not keep_alive)
            return keep_alive

        try:
            upstream = await self._forward(request, identity=kind == "truncated_json")
        except httpx.HTTPError as exc:
            self.counts["upstream_error"] += 1
            body = _error_body(f"fault proxy could not reach the upstream: {exc!r}", "upstream_error", 502)
            await self._respond(writer, 502, body, close=True)
            return False
        status, reason, headers, body = upstream

        if kind == "drop":
            self.counts[kind] += 1
            writer.write(_head(status, reason, headers, len(body), close=False) + body[: len(body) // 2])
            # With a zero high-water mark, drain returns only once the half body has reached
            # the kernel, so closing does not lose it: the client sees a short body, then EOF.
            writer.transport.set_write_buffer_limits(high=0)
            await writer.drain()
            return False
        if kind == "truncated_json":
            self.counts[kind] += 1
            await self._respond(writer, 200, body[: len(body) // 2], not keep_alive, headers, reason="OK")
            return keep_alive

        self.counts["forwarded"] += 1
        if request.method == "HEAD":
            # A HEAD answer announces the GET body's length without carrying it.
            writer.write(_head(status, reason, headers, None, not keep_alive))
            await writer.drain()
        else:
            await self._respond(writer, status, body, not keep_alive, headers, reason=reason)
        return keep_alive

    async def _forward(self, request: _Request, identity: bool) -> tuple[int, str, list[tuple[str, str]], bytes]:
        assert self._client is not None, "FaultProxy.start() was not awaited"
        connection_tokens = {t.strip().lower() for t in (request.header("connection") or "").split(",")}
        headers = [
            (k, v) for k, v in request.headers if k.lower() not in _NOT_FORWARDED and k.lower() not in connection_tokens
        ]
        if identity:
            # A truncated compressed body would fail to decompress before it failed to parse;
            # the fault under test is broken JSON, so ask for the body uncompressed.
            headers = [(k, v) for k, v in headers if k.lower() != "accept-encoding"] + [("Accept-Encoding", "identity")]
        upstream_request = self._client.build_request(
            request.method, self.upstream + request.target, headers=headers, content=request.body
        )
        response = await self._client.send(upstream_request, stream=True)
        try:
            # Raw, still content-encoded bytes: relayed with the upstream's Content-Encoding.
            body = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        # Content-Length stays for a HEAD answer; everywhere else _head replaces it with the
        # length actually sent.
        relayed = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.headers.raw
            if k.decode("latin-1").lower() not in _HOP_BY_HOP
        ]
        return response.status_code, response.reason_phrase, relayed, body

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        # Silent until hang_seconds pass or the client gives up and closes, whichever is
        # first, so a timed-out client does not leave a task behind for the full hang.
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(self.config.hang_seconds):
                while await reader.read(65536):
                    pass

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        close: bool,
        headers: list[tuple[str, str]] | None = None,
        reason: str | None = None,
    ) -> None:
        if headers is None:
            headers = [("Content-Type", "application/json")]
        no_body = status < 200 or status in (204, 304)
        head = _head(status, reason, headers, None if no_body else len(body), close)
        writer.write(head if no_body else head + body)
        await writer.drain()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = (await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise _BadRequest(f"bad chunk size {size_line!r}") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers: hop-by-hop, dropped
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise _BadRequest("chunk not followed by CRLF")


def _head(status: int, reason: str | None, headers: list[tuple[str, str]], length: int | None, close: bool) -> bytes:
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers if not (length is not None and k.lower() == "content-length")]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_body(message: str, kind: str, status: int) -> bytes:
    # The shape OpenAI-compatible servers use, so clients parse it as they would a real error.
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def _garbage(seed: int, body: bytes) -> bytes:
    digest = hashlib.sha256(b"garbage\0%d\0" % seed + body).digest()
    if digest[0] % 2:
        return b"<html>upstream error</html>"
    # 0xff never occurs in UTF-8, so neither the bytes nor their text can be JSON.
    return b"\xff" + digest


@contextlib.contextmanager
def running_proxy(
    upstream: str, config: FaultConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[FaultProxy]:
    """A started ``FaultProxy`` on its own event loop in a daemon thread, for sync callers.

    Read ``proxy.counts`` freely; the proxy's loop is the only writer.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
    thread.start()
    proxy = FaultProxy(upstream, config, host, port)
    try:
        asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(timeout=30)
        yield proxy
    finally:
        try:
            asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()


def _parse_kinds(text: str) -> tuple[str, ...]:
    return tuple(k for k in text.replace(",", " ").split() if k)


def main(argv: list[str] | None = None) -> None:
    defaults = FaultConfig()
    parser = argparse.ArgumentParser(
        prog="python -m stepforge.stages.instruments.fault_proxy",
        description="A fault-injection proxy in front of an OpenAI-compatible server: a test and benchmark "
        "instrument. Prints the counts of forwarded requests and injected faults on exit (SIGINT/SIGTERM).",
    )
    parser.add_argument("--upstream", required=True, help="base URL of the real server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 = any free port (printed on stderr)")
    parser.add_argument("--rate", type=float, default=defaults.rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--kinds", nargs="+", default=list(ALL_KINDS), help=f"any of: {' '.join(ALL_KINDS)} (space or comma separated)"
    )
    parser.add_argument("--retry-after", type=float, default=defaults.retry_after_seconds, help="seconds (http_429)")
    parser.add_argument("--hang-seconds", type=float, default=defaults.hang_seconds)
    parser.add_argument("--max-faults-per-request", type=int, default=defaults.max_faults_per_request)
    parser.add_argument("--exempt-path", action="append", default=[], help="a path never faulted (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = FaultConfig(
            rate=args.rate,
            kinds=tuple(k for arg in args.kinds for k in _parse_kinds(arg)),
            seed=args.seed,
            retry_after_seconds=args.retry_after,
            hang_seconds=args.hang_seconds,
            max_faults_per_request=args.max_faults_per_request,
            exempt_paths=tuple(args.exempt_path),
        )
    except ValueError as exc:
        parser.error(str(exc))

    async def serve() -> collections.Counter[str]:
        proxy = FaultProxy(args.upstream, config, args.host, args.port)
        await proxy.start()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        print(
            f"fault proxy {proxy.base_url} -> {proxy.upstream} (rate {config.rate}, seed {config.seed}, "
            f"kinds {','.join(config.kinds)})",
            file=sys.stderr,
            flush=True,
        )
        try:
            await done.wait()
        finally:
            await proxy.stop()
        return proxy.counts

    counts = asyncio.run(serve())
    print(json.dumps(dict(sorted(counts.items()))), flush=True)


if __name__ == "__main__":
    main()
