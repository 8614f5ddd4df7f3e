"""OpenAI-compatible HTTP backend: vLLM (`vllm serve`), SGLang, llama.cpp's server, TGI, hosted APIs.

One backend object owns one event loop on its own thread, one connection pool and one
bound on requests in flight. Stages call ``generate`` from whatever loop or thread they run
on; the call is handed to the backend's loop, so every shard and stage of a process shares
the same bound, the same rate limits and the same accounting, and the server sees a steady
queue of ``max_in_flight`` requests.

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
import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.stages.llm.base import ClientStats, Generation, GenerationError, GenerationRequest

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
    return f"{http.server}:{model}" + (f"@{http.model_revision}" if http.model_revision else "")


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


class _Retry(Exception):
    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.retry_after = reason, retry_after


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
            import httpx
        except ImportError as exc:  # pragma: no cover - httpx comes with the base install
            raise ImportError("the HTTP backend needs httpx: pip install httpx") from exc
        self._httpx = httpx
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
        headers = {"Content-Type": "application/json"}
        if (key := read_api_key(http)) is not None:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"http-{model}", daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- the Backend interface -----------------------------------------------------------
    async def generate(self, request: GenerationRequest, seed: int) -> Generation:
        future = asyncio.run_coroutine_threadsafe(self._generate(request, seed), self._loop)
        return await asyncio.wrap_future(future)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return self.tokenizer.count_tokens(text)
        return max(1, round(len(text.encode("utf-8")) / 4)) if text else 0

    def counters(self) -> dict[str, float]:
        """Flat, monotone counters of this backend's traffic (shard stats record their deltas)."""
        counts: dict[str, float] = {
            "http_requests": self.usage["http_requests"], "prompt_tokens": self.usage["prompt_tokens"],
            "completion_tokens": self.usage["completion_tokens"], "cost_usd": self.cost_usd(),
            "retries": sum(self.retries.values()), "gave_up": sum(self.gave_up.values()),
            "server_busy_seconds": round(self.stats.busy_seconds, 3),
            "server_in_flight_seconds": round(self.stats.in_flight_area, 3),
        }
        counts.update({f"retries.{reason}": n for reason, n in self.retries.items()})
        counts.update({f"gave_up.{reason}": n for reason, n in self.gave_up.items()})
        return counts

    def cost_usd(self) -> float:
        return round(
            self.usage["prompt_tokens"] * self.http.usd_per_million_prompt_tokens / 1e6
            + self.usage["completion_tokens"] * self.http.usd_per_million_completion_tokens / 1e6,
            6,
        )

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    # -- the backend's loop --------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        limits = self._httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        self._client = self._httpx.AsyncClient(
            base_url=self.http.base_url.rstrip("/"), headers=self._headers, limits=limits,
            timeout=self._httpx.Timeout(self.http.timeout_seconds),
        )
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._rpm = _RateLimiter(self.http.requests_per_minute) if self.http.requests_per_minute else None
        self._tpm = _RateLimiter(self.http.tokens_per_minute) if self.http.tokens_per_minute else None
        self._ready.set()
        self._loop.run_forever()

    async def _generate(self, request: GenerationRequest, seed: int) -> Generation:
        path, body = request_body(request, seed, self.model, self.http, self.tokenizer)
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
                    await asyncio.sleep(self._backoff(attempt, last.retry_after))
                if self._rpm:
                    await self._rpm.acquire(1)
                if self._tpm:
                    await self._tpm.acquire(estimated)
                self.stats.enter()
                try:
                    generation, usage = await self._attempt(path, body, request)
                except _Retry as retry:
                    last = retry
                    if self._tpm:
                        self._tpm.settle(estimated, 0)
                    continue
                finally:
                    self.stats.leave()
                if self._tpm:
                    self._tpm.settle(estimated, usage["prompt_tokens"] + usage["completion_tokens"])
                self.usage.update(usage)
                return generation
            self.gave_up[last.reason] += 1
            raise GenerationError(f"gave up after {self.http.max_retries + 1} attempts; last: {last}")

    async def _attempt(self, path: str, body: dict, request: GenerationRequest) -> tuple[Generation, dict[str, int]]:
        httpx = self._httpx
        self.usage["http_requests"] += 1
        try:
            response = await self._client.post(path, json=body)
        except httpx.TimeoutException as exc:
            raise _Retry("timeout", type(exc).__name__) from None
        except httpx.TransportError as exc:  # refused, reset, closed mid-body, protocol garbage
            raise _Retry("connection", f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 429:
            raise _Retry("http_429", response.text[:200], _retry_after(response.headers.get("retry-after")))
        if status >= 500:
            raise _Retry(f"http_{status}", response.text[:200], _retry_after(response.headers.get("retry-after")))
        if status != 200:  # the request itself is wrong (400, 401, 404, 422): retrying cannot help
            raise GenerationError(f"http_{status}: {response.text[:300]}")
        try:
            payload = response.json()
        except ValueError:
            raise _Retry("bad_json", response.text[:80]) from None
        return parse_response(path, payload, request)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.http.backoff_max_seconds, self.http.backoff_seconds * 2 ** (attempt - 1))
        delay = self._jitter.uniform(0, ceiling)
        return max(delay, retry_after) if retry_after is not None else delay


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the HTTP-date form is rare from model servers: ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
