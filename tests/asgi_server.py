"""Serve an ASGI app on a free loopback port in a thread, for tests that need a real HTTP upstream."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """``app`` served by uvicorn until the block ends; yields its base URL (no trailing slash)."""
    import uvicorn

    sock = socket.socket()
    # Accepted sockets inherit this; without it every response waits ~40 ms on delayed ACKs
    # (uvicorn writes headers and body separately, and a socket it is handed keeps Nagle on).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
