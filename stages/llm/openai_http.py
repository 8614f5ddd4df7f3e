"""OpenAI-compatible HTTP backend: vLLM (`vllm serve`), SGLang, llama.cpp's server, TGI, hosted APIs.

One backend object owns one event loop on its own thread, one connection pool and one
bound on requests in flight. Stages call ``generate`` from whatever loop or thread they run
on; the call is handed to the backend's loop, so every shard and stage of a process shares
the same bound, the same rate limits and the same accounting, and the server sees a steady
queue of ``max_in_flight`` requests. Calls and their answers cross between the loops in
batches (one wake-up of a loop per batch, not per call).

The transport is aiohttp: one session with a keep-alive pool of at most ``max_in_flight``
connections, URLs and headers fixed once, no cookie jar or proxy lookups, bodies encoded and
answers decoded with orjson. At 256 requests in flight the client process spends about 0.2 ms of
CPU per request (``benchmarks/http_client.py``; httpx spent 9 or more).

Each sample is one request with ``n = 1`` and its own seed: a retried request asks for the
same sample again, so a run through a flaky server produces what a clean run produces.
Faults are retried with full-jitter exponential backoff (``Retry-After`` wins when it is
longer): 429, 5xx, timeouts, broken connections, and 200s whose body is not the JSON the
protocol promises. Other 4xx are the caller's fault and fail at once. A sample given up
becomes a ``GenerationError`` naming the last reason; the counts of retries and give-ups by
reason are in ``counters()`` and so in every shard's stats.

**Continuing a partial solution** (``GenerationRequest.assistant_prefix``) is what Monte
Carlo labelling does for every step. Servers differ:

============  =====================================================================
server        how a prefix is continued
============  =====================================================================
vllm, sglang  chat endpoint, final assistant message continued
              (``continue_final_message: true, add_generation_prompt: false``)
llamacpp      completions endpoint, prompt rendered here with the model's chat
tgi           template (``tokenizer``): llama.cpp's and TGI's chat endpoints cannot
              continue an assistant turn
openai        not possible (a trailing assistant message is read as a finished
              turn): such requests are refused; use it for judging
generic       as ``continuation`` says
============  =====================================================================

API keys are read from the environment variable ``api_key_env`` or the file
``api_key_file`` when the backend starts. Only their names are configuration, so a key never
reaches a config dump, a Prefect parameter, a shard, a log line or a cache key.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.stages.llm import tool_chat
from stepforge.stages.llm.base import ClientStats, Generation, GenerationError, GenerationRequest, Meter, current_meter

try:  # several times faster than the stdlib both ways, and straight to/from bytes
    import orjson
except ImportError:  # pragma: no cover - orjson comes with the base install
    orjson = None

ServerKind = Literal["vllm", "sglang", "llamacpp", "tgi", "openai", "generic"]
Continuation = Literal["continue_final_message", "completions", "unsupported"]

CONTINUATION_BY_SERVER: dict[str, Continuation] = {
    "vllm": "continue_final_message",
    "sglang": "continue_final_message",
    "llamacpp": "completions",
    "tgi": "completions",
    "openai": "unsupported",
}

# Samplers whose defaults are not plain temperature/top-p sampling: llama.cpp's server applies
# top_k 40, min_p 0.05 and a repeat penalty unless told otherwise, which would silently change
# the distribution every labeller's estimate is about.
NEUTRAL_SAMPLER: dict[str, dict[str, Any]] = {
    "llamacpp": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
}


class HttpConfig(BaseModel):
    """How to reach an OpenAI-compatible server and how hard to push it (``backend.kind: openai``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(
        default="http://127.0.0.1:8000/v1", description="The server's OpenAI API root, including /v1."
    )
    server: ServerKind = Field(
        default="vllm",
        description="What serves it; decides how partial solutions are continued and which sampler defaults "
        "are neutralised (vllm, sglang, llamacpp, tgi, openai, generic).",
    )
    continuation: Continuation | None = Field(
        default=None,
        description="Override how an assistant prefix is continued: continue_final_message (chat), completions "
        "(raw prompt rendered here with `tokenizer`'s chat template), unsupported. Default: by `server`.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="A local copy of the model's tokenizer for exact token counts and, with the completions "
        "continuation, the chat template: a .gguf path, smollm2-135m / qwen2.5-coder-1.5b, or a Hugging Face "
        "tokenizer directory. Without it step token counts are estimated as UTF-8 bytes / 4.",
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Environment variable holding the API key (may be unset for local servers)."
    )
    api_key_file: Path | None = Field(
        default=None, description="A file holding the API key; read when set (the environment variable is then ignored)."
    )
    timeout_seconds: float = Field(default=300.0, gt=0, description="Per-request timeout, connect to last byte.")
    max_retries: int = Field(default=8, ge=0, description="Retries per sample after the first attempt before giving up.")
    backoff_seconds: float = Field(default=0.5, gt=0, description="First backoff ceiling; doubles per retry (full jitter).")
    backoff_max_seconds: float = Field(default=30.0, gt=0, description="Largest backoff ceiling between retries.")
    requests_per_minute: float | None = Field(default=None, gt=0, description="Client-side request rate limit; none by default.")
    tokens_per_minute: float | None = Field(
        default=None, gt=0, description="Client-side limit on prompt + completion tokens per minute; none by default."
    )
    usd_per_million_prompt_tokens: float = Field(default=0.0, ge=0, description="Price of prompt tokens, for the run's cost.")
    usd_per_million_completion_tokens: float = Field(
        default=0.0, ge=0, description="Price of completion tokens, for the run's cost."
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON fields sent with every request (server-specific sampler options)."
    )
    tools: Literal["native", "prompt"] = Field(
        default="native",
        description="How a tool-using conversation (live agents) is sent. native: messages with tool_calls and tool "
        "turns plus `tools`, rendered by the server's chat template (vLLM refuses requests with tools unless it "
        "runs with --enable-auto-tool-choice --tool-call-parser hermes). prompt: no `tools` field; the "
        "conversation as plain chat turns with the tools described in the system turn, which any chat server "
        "takes; it enters the model id (another rendering samples other turns).",
    )
    model_revision: str = Field(
        default="",
        description="Anything that distinguishes these weights from others served under the same name (a commit, a "
        "digest); part of the model id that keys caches and shards.",
    )

    @property
    def resolved_continuation(self) -> Continuation:
        return self.continuation or CONTINUATION_BY_SERVER.get(self.server, "continue_final_message")

    def __hash__(self) -> int:  # extra_body is a dict; configs are hashed to share loaded backends
        return hash(self.model_dump_json())


def http_model_id(model: str, http: HttpConfig) -> str:
    """Keys caches and shards: the served model, never the URL (a proxy or new port is the same model)."""
    return (f"{http.server}:{model}" + (f"@{http.model_revision}" if http.model_revision else "")
            + ("+prompt-tools" if http.tools == "prompt" else ""))


def read_api_key(http: HttpConfig) -> str | None:
    if http.api_key_file is not None:
        try:
            return Path(http.api_key_file).expanduser().read_text().strip() or None
        except OSError as exc:
            raise GenerationError(f"cannot read api_key_file {http.api_key_file}: {exc.strerror}") from None
    return os.environ.get(http.api_key_env) or None


class _RateLimiter:
    """A token bucket refilled continuously; a request larger than the bucket waits for a full one."""

    def __init__(self, per_minute: float):
        self.capacity = per_minute
        self.available = per_minute
        self.rate = per_minute / 60.0
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.available = min(self.capacity, self.available + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self.lock:  # first come, first served: a big request is not starved by small ones
            self._refill()
            while self.available < amount:
                await asyncio.sleep((amount - self.available) / self.rate)
                self._refill()
            self.available -= amount

    def settle(self, estimated: float, actual: float) -> None:
        """Correct the bucket once the server has said what a request really cost."""
        self._refill()
        self.available = min(self.capacity, self.available + estimated - actual)


def _encode(body: dict[str, Any]) -> bytes:
    """A request body as JSON bytes (orjson; the stdlib for what orjson refuses, e.g. ints beyond 64 bits)."""
    if orjson is not None:
        try:
            return orjson.dumps(body)
        except TypeError:
            pass
    return json.dumps(body).encode()


_decode = orjson.loads if orjson is not None else json.loads  # raises a ValueError on anything not JSON

# Sent with every request, so the client adds none of its own per request. ``identity``: a
# model server's answers are small, and not compressing them costs neither side CPU.
_FIXED_HEADERS = {
    "Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity",
    "User-Agent": "stepforge",
}


class _Retry(Exception):
    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.retry_after = reason, retry_after


class _LoopBridge:
    """Runs coroutines on one loop (the backend's) for callers on other loops and threads, and hands
    their outcomes back: what ``asyncio.run_coroutine_threadsafe`` + ``wrap_future`` do, without a
    ``concurrent.futures.Future`` per call and with one wake-up of a loop per batch instead of one
    per call (a wake-up is a write to the woken loop's self-pipe, and the read that drains it).
    Each call runs in a copy of its caller's context variables, as with ``run_coroutine_threadsafe``;
    a caller that is cancelled cancels its call."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._inbox: list[list] = []  # [coroutine, context, caller's loop, caller's future, task]
        self._finished_now: list[tuple] = []  # (caller's loop, future, outcome), this loop iteration's
        self._outboxes: dict[asyncio.AbstractEventLoop, list] = {}  # by caller's loop: (future, outcome)

    async def call(self, coroutine: Any) -> Any:
        caller = asyncio.get_running_loop()
        future = caller.create_future()
        call = [coroutine, contextvars.copy_context(), caller, future, None]
        with self._lock:
            self._inbox.append(call)
            wake = len(self._inbox) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._start)
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():
                self.loop.call_soon_threadsafe(self._cancel, call)
            raise

    # -- on the bridge's loop
    def _start(self) -> None:
        with self._lock:
            calls, self._inbox = self._inbox, []
        for call in calls:
            if call[0] is None:  # cancelled before it started
                continue
            task = self.loop.create_task(call[0], context=call[1])
            call[0] = call[1] = None
            call[4] = task
            task.add_done_callback(functools.partial(self._finished, call))

    def _cancel(self, call: list) -> None:
        if call[4] is not None:
            call[4].cancel()
        elif call[0] is not None:  # not started yet (its start is queued behind this): never will be
            call[0].close()
            call[0] = None

    def _finished(self, call: list, task: asyncio.Task) -> None:
        if task.cancelled():
            outcome = (True, None, None)
        elif (exc := task.exception()) is not None:
            outcome = (False, exc, None)
        else:
            outcome = (False, None, task.result())
        if not self._finished_now:  # the calls finishing in this iteration of the loop go together
            self.loop.call_soon(self._hand_back)
        self._finished_now.append((call[2], call[3], outcome))

    def _hand_back(self) -> None:
        finished, self._finished_now = self._finished_now, []
        woken = []
        with self._lock:
            for caller, future, outcome in finished:
                box = self._outboxes.get(caller)
                if box is None:  # no delivery pending on that loop yet
                    box = self._outboxes[caller] = []
                    woken.append(caller)
                box.append((future, outcome))
        for caller in woken:
            try:
                caller.call_soon_threadsafe(self._deliver, caller)
            except RuntimeError:  # the caller's loop is closed: nobody waits for these
                with self._lock:
                    self._outboxes.pop(caller, None)

    # -- on a caller's loop
    def _deliver(self, caller: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            box = self._outboxes.pop(caller, ())
        for future, (cancelled, exc, result) in box:
            if future.done():  # its caller was cancelled
                continue
            if cancelled:
                future.cancel()
            elif exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)


class LocalTokenizer:
    """The model's tokenizer and chat template, loaded here without the weights."""

    def __init__(self, spec: str):
        path = Path(spec).expanduser()
        if path.is_dir():
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:
                raise ImportError("a Hugging Face tokenizer directory needs transformers: pip install transformers") from exc
            self._hf = AutoTokenizer.from_pretrained(str(path))
            self._llama = None
            return
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from stepforge.stages.llm.models import resolve_model

        self._hf = None
        self._llama = Llama(model_path=str(resolve_model(spec).path), vocab_only=True, verbose=False)
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{spec} has no chat template")

        def special(token: int) -> str:
            return self._llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=special(self._llama.token_eos()), bos_token=special(self._llama.token_bos())
        )

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat template with the assistant turn opened (the prefix is appended by the caller)."""
        if self._hf is not None:
            return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._formatter(messages=messages).prompt

    def count_tokens(self, text: str) -> int:
        if self._hf is not None:
            return len(self._hf.encode(text, add_special_tokens=False))
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def request_body(
    request: GenerationRequest, seed: int, model: str, http: HttpConfig, tokenizer: LocalTokenizer | None
) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body for one sample of ``request``."""
    continuation = http.resolved_continuation
    sampling: dict[str, Any] = {
        "model": model, "max_tokens": request.max_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "seed": seed, "n": 1,
    }
    if request.stop:
        sampling["stop"] = list(request.stop)
    sampling.update(NEUTRAL_SAMPLER.get(http.server, {}))
    sampling.update(http.extra_body)
    if request.conversation is not None:
        # A tool-using chat goes to the chat endpoint as it is: the server renders the tools.
        if request.assistant_prefix:
            raise GenerationError("a tool-using conversation cannot continue a partial assistant turn over HTTP")
        conversation = json.loads(request.conversation)
        tools = json.loads(request.tools) if request.tools else []
        if http.tools == "prompt":
            return "/chat/completions", {"messages": tool_chat.plain_turns(conversation, tools), **sampling}
        body = {"messages": conversation, **sampling}
        if tools:
            body["tools"] = tools
        return "/chat/completions", body
    messages = None if request.messages is None else [{"role": r, "content": c} for r, c in request.messages]
    use_completions = request.prompt is not None or (continuation == "completions" and tokenizer is not None)
    if request.assistant_prefix and not use_completions and continuation != "continue_final_message":
        raise GenerationError(
            f"a {http.server} server cannot continue a partial assistant turn ({continuation}); "
            "set backend.http.tokenizer to render prompts for the completions endpoint, or use another server"
        )
    if use_completions:
        prompt = request.prompt if request.prompt is not None else tokenizer.render(messages) + request.assistant_prefix
        body = {"prompt": prompt, **sampling}
        if request.logprobs:
            body["logprobs"] = 1
        if request.json_schema is not None:
            body.update(_completion_schema_fields(request.json_schema, http.server))
        return "/completions", body
    if request.assistant_prefix:
        messages.append({"role": "assistant", "content": request.assistant_prefix})
        sampling.update(continue_final_message=True, add_generation_prompt=False)
    body = {"messages": messages, **sampling}
    if request.logprobs:
        body["logprobs"] = True
    if request.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": json.loads(request.json_schema), "strict": True},
        }
    return "/chat/completions", body


