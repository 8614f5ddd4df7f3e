"""A simulated continuous-batching engine: the latency, capacity and occupancy meter of ``world serve``.

This is a *measuring instrument* for HTTP clients, not a model of any particular engine. A real
vLLM or SGLang server answers a request only after it has held one of its batch slots for a
while, runs at most so many requests at once and queues the rest; a client benchmarked against
an instant server measures nothing of that. ``BatchSimulator`` gives the synthetic world's server
(``stepforge world serve``) the same shape, with a latency model simple enough to reason about:

- at most ``capacity`` requests are *running* at once; the others wait in a FIFO queue and are
  not counted as running. A slot a request frees goes straight to the head of the queue.
- a running request holds its slot for ``ttft_ms + completion_tokens * tpot_ms * (1 + running /
  batch_slowdown)`` milliseconds (``LatencyModel.hold_seconds``), where ``running`` is the number
  of requests running at its admission, itself included, sampled once then (not re-integrated as
  the batch changes: one timer per request keeps the server cheap). ``batch_slowdown`` 0 (the
  default) means no slowdown. The issue's reference engine is ``capacity=256, ttft_ms=30,
  tpot_ms=15, batch_slowdown=128``.

The meter integrates the running count over time (``slot_seconds``: each request's admission to
release, summed), and keeps the requests served, their tokens, the queue waits and the first
arrival and last response of the current measurement window. ``snapshot()`` is what ``GET
/metrics`` returns; ``reset()`` starts a new window. A request counts in the window it finishes
in; occupancy is integrated from the start of the window, so a request running across a reset
counts only with its time after it.

The latency never changes what is sampled: the server samples exactly as it would without it,
then holds the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """How long a request holds its batch slot; all zero (the default) is an instant server."""

    ttft_ms: float = 0.0  # time to first token: prompt processing and scheduling
    tpot_ms: float = 0.0  # time per output token, for a batch of one
    batch_slowdown: float = 0.0  # S: a token costs tpot * (1 + running / S); 0 = no slowdown

    def __post_init__(self) -> None:
        if min(self.ttft_ms, self.tpot_ms, self.batch_slowdown) < 0:
            raise ValueError("ttft_ms, tpot_ms and batch_slowdown must be >= 0")

    def hold_seconds(self, completion_tokens: int, running: int) -> float:
        per_token = self.tpot_ms
        if self.batch_slowdown > 0:
            per_token *= 1 + running / self.batch_slowdown
        return (self.ttft_ms + completion_tokens * per_token) / 1000.0


class BatchSimulator:
    """Admission (capacity + FIFO queue), hold time and the occupancy meter of one server.

    Single event loop, no locks: every method runs on the server's loop. Use one ``slot()`` per
    generation request::

        async with simulator.slot() as slot:   # waits in the queue, then counts as running
            ... sample ...
            await slot.hold(completion_tokens, prompt_tokens)
    """

    def __init__(self, latency: LatencyModel | None = None, capacity: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1 (or None: unbounded)")
        self.latency = latency or LatencyModel()
        self.capacity = capacity
        self._limit = capacity if capacity is not None else float("inf")
        self._clock = clock
        self.running = 0
        self._waiters: deque[asyncio.Future[float]] = deque()
        self.reset()

    # -- the measurement window

    def reset(self) -> dict[str, Any]:
        """Close the current window (its snapshot is returned) and start a new one now."""
        closed = self.snapshot() if hasattr(self, "_start") else {}
        now = self._clock()
        self._unix_offset = time.time() - now
        self._start = now
        self._changed = now  # last change of the running count: the integral is exact up to here
        self._area = 0.0  # integral of running over time (slot-seconds)
        self._busy = 0.0  # time with at least one request running
        # Requests in flight at the reset belong to the new window from now on.
        self._first: float | None = now if (self.running or self._waiters) else None
        self._last: float | None = None
        self.requests = 0
        self.failed = 0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.hold_seconds = 0.0
        self.admitted = 0
        self.queue_seconds = 0.0
        self.max_queue_seconds = 0.0
        self.max_running = self.running
        self.max_queued = len(self._waiters)
        return closed

    def _integrate(self, now: float) -> None:
        dt = now - self._changed
        if self.running:
            self._area += self.running * dt
            self._busy += dt
        self._changed = now

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        area, busy = self._area, self._busy
        if self.running:  # the open stretch since the last change
            area += self.running * (now - self._changed)
            busy += now - self._changed
        in_flight = self.running or self._waiters
        end = now if in_flight else self._last
        wall = (end - self._first) if (self._first is not None and end is not None) else 0.0
        capacity = self.capacity
        mean_running = area / wall if wall > 0 else 0.0
        latency = self.latency
        return {
            "server": "simulated continuous batching (stepforge world serve)",
            "capacity": capacity,
            "ttft_ms": latency.ttft_ms,
            "tpot_ms": latency.tpot_ms,
            "batch_slowdown": latency.batch_slowdown,
            "requests": self.requests,
            "failed": self.failed,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "running": self.running,
            "queued": len(self._waiters),
            "max_running": self.max_running,
            "max_queued": self.max_queued,
            "first_request_unix": None if self._first is None else self._first + self._unix_offset,
            "last_response_unix": None if self._last is None else self._last + self._unix_offset,
            "wall_seconds": wall,
            "busy_seconds": busy,
            "slot_seconds": area,
            "hold_seconds": self.hold_seconds,
            "mean_running": mean_running,
            "busy_mean_running": area / busy if busy > 0 else 0.0,
            "utilization": mean_running / capacity if capacity else None,
            "ideal_seconds": area / capacity if capacity else None,
            "requests_per_second": self.requests / wall if wall > 0 else 0.0,
            "queue_seconds": self.queue_seconds,
            "mean_queue_ms": 1000 * self.queue_seconds / self.admitted if self.admitted else 0.0,
            "max_queue_ms": 1000 * self.max_queue_seconds,
        }

    def summary(self) -> str:
        """The window in one line (printed when the server shuts down)."""
        s = self.snapshot()
        capacity = s["capacity"] if s["capacity"] is not None else "unbounded"
        utilization = f" utilization={s['utilization']:.3f}" if s["utilization"] is not None else ""
        return (
            f"world serve (simulated batching): requests={s['requests']} failed={s['failed']} "
            f"completion_tokens={s['completion_tokens']} wall={s['wall_seconds']:.3f}s "
            f"rps={s['requests_per_second']:.1f} capacity={capacity} mean_running={s['mean_running']:.2f} "
            f"busy_mean_running={s['busy_mean_running']:.2f} max_running={s['max_running']}{utilization} "
            f"slot_seconds={s['slot_seconds']:.3f} hold_seconds={s['hold_seconds']:.3f} "
            f"mean_queue_ms={s['mean_queue_ms']:.1f} max_queue_ms={s['max_queue_ms']:.1f}"
        )

    # -- admission

    def slot(self) -> Slot:
        return Slot(self)

    async def _admit(self) -> tuple[float, int]:
        """Wait for a slot; (admission time, running count at admission, this request included)."""
        now = self._clock()
        if self._first is None:
            self._first = now
        if self.running < self._limit and not self._waiters:
            self._integrate(now)
            self.running += 1
            if self.running > self.max_running:
                self.max_running = self.running
            self._admitted(0.0)
            return now, self.running
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if len(self._waiters) > self.max_queued:
            self.max_queued = len(self._waiters)
        try:
            admitted = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(self._clock())  # the slot was handed over just before the cancel
            else:
                self._waiters.remove(waiter)
            raise
        self._admitted(admitted - now)
        return admitted, self.running

    def _admitted(self, waited: float) -> None:
        self.admitted += 1
        self.queue_seconds += waited
        if waited > self.max_queue_seconds:
            self.max_queue_seconds = waited

    def _release(self, now: float) -> None:
        self._last = now
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # hand the slot over: the running count stays
                waiter.set_result(now)
                return
        self._integrate(now)
        self.running -= 1


class Slot:
    """One request's stay in the simulated engine (``BatchSimulator.slot()``)."""

    __slots__ = ("_sim", "running", "completion_tokens", "prompt_tokens", "held")

    def __init__(self, sim: BatchSimulator):
        self._sim = sim
        self.running = 0
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.held = 0.0

    async def __aenter__(self) -> Slot:
        _, self.running = await self._sim._admit()
        return self

    async def hold(self, decode_tokens: int, completion_tokens: int | None = None, prompt_tokens: int = 0) -> None:
        """Hold the slot for the latency model's time for ``decode_tokens`` (the longest choice:
        a request's choices decode side by side); ``completion_tokens`` (default: the same) and
        ``prompt_tokens`` are what the meter counts."""
        sim = self._sim
        self.completion_tokens = decode_tokens if completion_tokens is None else completion_tokens
        self.prompt_tokens = prompt_tokens
        self.held = sim.latency.hold_seconds(decode_tokens, self.running)
        if self.held > 0:
            await asyncio.sleep(self.held)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        sim = self._sim
        if exc_type is None:
            sim.requests += 1
            sim.completion_tokens += self.completion_tokens
            sim.prompt_tokens += self.prompt_tokens
            sim.hold_seconds += self.held
        else:
            sim.failed += 1
        sim._release(sim._clock())
