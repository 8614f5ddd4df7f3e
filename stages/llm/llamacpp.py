"""llama.cpp in-process backend (``llama-cpp-python``): the real CPU model for laptops, tests and the demo.

llama.cpp evaluates one sequence at a time here, so batching means *ordering*: a worker
thread always picks, among the queued samples, the one whose prompt shares the longest
prefix with the prompt it just ran. llama-cpp-python keeps the previous sequence in its KV
cache and re-evaluates only the tokens after the common prefix, so K completions of one
prefix, and prefixes of one solution, cost their prompt once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from stepforge.stages.llm import tool_chat
from stepforge.stages.llm.base import Generation, GenerationRequest
from stepforge.stages.llm.models import ResolvedModel, resolve_model


def _import_llama():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - exercised only without the dependency
        raise ImportError("the llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python==0.3.36") from exc
    return llama_cpp


@contextlib.contextmanager
def _extra_buffer_types_disabled_if_amx(llama_cpp):
    """Load without ggml's extra CPU buffer types when the build has AMX kernels.

    llama-cpp-python builds llama.cpp with -march=native; on an AMX-capable Xeon under a
    virtual machine that does not grant AMX tile state (this project's CI machines), it
    segfaults in ggml_backend_amx_mul_mat on the first decode. Without the extra buffer
    types the plain CPU kernels run; measured here, they are as fast for these models.
    """
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        yield
        return
    bindings = llama_cpp.llama_cpp  # the module Llama.__init__ takes its default params from
    original = bindings.llama_model_default_params

    def params_without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = params_without_extra_buffers
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


def _common_prefix_len(a, b) -> int:
    """Length of the shared prefix of two strings or token lists."""
    return len(os.path.commonprefix((a, b)))


@dataclass(order=True)
class _Queued:
    prompt: str
    sequence: int
    request: GenerationRequest = field(compare=False)
    seed: int = field(compare=False)
    future: asyncio.Future = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def idle_cores(window: float = 0.2) -> int:
    """The cores this process may use that other processes are not keeping busy right now (at
    least one), sampled over ``window`` seconds: llama.cpp's threads wait on each other at every
    operation, so one thread that shares its core with a busy process slows all of them (measured:
    an agent-judging test 64 s on two idle cores, over 900 s beside two busy loops). Where
    /proc/stat cannot be read, every usable core."""
    cores = len(os.sched_getaffinity(0))
    try:
        busy0, total0 = _busy_jiffies()
        own0 = time.process_time()
        time.sleep(window)
        busy1, total1 = _busy_jiffies()
        own = time.process_time() - own0
    except (OSError, ValueError, IndexError):
        return cores
    if total1 <= total0:
        return cores
    # Busy CPU-seconds of the whole machine in the window, minus this process's own.
    machine_cpus = os.cpu_count() or cores
    busy_elsewhere = (busy1 - busy0) / (total1 - total0) * machine_cpus * window - own
    return max(1, min(cores, cores - round(busy_elsewhere / window)))


class LlamaCppBackend:
    """One loaded GGUF model and the thread that runs it."""

    def __init__(
        self,
        model: str | ResolvedModel = "smollm2-135m",
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        max_in_flight: int = 64,
        prefill_chunk: int = 64,
    ):
        llama_cpp = self._llama_cpp = _import_llama()
        self.resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
        self.model_id = self.resolved.model_id
        self.max_in_flight = max_in_flight
        self.supports_json_schema = True
        self._grammars: dict[str, object] = {}  # json schema text -> compiled LlamaGrammar
        if not 0 < prefill_chunk <= n_batch:
            raise ValueError("prefill_chunk must be between 1 and n_batch")
        self.prefill_chunk = prefill_chunk
        self._kv_prompt: list[int] = []  # the prompt whose canonical prefill is in the KV cache
        with _extra_buffer_types_disabled_if_amx(llama_cpp):
            self.llm = llama_cpp.Llama(
                model_path=str(self.resolved.path), n_ctx=n_ctx, n_batch=n_batch,
                n_threads=(threads := n_threads or idle_cores()), n_threads_batch=threads,
                seed=0, verbose=False,
            )
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.resolved.path} has no chat template; send raw prompts instead of messages")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        vocab_eos = self.llm.token_eos()
        vocab_bos = self.llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm.detokenize([vocab_eos], special=True).decode("utf-8", "replace") if vocab_eos >= 0 else "",
            bos_token=self.llm.detokenize([vocab_bos], special=True).decode("utf-8", "replace") if vocab_bos >= 0 else "",
        )
        self._template_knows_tools = tool_chat.template_knows_tools(template)
        self._queue: list[_Queued] = []
        self._sequence = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._last_prompt = ""
        self._worker = threading.Thread(target=self._run_worker, name=f"llamacpp-{self.model_id}", daemon=True)
        self._worker.start()

    # -- the Backend interface -----------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        """The exact text the model conditions on: chat template with the assistant turn opened, plus prefix."""
        if request.prompt is not None:
            return request.prompt
        if request.conversation is not None:
            return render_conversation(self._formatter, self._template_knows_tools, request) + request.assistant_prefix
        messages = [{"role": role, "content": content} for role, content in request.messages]
        rendered = self._formatter(messages=messages).prompt
        return rendered + request.assistant_prefix

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``, without materialising them.

        ``Llama.tokenize`` allocates a buffer of the training context (8k-32k ids) per call,
        ~0.1 ms; asking llama.cpp for the count alone (a zero-size buffer) is ~20x cheaper,
        and every stored step is counted.
        """
        data = text.encode("utf-8")
        needed = self._llama_cpp.llama_tokenize(self.llm._model.vocab, data, len(data), None, 0, False, False)
        return -needed if needed < 0 else needed

    async def generate(self, request: GenerationRequest, seed: int) -> Generation:
        loop = asyncio.get_running_loop()
        item = _Queued(self.render(request), next(self._sequence), request, seed, loop.create_future(), loop)
        with self._wake:
            if self._closed:
                raise RuntimeError("backend is closed")
            bisect.insort(self._queue, item)
            self._wake.notify()
        return await item.future

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join(timeout=60)
        self.llm.close()

    # -- the worker ----------------------------------------------------------------------
    def _next_item(self) -> _Queued:
        """The queued sample sharing the longest prompt prefix with the last one run (a sorted-list neighbour)."""
        position = bisect.bisect_left(self._queue, _Queued(self._last_prompt, -1, None, 0, None, None))
        candidates = [i for i in (position - 1, position) if 0 <= i < len(self._queue)]
        best = max(candidates, key=lambda i: _common_prefix_len(self._queue[i].prompt, self._last_prompt))
        return self._queue.pop(best)

    def _run_worker(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for item in self._queue:
                        item.loop.call_soon_threadsafe(_fail, item.future, RuntimeError("backend closed"))
                    self._queue.clear()
                    return
                item = self._next_item()
            if item.future.cancelled():
                continue
            try:
                result = self._generate_now(item.prompt, item.request, item.seed)
            except Exception as exc:  # delivered to the awaiting coroutine, which makes it a reject
                item.loop.call_soon_threadsafe(_fail, item.future, exc)
            else:
                item.loop.call_soon_threadsafe(_succeed, item.future, result)
            self._last_prompt = item.prompt

    def _prefill(self, prompt_tokens: list[int]) -> None:
        """Evaluate the prompt in fixed, position-aligned chunks, reusing the KV cache chunk-wise.

        Logits depend slightly on how a prompt was split into batches (a cached prefix plus
        a one-token suffix gives logprobs ~0.04 away from a whole-prompt batch, enough to
        change samples). Aligning every batch to multiples of ``prefill_chunk`` from
        position 0 makes each position's KV entries a function of the prompt alone, so a
        sample is the same whatever ran before it — a resumed run reproduces an
        uninterrupted one — while shared prefixes are still evaluated once.
        """
        chunk = self.prefill_chunk
        shared = _common_prefix_len(self._kv_prompt, prompt_tokens)
        self._kv_prompt = []  # if an evaluation below fails, nothing in the cache is trusted next time
        reuse = (min(shared, len(prompt_tokens) - 1) // chunk) * chunk
        if reuse < self.llm.n_tokens:
            self.llm._ctx.kv_cache_seq_rm(-1, reuse, -1)
            self.llm.n_tokens = reuse
        for start in range(reuse, len(prompt_tokens), chunk):
            self.llm.eval(prompt_tokens[start : start + chunk])
        self._kv_prompt = list(prompt_tokens)

    def _generate_now(self, prompt: str, request: GenerationRequest, seed: int) -> Generation:
        """Sample one continuation token by token.

        The explicit loop (rather than ``create_completion``) gives the sampled token ids,
        their log-probabilities without ``logits_all`` (which keeps every position's logits
        and crashes this build), and stop handling on the decoded text.
        """
        prompt_tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=request.prompt is not None, special=True)
        if len(prompt_tokens) + request.max_tokens > self.llm.n_ctx():
            # Refused rather than silently shortened, so that n_ctx never changes a sample.
            raise ValueError(
                f"prompt of {len(prompt_tokens)} tokens plus max_tokens {request.max_tokens} "
                f"does not fit the {self.llm.n_ctx()}-token context"
            )
        budget = request.max_tokens
        last_logprobs: list[np.ndarray] = []

        def keep_logprobs(_input_ids, logits):
            values = logits.astype(np.float64)
            peak = values.max()
            last_logprobs[:] = [values - (peak + np.log(np.exp(values - peak).sum()))]
            return logits

        grammar = self._grammar(request.json_schema) if request.json_schema else None
        self._prefill(prompt_tokens)
        self.llm.set_seed(seed)
        tokens: list[int] = []  # text tokens; an end-of-generation token is counted but not decoded
        generated = 0
        token_bytes: list[int] = []  # each text token's share of the decoded bytes
        decoded_bytes = 0
        logprobs: list[float] = []
        text, finish_reason = "", "length"
        for token in self.llm.generate(
            prompt_tokens,
            temp=request.temperature,
            top_p=request.top_p,
            # llama.cpp's defaults (top_k 40, min_p 0.05) would silently truncate the distribution.
            top_k=0,
            min_p=0.0,
            repeat_penalty=1.0,
            logits_processor=[keep_logprobs] if request.logprobs else None,
            grammar=grammar,
        ):
            generated += 1
            if request.logprobs:
                logprobs.append(float(last_logprobs[0][token]))
            if self._llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                finish_reason = "stop"
                break
            tokens.append(token)
            raw = self.llm.detokenize(tokens, special=False)
            token_bytes.append(len(raw) - decoded_bytes)
            decoded_bytes = len(raw)
            text = raw.decode("utf-8", errors="ignore")
            if request.stop and (cut := _first_stop(text, request.stop)) is not None:
                text, finish_reason = text[:cut], "stop"
                break
            if generated >= budget:
                break
        return Generation(
            text=text,
            num_tokens=generated,
            finish_reason=finish_reason,
            logprobs=tuple(logprobs) if request.logprobs else None,
            token_bytes=tuple(token_bytes),
        )


    def _grammar(self, schema: str):
        """The schema compiled to a GBNF grammar once; llama.cpp masks every token that would break it."""
        if schema not in self._grammars:
            from llama_cpp.llama_grammar import LlamaGrammar

            self._grammars[schema] = LlamaGrammar.from_json_schema(schema, verbose=False)
        return self._grammars[schema]


def render_conversation(formatter, knows_tools: bool, request: GenerationRequest) -> str:
    """A tool-using conversation through the model's chat template (``stages.llm.tool_chat``)."""
    conversation = json.loads(request.conversation)
    tools = json.loads(request.tools) if request.tools else []
    if knows_tools:
        return formatter(messages=tool_chat.template_messages(conversation), tools=tools or None).prompt
    return formatter(messages=tool_chat.plain_turns(conversation, tools)).prompt


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(positions) if positions else None


def _succeed(future: asyncio.Future, value) -> None:
    if not future.cancelled():
        future.set_result(value)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(exc)