def _completion_schema_fields(schema: str, server: str) -> dict[str, Any]:
    """JSON-constrained decoding on the completions endpoint, in each server's dialect."""
    if server == "llamacpp":  # llama-cpp-python's server takes a GBNF grammar
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        return {"grammar": json_schema_to_gbnf(schema)}
    if server == "vllm":
        return {"guided_json": json.loads(schema)}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": json.loads(schema)}}}


def parse_response(path: str, payload: Any, request: GenerationRequest) -> tuple[Generation, dict[str, int]]:
    """A ``Generation`` and the usage counts from a 200 response; ``_Retry`` if it is not the protocol's shape."""
    try:
        choice = payload["choices"][0]
        if path == "/completions":
            text = choice["text"]
        else:
            text = choice["message"]["content"] or ""
            if isinstance(calls := choice["message"].get("tool_calls"), list) and calls:
                # Parsed calls go back into the Hermes text the model wrote (stages.llm.tool_chat).
                text = tool_chat.hermes_text(text, [c for c in calls if isinstance(c, dict)])
        finish = choice.get("finish_reason") or "stop"
    except (KeyError, IndexError, TypeError) as exc:
        raise _Retry("bad_response", f"missing {exc}") from None
    if not isinstance(text, str):
        raise _Retry("bad_response", "text is not a string")
    usage = payload.get("usage") or {}
    completion_tokens = int(usage.get("completion_tokens") or 0)
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    logprobs, token_bytes = _token_details(path, choice.get("logprobs"), text)
    if finish not in ("stop", "length"):  # tool_calls / content_filter / eos all mean the model stopped
        finish = "stop"
    generation = Generation(
        text=text,
        num_tokens=completion_tokens or (len(token_bytes) if token_bytes else 0),
        finish_reason=finish,
        logprobs=logprobs if request.logprobs else None,
        token_bytes=token_bytes,
    )
    return generation, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def _token_details(path: str, logprobs: Any, text: str) -> tuple[tuple[float, ...] | None, tuple[int, ...] | None]:
    """Per-token logprobs and UTF-8 lengths, when the server reported them and they add up to the text."""
    if not logprobs:
        return None, None
    try:
        if path == "/completions":
            values = tuple(float(v) for v in logprobs["token_logprobs"])
            offsets = [int(o) for o in logprobs["text_offset"]]
            # Offsets count characters from the start of the prompt (llama.cpp) or of the text (vLLM).
            start = offsets[0] if offsets else 0
            ends = offsets[1:] + [start + len(text)]
            sizes = tuple(len(text[o - start : e - start].encode("utf-8")) for o, e in zip(offsets, ends))
        else:
            content = logprobs["content"]
            values = tuple(float(t["logprob"]) for t in content)
            sizes = tuple(len(t["bytes"]) if t.get("bytes") is not None else len(t["token"].encode()) for t in content)
    except (KeyError, TypeError, ValueError):
        return None, None
    # A stop string cut from the text leaves its tokens in the list; the byte sum then disagrees.
    return values, (sizes if sum(sizes) == len(text.encode("utf-8")) else None)


