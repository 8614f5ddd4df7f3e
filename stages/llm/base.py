"""The generation seam: requests in, generations out, behind one narrow async interface.

Labelling code is written per problem ("complete this prefix K times") and *awaits*
``GenerationClient.generate``. Thousands of such awaits are outstanding at once, so the
backend always has a deep queue to batch from; how it batches is its own business
(llama.cpp: in sequence, ordered so consecutive prompts share a KV-cached prefix; vLLM: one
big batch; HTTP: bounded concurrency).

Every sample is cached by content — model, rendered request, sampling parameters, sample
index and seed — so a crashed or repeated run replays instead of paying for tokens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections import Counter, deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from stepforge.schemas.ids import content_hash


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate. Exactly one of ``messages`` (chat) or ``prompt`` (raw text) is set.

    ``assistant_prefix`` continues a partial assistant turn: the backend renders the chat
    template with the assistant turn opened and appends the prefix verbatim, so the model
    continues the same text rather than answering a new prompt.
    """

    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    assistant_prefix: str = ""
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = False
    # A JSON schema (canonical JSON text) the output must follow. Backends that can constrain
    # decoding (llama.cpp grammars, vLLM guided decoding, OpenAI ``response_format``) do;
    # callers check ``Backend.supports_json_schema`` and otherwise ask in words and parse.
    json_schema: str | None = None
    # A tool-using chat (``stages.llm.tool_chat``): the OpenAI-style messages with ``tool_calls`` and
    # ``tool`` results, and the declared tools, each as canonical JSON. Exclusive with messages/prompt.
    conversation: str | None = None
    tools: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.messages, self.prompt, self.conversation)) != 1:
            raise ValueError("a GenerationRequest needs exactly one of messages, prompt or conversation")
        if self.tools is not None and self.conversation is None:
            raise ValueError("tools are declared with a conversation, not with messages or a prompt")
        if self.prompt is not None and self.assistant_prefix:
            raise ValueError("assistant_prefix continues a chat; with a raw prompt, append it to the prompt")
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError("n and max_tokens must be at least 1")

    def sample_key(self, model_id: str, sample_index: int) -> str:
        """Content address of one sample: independent of ``n``, so n=4 and n=8 share four."""
        constraint = self._extra_key()
        return content_hash(
            "gen/1", model_id, self.messages, self.prompt, self.assistant_prefix, self.temperature,
            self.top_p, self.max_tokens, self.stop, self.seed, self.logprobs, sample_index, *constraint, length=32,
        )

    def _extra_key(self) -> tuple:
        # Fields added later enter a key only when set, so requests without them keep their keys.
        extra: tuple = () if self.json_schema is None else (self.json_schema,)
        if self.conversation is not None:
            extra += ("tools/1", self.conversation, self.tools)
        return extra

    def sample_seed(self, key: str) -> int:
        """Per-sample sampler seed: distinct streams per prompt and index, fixed by the run seed."""
        return int(key[:8], 16) & 0x7FFFFFFF

    def consecutive_seed(self, model_id: str, sample_index: int) -> int:
        """Sample ``i``'s seed as ``base + i``, ``base`` a hash of everything but the index.

        vLLM expands ``SamplingParams(n=m, seed=s)`` into children seeded ``s, s+1, …, s+m-1``,
        so with these seeds a run of consecutive samples of one prompt is one vLLM request
        with ``n`` and still reproduces each sample on its own (a resumed run asks for fewer).
        """
        constraint = self._extra_key()
        base = content_hash(
            "seed/1", model_id, self.messages, self.prompt, self.assistant_prefix, self.temperature,
            self.top_p, self.max_tokens, self.stop, self.seed, self.logprobs, *constraint, length=8,
        )
        # Headroom below 2**31 keeps base + i in range without wrapping (vLLM adds, never wraps).
        return int(base, 16) % (2**31 - 2**20) + sample_index


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" | "length"
    logprobs: tuple[float, ...] | None = None
    # Each generated text token's length in UTF-8 bytes of ``text``, in order (None when the
    # backend does not report tokens): a step's token count without tokenizing it again.
    token_bytes: tuple[int, ...] | None = None
    key: str = ""
    cached: bool = False

    def tokens_in(self, start: int, end: int) -> int | None:
        """Generated tokens that start within the byte span [start, end) of ``text``."""
        if self.token_bytes is None:
            return None
        count, offset = 0, 0
        for length in self.token_bytes:
            if offset >= end:
                break
            if offset >= start:
                count += 1
            offset += length
        return count


