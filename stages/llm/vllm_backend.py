"""vLLM offline-engine backend: the GPU engine for real runs, one big ``LLM.generate`` at a time.

vLLM is fastest when it sees many sequences at once: it schedules them continuously and
shares KV-cache blocks between sequences with a common prompt prefix (prefix caching). The
seam, though, hands over one sample per ``await backend.generate(request, seed)``. So:

- *Batching window.* A worker thread collects the queued samples, waits
  ``batch_window_seconds`` for the rest of a labelling step's samples to arrive (they are
  awaited over a few event-loop ticks), and submits up to ``max_batch`` of them in a single
  ``LLM.generate`` call. While vLLM runs a batch, the next one queues.
- *Prefix-adjacent ordering.* vLLM admits requests in submission order, so sorting a batch by
  rendered prompt puts the K completions of a prefix, and the prefixes of one solution, next
  to each other: they are resident together and the shared prompt is prefilled once.
- *``n`` for consecutive seeds.* The backend sets ``consecutive_seeds``, so the client seeds
  sample ``i`` of a request with ``base + i``. vLLM V1 expands ``SamplingParams(n=m, seed=s)``
  into child requests seeded ``s … s+m-1`` (``vllm/v1/engine/parallel_sampling.py``), so a run
  of queued samples of one request with consecutive seeds becomes one request with ``n=m``:
  one prompt, m children sharing its KV blocks, and each sample identical to the one a
  resumed run would draw on its own (``outputs[j]`` is the sample seeded ``s + j``). Per-sample
  reproducibility holds up to vLLM's numerics, which are not batch-invariant unless vLLM is
  told to be; the generation cache makes replays exact regardless.

Chat requests are rendered with the tokenizer's chat template (assistant turn opened) plus the
``assistant_prefix`` verbatim, like ``LLM.chat(..., continue_final_message=True)``, but rendered
here so that one ``generate`` call can carry a mixed, sorted batch. Prompts are handed to vLLM
as token ids, tokenized without special tokens for chat (the template already wrote BOS; a
text prompt would get a second one) and with them for raw prompts (as the llama.cpp backend).

vLLM cannot be installed without CUDA, so it is imported in the constructor, and the mapping
between requests and vLLM's types is kept in pure module-level functions that are tested
without it (``render_prompt``, ``group_samples``, ``sampling_kwargs``, ``to_generation``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from stepforge.stages.llm import tool_chat
from stepforge.stages.llm.base import Generation, GenerationRequest

VLLM_REQUIREMENT = "vllm==0.33.0"

# (SamplingParams keyword, constructor called with json=<schema dict>): "structured_outputs" /
# StructuredOutputsParams in current vLLM, "guided_decoding" / GuidedDecodingParams before.
JsonConstraint = tuple[str, Callable[..., Any]]

# Prompt tokens the detokenizer is primed with, so the first generated token decodes as it does
# after the prompt (SentencePiece drops a leading space at the start of a sequence).
_PROMPT_CONTEXT_TOKENS = 8


class UnfinishedSampleError(RuntimeError):
    """vLLM ended a sample for a reason other than a stop or the length limit (e.g. ``abort``)."""


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"the vLLM backend needs vLLM, whose wheels are CUDA-only: on a GPU machine, pip install {VLLM_REQUIREMENT}"
        ) from exc
    return vllm


def vllm_json_constraint() -> JsonConstraint | None:
    """vLLM's JSON-schema constraint under whichever name this version has (None: neither)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        pass
    else:
        return "structured_outputs", StructuredOutputsParams
    try:
        from vllm.sampling_params import GuidedDecodingParams
    except ImportError:
        return None
    return "guided_decoding", GuidedDecodingParams


# -- pure mapping between the seam and vLLM (tested without vLLM) ---------------------------


def render_prompt(tokenizer, request: GenerationRequest) -> str:
    """The exact text the model conditions on: chat template with the assistant turn opened, plus prefix."""
    if request.prompt is not None:
        return request.prompt
    if request.conversation is not None:  # Hugging Face templates take tools and call objects
        conversation = tool_chat.template_messages(json.loads(request.conversation))
        tools = json.loads(request.tools) if request.tools else None
        rendered = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)
        return rendered + request.assistant_prefix
    messages = [{"role": role, "content": content} for role, content in request.messages]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return rendered + request.assistant_prefix