class OpenAIBackend:
    """Samples from an OpenAI-compatible server; see the module docstring."""

    def __init__(self, model: str, http: HttpConfig, *, max_in_flight: int = 256):
        try:
            import aiohttp
        except ImportError as exc:  # pragma: no cover - aiohttp comes with the base install
            raise ImportError("the HTTP backend needs aiohttp: pip install aiohttp") from exc
        self._aiohttp = aiohttp
        self.model = model
        self.http = http
        self.model_id = http_model_id(model, http)
        self.max_in_flight = max_in_flight
        self.supports_json_schema = http.server != "tgi"
        self.tokenizer = LocalTokenizer(http.tokenizer) if http.tokenizer else None
        self.stats = ClientStats()  # in flight at the server, measured on the backend's own loop
        self.retries: Counter[str] = Counter()
        self.gave_up: Counter[str] = Counter()
        self.usage = Counter()
        self._jitter = random.Random()
        headers = dict(_FIXED_HEADERS)
        if (key := read_api_key(http)) is not None:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._close_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._bridge = _LoopBridge(self._loop)
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"http-{model}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            self._thread.join()
            self._loop.close()
            raise self._failed

    # -- the Backend interface -----------------------------------------------------------
    async def generate(self, request: GenerationRequest, seed: int) -> Generation:
        # The meter of the shard asking (a context variable of its thread) is handed to the
        # backend's own loop with the call, so its traffic is charged to that shard.
        return await self._bridge.call(self._generate(request, seed, current_meter()))

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return self.tokenizer.count_tokens(text)
        return max(1, round(len(text.encode("utf-8")) / 4)) if text else 0

    def counters(self, meter: Meter | None = None) -> dict[str, float]:
        """Flat counters of this backend's traffic: the process's totals, or with a ``meter`` the
        share charged to it (a shard's stats)."""
        if meter is not None:
            mine = meter.of(self)
            usage, in_flight = mine, mine["server_in_flight_seconds"]
            retries = Counter({k.split(".", 1)[1]: v for k, v in mine.items() if k.startswith("retries.")})
            gave_up = Counter({k.split(".", 1)[1]: v for k, v in mine.items() if k.startswith("gave_up.")})
        else:
            usage, in_flight, retries, gave_up = self.usage, self.stats.area_now(), self.retries, self.gave_up
        counts: dict[str, float] = {
            "http_requests": usage["http_requests"], "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"], "cost_usd": self.cost_usd(usage),
            "retries": sum(retries.values()), "gave_up": sum(gave_up.values()),
            "server_in_flight_seconds": round(in_flight, 3),
        }
        if meter is None:  # how long anything was in flight is the process's, not a shard's
            counts["server_busy_seconds"] = round(self.stats.busy_seconds, 3)
        counts.update({f"retries.{reason}": n for reason, n in retries.items()})
        counts.update({f"gave_up.{reason}": n for reason, n in gave_up.items()})
        return counts

    def cost_usd(self, usage: Counter | None = None) -> float:
        usage = self.usage if usage is None else usage
        return round(
            usage["prompt_tokens"] * self.http.usd_per_million_prompt_tokens / 1e6
            + usage["completion_tokens"] * self.http.usd_per_million_completion_tokens / 1e6,
            6,
        )

    def close(self) -> None:
        with self._close_lock:
            if self._loop.is_closed():
                return
            asyncio.run_coroutine_threadsafe(self._close_session(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    # -- the backend's loop --------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._open_session())
        except BaseException as exc:  # handed to the constructor, which raises it
            self._failed = exc
            self._ready.set()
            return
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._rpm = _RateLimiter(self.http.requests_per_minute) if self.http.requests_per_minute else None
        self._tpm = _RateLimiter(self.http.tokens_per_minute) if self.http.tokens_per_minute else None
        self._ready.set()
        self._loop.run_forever()

    async def _open_session(self) -> None:
        """One keep-alive pool of ``max_in_flight`` connections, set up so that a request costs only
        its own bytes: absolute URLs parsed once, headers fixed once (so none is added per request),
        no cookie jar, no proxy or netrc lookups from the environment, no tracing, a timeout that
        runs from connecting to the last byte of the body."""
        aiohttp = self._aiohttp
        from yarl import URL  # aiohttp's own URL type: a URL object is not parsed again per request

        base = self.http.base_url.rstrip("/")
        self._urls = {path: URL(base + path) for path in ("/chat/completions", "/completions")}
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=self.max_in_flight)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=self.http.timeout_seconds),
            # Costs nothing unless a server compresses although asked not to (Accept-Encoding: identity).
            auto_decompress=True,
        )
        # What a request raises when the connection fails: refused, reset, closed before or in the
        # middle of the answer (a short body), an answer that is not HTTP.
        self._connection_errors = (aiohttp.ClientError, OSError)
        self._bad_url = aiohttp.InvalidURL

    async def _close_session(self) -> None:
        await self._session.close()
        await asyncio.sleep(0)  # the closed connections' transports finish closing

    async def _generate(self, request: GenerationRequest, seed: int, meter: Meter | None = None) -> Generation:
        path, body = request_body(request, seed, self.model, self.http, self.tokenizer)
        payload = _encode(body)  # once per sample: a retry sends the same bytes
        estimated = (  # only a tokens-per-minute budget needs the estimate (tokenizing costs CPU)
            self.count_tokens(body.get("prompt") or json.dumps(body.get("messages"))) + request.max_tokens
            if self._tpm else 0
        )
        # A sample backing off keeps its slot: an overloaded server (429, 503) then sees fewer
        # requests, not the same number with the failed ones replaced by new ones.
        async with self._slots:
            last: _Retry | None = None
            for attempt in range(self.http.max_retries + 1):
                if attempt:
                    self.retries[last.reason] += 1
                    if meter is not None:
                        meter.add(self, f"retries.{last.reason}")
                    await asyncio.sleep(self._backoff(attempt, last.retry_after))
                if self._rpm:
                    await self._rpm.acquire(1)
                if self._tpm:
                    await self._tpm.acquire(estimated)
                self.stats.enter()
                started = time.perf_counter()
                if meter is not None:
                    meter.add(self, "http_requests")
                try:
                    generation, usage = await self._attempt(path, payload, request)
                except _Retry as retry:
                    last = retry
                    if self._tpm:
                        self._tpm.settle(estimated, 0)
                    continue
                finally:
                    self.stats.leave()
                    if meter is not None:
                        meter.add(self, "server_in_flight_seconds", time.perf_counter() - started)
                if self._tpm:
                    self._tpm.settle(estimated, usage["prompt_tokens"] + usage["completion_tokens"])
                self.usage.update(usage)
                if meter is not None:
                    for name, amount in usage.items():
                        meter.add(self, name, amount)
                return generation
            self.gave_up[last.reason] += 1
            if meter is not None:
                meter.add(self, f"gave_up.{last.reason}")
            raise GenerationError(f"gave up after {self.http.max_retries + 1} attempts; last: {last}")

    async def _attempt(self, path: str, payload: bytes, request: GenerationRequest) -> tuple[Generation, dict[str, int]]:
        self.usage["http_requests"] += 1
        retry_after = None
        try:
            async with self._session.post(self._urls[path], data=payload) as response:
                status = response.status
                content = await response.read()
                if status == 429 or status >= 500:
                    retry_after = _retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError as exc:  # before the connection errors: aiohttp's timeouts are both
            raise _Retry("timeout", type(exc).__name__) from None
        except self._bad_url as exc:  # a base_url no request can be sent to: retrying cannot help
            raise GenerationError(f"cannot send to {exc}") from None
        except self._connection_errors as exc:  # refused, reset, closed mid-body, protocol garbage
            raise _Retry("connection", f"{type(exc).__name__}: {exc}") from None
        if status == 429:
            raise _Retry("http_429", _text(content, 200), retry_after)
        if status >= 500:
            raise _Retry(f"http_{status}", _text(content, 200), retry_after)
        if status != 200:  # the request itself is wrong (400, 401, 404, 422): retrying cannot help
            raise GenerationError(f"http_{status}: {_text(content, 300)}")
        try:
            answer = _decode(content)
        except ValueError:
            raise _Retry("bad_json", _text(content, 80)) from None
        return parse_response(path, answer, request)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.http.backoff_max_seconds, self.http.backoff_seconds * 2 ** (attempt - 1))
        delay = self._jitter.uniform(0, ceiling)
        return max(delay, retry_after) if retry_after is not None else delay


def _text(content: bytes, limit: int) -> str:
    """The start of a body, for an error message."""
    return content[: limit * 4].decode("utf-8", "replace")[:limit]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the HTTP-date form is rare from model servers: ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