class Backend(Protocol):
    """A generation engine. ``model_id`` must change whenever the weights do (it keys the cache)."""

    model_id: str
    max_in_flight: int
    # Whether ``GenerationRequest.json_schema`` constrains decoding (else the request is refused).
    supports_json_schema: bool
    # Optional: when True, sample i of a request is seeded ``request.consecutive_seed(model_id, i)``
    # (vLLM's ``n``); otherwise ``request.sample_seed(key)``. Read with getattr (default False).
    # consecutive_seeds: bool

    async def generate(self, request: GenerationRequest, seed: int) -> Generation:
        """One sample of ``request`` (its ``n`` is ignored) with the given sampler seed."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


class GenerationCacheLike(Protocol):
    def get(self, key: str) -> Generation | None: ...

    def put(self, key: str, generation: Generation) -> None: ...


@dataclass
class ClientStats:
    """A client's (or backend's) traffic in this process. Several shards run at once on threads of
    their own, so changes take a lock; the in-flight integral is exact under any interleaving."""

    requests: int = 0
    samples: int = 0
    cache_hits: int = 0
    generated: int = 0
    generated_tokens: int = 0
    failures: int = 0
    # Time-weighted in-flight count: ∫ in_flight dt over the time anything was in flight.
    in_flight_area: float = 0.0
    busy_seconds: float = 0.0
    max_in_flight_seen: int = 0
    _in_flight: int = field(default=0, repr=False)
    _last_change: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._in_flight:
            dt = now - self._last_change
            self.in_flight_area += self._in_flight * dt
            self.busy_seconds += dt
        self._last_change = now

    def enter(self) -> None:
        with self._lock:
            self._tick()
            self._in_flight += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self._in_flight)

    def leave(self) -> None:
        with self._lock:
            self._tick()
            self._in_flight -= 1

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def area_now(self) -> float:
        """∫ in_flight dt up to this instant (the integral so far plus the open interval)."""
        with self._lock:
            self._tick()
            return self.in_flight_area

    @property
    def mean_in_flight(self) -> float:
        """Mean in flight *while anything was*: hides the idle time between stages and shards; a run's
        truthful figure is over its whole wall time (``RunContext.saturation``)."""
        return self.in_flight_area / self.busy_seconds if self.busy_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "samples": self.samples, "cache_hits": self.cache_hits,
            "generated": self.generated, "generated_tokens": self.generated_tokens,
            "failures": self.failures, "mean_in_flight_while_busy": round(self.mean_in_flight, 3),
            "max_in_flight": self.max_in_flight_seen, "busy_seconds": round(self.busy_seconds, 3),
        }


class Meter:
    """One unit of work's share (one stage over one problem shard) of every client's and backend's
    counts. Shards run concurrently in one process, so a shard's stats cannot be a difference of
    process-wide counters taken before and after: each increment is also charged to the meter of
    the work that caused it (``metered``), found through a context variable that follows the work
    into its event loop's tasks and is handed explicitly to a backend's own thread."""

    def __init__(self) -> None:
        self._counts: dict[int, Counter] = {}
        self._lock = threading.Lock()

    def add(self, owner: object, name: str, amount: float = 1) -> None:
        with self._lock:
            self._counts.setdefault(id(owner), Counter())[name] += amount

    def of(self, owner: object) -> Counter:
        with self._lock:
            return Counter(self._counts.get(id(owner), ()))


_METER: ContextVar[Meter | None] = ContextVar("stepforge_meter", default=None)


def current_meter() -> Meter | None:
    return _METER.get()


@contextlib.contextmanager
def metered() -> Iterator[Meter]:
    """Charge the generation work done in this context (and the tasks it starts) to a new meter."""
    meter = Meter()
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


class SharedBound:
    """At most ``limit`` holders at once across every thread and event loop of the process.

    An ``asyncio.Semaphore`` belongs to one loop, and concurrent shards each run their stage on a
    loop of their own; this bound is the one all of them share, so the engine sees ``limit``
    samples in flight, not ``limit`` per shard. Waiters are served first come, first served.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._free = limit
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._lock = threading.Lock()

    async def __aenter__(self) -> None:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
            loop = asyncio.get_running_loop()
            waiter = (loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            with self._lock:
                queued = waiter in self._waiters
                if queued:
                    self._waiters.remove(waiter)
            if not queued and waiter[1].done() and not waiter[1].cancelled():
                self._release()  # granted, then cancelled before it ran: pass the slot on
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, future = self._waiters.popleft()
                if loop.is_closed():
                    continue
                loop.call_soon_threadsafe(self._grant, future)
                return
            self._free += 1

    def _grant(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._release()  # its task gave up waiting after the slot was handed over
        else:
            future.set_result(None)


class GenerationError(RuntimeError):
    """A backend failed on a sample (the message names the cause); callers turn it into a
    ``generation_failed`` reject row and go on. Backends that can fail transiently retry
    inside ``generate`` before raising; llama.cpp's failures (a prompt that does not fit)
    are deterministic and raised at once."""


class GenerationClient:
    """Cache in front of a backend, with a bound on samples in flight."""

    def __init__(self, backend: Backend, cache: GenerationCacheLike | None = None, max_in_flight: int | None = None):
        self.backend = backend
        self.cache = cache
        self.max_in_flight = max_in_flight or backend.max_in_flight
        self.stats = ClientStats()
        self._bound = SharedBound(self.max_in_flight)

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    COUNTED = ("samples", "cache_hits", "generated", "generated_tokens", "failures")

    def counters(self, meter: Meter | None = None) -> dict[str, float]:
        """Counts of this client's work and, where the backend keeps them, of its traffic (HTTP
        requests, retries and give-ups by reason, tokens, cost): the process's totals, or with a
        ``meter`` the share charged to it (a shard's stats)."""
        if meter is None:
            stats = self.stats.as_dict()
            counts: dict[str, float] = {name: stats[name] for name in self.COUNTED}
            counts["in_flight_seconds"] = round(self.stats.area_now(), 3)
        else:
            mine = meter.of(self)
            counts = {name: mine[name] for name in self.COUNTED}
            counts["in_flight_seconds"] = round(mine["in_flight_seconds"], 3)
        if callable(backend_counters := getattr(self.backend, "counters", None)):
            counts.update(backend_counters() if meter is None else backend_counters(meter))
        return counts

    def _count(self, meter: Meter | None, name: str, amount: int = 1) -> None:
        self.stats.add(name, amount)
        if meter is not None:
            meter.add(self, name, amount)

    async def generate(self, request: GenerationRequest, start: int = 0) -> list[Generation]:
        """``request.n`` independent samples (indices ``start`` … ``start + n - 1``), each replayed
        from the cache when present. Asking for more samples of one prompt later (adaptive
        sampling, repeated simulations) continues the index, so earlier samples are never redrawn."""
        self._count(current_meter(), "requests")
        return list(await asyncio.gather(*(self._sample(request, i) for i in range(start, start + request.n))))

    async def generate_each(self, request: GenerationRequest, start: int = 0) -> list[Generation | GenerationError]:
        """Like ``generate``, but a failed sample is returned as its error instead of failing the rest."""
        self._count(current_meter(), "requests")
        return list(
            await asyncio.gather(
                *(self._sample(request, i) for i in range(start, start + request.n)), return_exceptions=True
            )
        )

    async def _sample(self, request: GenerationRequest, index: int) -> Generation:
        meter = current_meter()
        self._count(meter, "samples")
        key = request.sample_key(self.model_id, index)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count(meter, "cache_hits")
            return hit
        async with self._bound:
            self.stats.enter()
            started = time.perf_counter()
            try:
                seed = (
                    request.consecutive_seed(self.model_id, index)
                    if getattr(self.backend, "consecutive_seeds", False) else request.sample_seed(key)
                )
                generation = await self.backend.generate(request, seed)
            except Exception as exc:
                self._count(meter, "failures")
                raise GenerationError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self.stats.leave()
                if meter is not None:  # this sample's share of the in-flight integral
                    meter.add(self, "in_flight_seconds", time.perf_counter() - started)
        generation = dataclasses.replace(generation, key=key, cached=False)
        self._count(meter, "generated")
        self._count(meter, "generated_tokens", generation.num_tokens)
        if self.cache is not None:
            self.cache.put(key, generation)
        return generation