@dataclass(eq=False)
class QueuedSample:
    """One awaited sample: what to generate, its seed, and where to deliver the result."""

    request: GenerationRequest
    seed: int
    prompt: str  # rendered
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None


@dataclass(eq=False)
class BatchEntry:
    """One vLLM request: ``samples[j]`` is seeded ``first_seed + j`` and is vLLM's ``outputs[j]``."""

    prompt: str
    request: GenerationRequest
    first_seed: int
    samples: list[QueuedSample]

    @property
    def n(self) -> int:
        return len(self.samples)


def _sampling_identity(request: GenerationRequest) -> GenerationRequest:
    # Two client calls for samples 0..3 and 4..7 of one request may differ only in n.
    return dataclasses.replace(request, n=1) if request.n != 1 else request


def group_samples(queued: Iterable[QueuedSample]) -> list[BatchEntry]:
    """vLLM requests for ``queued``, sorted by prompt; runs of consecutive seeds of one request merged.

    Requests with equal prompts but different sampling parameters stay separate (adjacent).
    A seed queued twice (two callers missing the cache for one sample) starts a new run.
    """
    by_prompt: dict[str, dict[GenerationRequest, list[QueuedSample]]] = {}
    for sample in queued:
        by_prompt.setdefault(sample.prompt, {}).setdefault(_sampling_identity(sample.request), []).append(sample)
    entries: list[BatchEntry] = []
    for prompt in sorted(by_prompt):
        for samples in by_prompt[prompt].values():
            samples.sort(key=lambda sample: sample.seed)
            run = [samples[0]]
            for sample in samples[1:]:
                if sample.seed == run[-1].seed + 1:
                    run.append(sample)
                else:
                    entries.append(BatchEntry(prompt, run[0].request, run[0].seed, run))
                    run = [sample]
            entries.append(BatchEntry(prompt, run[0].request, run[0].seed, run))
    return entries


def sampling_kwargs(
    request: GenerationRequest, n: int, seed: int, json_constraint: JsonConstraint | None = None
) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for ``n`` samples of ``request`` seeded ``seed, seed+1, …``.

    ``logprobs=0`` asks vLLM for the sampled token's logprob only. Stop strings are cut from
    the text (``include_stop_str_in_output`` stays False), as the llama.cpp backend does.
    """
    kwargs: dict[str, Any] = {
        "n": n,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop),
        "seed": seed,
        "logprobs": 0 if request.logprobs else None,
    }
    if request.json_schema is not None:
        if json_constraint is None:
            raise ValueError("this vLLM has no structured-output parameters; cannot constrain to a JSON schema")
        keyword, make_params = json_constraint
        kwargs[keyword] = make_params(json=json.loads(request.json_schema))
    return kwargs


def _decode_stream_pieces(tokenizer, token_ids: Sequence[int], prompt_tail: Sequence[int]) -> list[str] | None:
    """Per-token text via ``tokenizers``' DecodeStream (what vLLM itself detokenizes fast tokenizers with)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    stream = DecodeStream(skip_special_tokens=True)
    for token_id in prompt_tail:
        stream.step(backend, token_id)
    return [stream.step(backend, token_id) or "" for token_id in token_ids]


