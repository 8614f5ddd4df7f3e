"""Label Studio's webhooks as a trigger for pulls: a receiver that runs a pull after annotation events.

The payload is only a signal, never data: the pull reads annotations back through the API, so an
event can start a pull but never inject a label. ``stepforge review webhook`` serves :func:`webhook_app`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class PullOnEvent:
    """Runs ``pull_once`` after annotation events, one at a time; events during a pull coalesce into
    one more pull, so a burst of clicks costs at most two pulls."""

    def __init__(self, pull_once: Callable[[], dict]):
        self.pull_once = pull_once
        self.results: list[dict] = []
        self.errors: list[str] = []
        self._pending = threading.Event()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def notify(self) -> None:
        self._pending.set()
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._drain, daemon=True, name="review-pull")
                self._worker.start()

    def _drain(self) -> None:
        while self._pending.is_set():
            self._pending.clear()
            try:
                self.results.append(self.pull_once())
            except Exception as exc:  # kept for /status; the next event retries
                self.errors.append(str(exc))


def webhook_app(pull_once: Callable[[], dict], secret: str | None = None):
    """A Starlette app: Label Studio POSTs annotation events to /webhook, which trigger a pull (the
    payload is not trusted as data: the pull reads annotations back through the API)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    puller = PullOnEvent(pull_once)
    events = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}

    async def hook(request):
        if secret is not None and request.headers.get("x-stepforge-secret") != secret:
            return JSONResponse({"error": "bad secret"}, status_code=403)
        try:
            payload = await request.json()
        except ValueError:
            return JSONResponse({"error": "not JSON"}, status_code=400)
        if payload.get("action") in events:
            puller.notify()
        return JSONResponse({"ok": True})

    async def state(_request):
        return JSONResponse({"pulls": len(puller.results), "errors": puller.errors[-5:],
                             "last": puller.results[-1] if puller.results else None})

    app = Starlette(routes=[Route("/webhook", hook, methods=["POST"]), Route("/status", state)])
    app.state.puller = puller
    return app