def _decode_window_pieces(tokenizer, token_ids: Sequence[int], prompt_tail: Sequence[int]) -> list[str]:
    """Per-token text by decoding a short sliding window (vLLM's slow incremental detokenizer).

    A token that ends inside a multi-byte character decodes to U+FFFD; its piece is empty and
    the character goes to the token that completes it.
    """
    ids = [*prompt_tail, *token_ids]
    prefix_offset, read_offset = 0, len(prompt_tail)
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
    pieces: list[str] = []
    for end in range(len(prompt_tail) + 1, len(ids) + 1):
        new_text = tokenizer.decode(ids[prefix_offset:end], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            pieces.append(new_text[len(prefix_text):])
            prefix_offset, read_offset = read_offset, end
            prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
        else:
            pieces.append("")
    return pieces


def token_pieces(tokenizer, token_ids: Sequence[int], prompt_tail: Sequence[int] = ()) -> list[str] | None:
    """Each token's share of the decoded text (special tokens: ""), or None if it cannot be decoded."""
    try:
        pieces = _decode_stream_pieces(tokenizer, token_ids, prompt_tail)
        return pieces if pieces is not None else _decode_window_pieces(tokenizer, token_ids, prompt_tail)
    except Exception:  # noqa: BLE001 - token_bytes is optional; a tokenizer that cannot stream has none
        return None


def to_generation(completion, tokenizer, prompt_ids: Sequence[int] = ()) -> Generation:
    """A ``Generation`` from a vLLM ``CompletionOutput``.

    ``num_tokens`` counts every generated token, the end-of-sequence token included (as the
    llama.cpp backend does); ``token_bytes`` leaves that token out, since it is not in the text.
    ``token_bytes`` is None unless the per-token pieces reproduce ``text``: exactly, or, when a
    stop string cut the text, as a prefix (the tokens that spelled the stop string are kept, as
    in the llama.cpp backend).
    """
    finish_reason = completion.finish_reason
    if finish_reason not in ("stop", "length"):
        raise UnfinishedSampleError(f"vLLM ended the sample with finish_reason={finish_reason!r}")
    token_ids = list(completion.token_ids)
    logprobs = None
    if completion.logprobs is not None:
        if len(completion.logprobs) != len(token_ids):
            raise ValueError(f"vLLM returned {len(completion.logprobs)} logprob positions for {len(token_ids)} tokens")
        logprobs = tuple(float(position[token].logprob) for position, token in zip(completion.logprobs, token_ids))
    return Generation(
        text=completion.text,
        num_tokens=len(token_ids),
        finish_reason=finish_reason,
        logprobs=logprobs,
        token_bytes=_token_bytes(completion, token_ids, tokenizer, prompt_ids),
    )


def _token_bytes(completion, token_ids: list[int], tokenizer, prompt_ids: Sequence[int]) -> tuple[int, ...] | None:
    pieces = token_pieces(tokenizer, token_ids, prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
    if pieces is None:
        return None
    cut_by_stop_string = isinstance(getattr(completion, "stop_reason", None), str)
    if completion.finish_reason == "stop" and not cut_by_stop_string and pieces and pieces[-1] == "":
        pieces = pieces[:-1]  # the end-of-sequence (or stop) token
    decoded = "".join(pieces)
    text = completion.text
    if decoded == text or (cut_by_stop_string and decoded.startswith(text)):
        return tuple(len(piece.encode("utf-8")) for piece in pieces)
    return None


# -- the backend ----------------------------------------------------------------------------


def _engine_max_model_len(engine) -> int | None:
    try:
        return int(engine.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        return None


def vllm_model_id(model: str, revision: str = "") -> str:
    """Keys caches and shards: a Hugging Face id means different weights over time unless pinned."""
    return f"vllm:{model}" + (f"@{revision}" if revision else "")


class VLLMBackend:
    """A vLLM ``LLM`` and the thread that feeds it batches.

    ``model`` is a local path or a Hugging Face id and becomes ``model_id`` (``vllm:<model>``),
    which keys the generation cache: pass a path to a fixed snapshot (or an id whose weights
    will not change), else new weights would replay old samples.

    ``engine`` replaces ``vllm.LLM`` with an object of the same surface (``generate``,
    ``get_tokenizer``); it is for tests of the mapping. vLLM is then not imported, and the
    engine receives each request's ``SamplingParams`` keyword arguments as a plain dict
    (the JSON constraint as ``structured_outputs={"json": schema}``).
    """

    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_in_flight: int = 4096,
        batch_window_seconds: float = 0.05,
        max_batch: int = 4096,
        model_revision: str = "",
        engine=None,
    ):
        if max_batch < 1 or batch_window_seconds < 0:
            raise ValueError("max_batch must be at least 1 and batch_window_seconds not negative")
        self._sampling_params: Callable[..., Any]
        self._json_constraint: JsonConstraint | None
        if engine is None:
            vllm = _import_vllm()
            engine = vllm.LLM(
                model=model, seed=seed, enable_prefix_caching=True, tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                **({"revision": model_revision} if model_revision else {}),
            )
            self._sampling_params, self._json_constraint = vllm.SamplingParams, vllm_json_constraint()
        else:
            self._sampling_params, self._json_constraint = dict, ("structured_outputs", dict)
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.model_id = vllm_model_id(model, model_revision)
        self.max_in_flight = max_in_flight
        self.supports_json_schema = self._json_constraint is not None
        self.consecutive_seeds = True
        # Prompts that do not leave room for max_tokens are refused, not silently shortened.
        self.max_model_len = _engine_max_model_len(engine) or max_model_len
        self.batch_window_seconds = batch_window_seconds
        self.max_batch = max_batch
        self._queue: list[QueuedSample] = []
        self._wake = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run_worker, name=f"vllm-{self.model_id}", daemon=True)
        self._worker.start()

    # -- the Backend interface -----------------------------------------------------------
    def render(self, request: GenerationRequest) -> str:
        return render_prompt(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def generate(self, request: GenerationRequest, seed: int) -> Generation:
        loop = asyncio.get_running_loop()
        sample = QueuedSample(request, seed, self.render(request), loop.create_future(), loop)
        with self._wake:
            if self._closed:
                raise RuntimeError("backend is closed")
            self._queue.append(sample)
            self._wake.notify()
        return await sample.future

    def close(self) -> None:
        """Stop taking batches; samples still queued fail. A batch already in vLLM finishes first."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._worker.join(timeout=60)

    # -- the worker ----------------------------------------------------------------------
    def _run_worker(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - a dead worker would leave every later caller waiting
                for sample in batch:
                    _post(sample, _fail, sample.future, exc)

    def _take_batch(self) -> list[QueuedSample] | None:
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            # The samples of one labelling step are awaited over a few event-loop ticks; waiting
            # a moment lets them, and their prefix-sharing siblings, join this engine call.
            self._wake.wait_for(
                lambda: self._closed or len(self._queue) >= self.max_batch, timeout=self.batch_window_seconds
            )
            if self._closed:
                pending, self._queue = self._queue, []
                for sample in pending:
                    _post(sample, _fail, sample.future, RuntimeError("backend closed"))
                return None
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        return batch

    def _prompt_token_ids(self, entry: BatchEntry) -> list[int]:
        # The chat template wrote any BOS itself; a raw prompt gets the tokenizer's, as vLLM would add.
        ids = self.tokenizer.encode(entry.prompt, add_special_tokens=entry.request.prompt is not None)
        if self.max_model_len is not None and len(ids) + entry.request.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens plus max_tokens {entry.request.max_tokens} "
                f"does not fit the {self.max_model_len}-token context"
            )
        return ids

    def _run_batch(self, batch: list[QueuedSample]) -> None:
        entries, prompts, params = [], [], []
        for entry in group_samples(sample for sample in batch if not sample.future.cancelled()):
            # A bad request (prompt too long, unusable schema) fails alone, not the whole batch.
            try:
                prompt_ids = self._prompt_token_ids(entry)
                entry_params = self._sampling_params(
                    **sampling_kwargs(entry.request, entry.n, entry.first_seed, self._json_constraint)
                )
            except Exception as exc:  # noqa: BLE001 - delivered to that entry's callers as their error
                _fail_entry(entry, exc)
                continue
            entries.append((entry, prompt_ids))
            prompts.append({"prompt_token_ids": prompt_ids})
            params.append(entry_params)
        if not entries:
            return
        try:
            outputs = list(self.engine.generate(prompts, params, use_tqdm=False))
            if len(outputs) != len(entries):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(entries)} prompts")
        except Exception as exc:  # noqa: BLE001 - delivered to every awaiting coroutine, which makes it a reject
            for entry, _ in entries:
                _fail_entry(entry, exc)
            return
        for (entry, prompt_ids), output in zip(entries, outputs):
            by_index = {completion.index: completion for completion in output.outputs}
            for j, sample in enumerate(entry.samples):
                if (completion := by_index.get(j)) is None:
                    _post(sample, _fail, sample.future, RuntimeError(f"vLLM returned no output {j} of n={entry.n}"))
                else:
                    # Converted on the caller's loop, so the worker can start the next batch at once.
                    _post(sample, _resolve, sample.future, completion, self.tokenizer, prompt_ids)


def _post(sample: QueuedSample, callback, *args) -> None:
    try:
        sample.loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the caller's event loop has closed: nobody is waiting for this sample
        pass


def _fail_entry(entry: BatchEntry, exc: BaseException) -> None:
    for sample in entry.samples:
        _post(sample, _fail, sample.future, exc)


def _resolve(future: asyncio.Future, completion, tokenizer, prompt_ids: Sequence[int]) -> None:
    if future.done():  # cancelled by its caller
        return
    try:
        generation = to_generation(completion, tokenizer, prompt_ids)
    except Exception as exc:  # noqa: BLE001 - the awaiting coroutine makes it a reject
        future.set_exception(exc)
    else:
        future.set_result(generation)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():  # cancelled, or already answered before the worker failed
        future.set_exception(exc)
