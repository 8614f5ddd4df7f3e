"""The vLLM backend's mapping (requests -> vLLM requests -> generations) and its batching worker.

vLLM needs CUDA, so these tests drive ``VLLMBackend`` through an injected stand-in engine
(``FakeVLLMEngine``) returning stand-ins for vLLM's output types (``FakeCompletionOutput``,
``FakeRequestOutput``, ``FakeLogprob``). They check what *this* module does with vLLM's API,
not vLLM; ``test_real_vllm_engine`` runs the real engine where it is installed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from dataclasses import dataclass, field

import pytest

from stepforge.stages.llm import GenerationClient, GenerationError, GenerationRequest
from stepforge.stages.llm.vllm_backend import (
    QueuedSample,
    UnfinishedSampleError,
    VLLMBackend,
    group_samples,
    render_prompt,
    sampling_kwargs,
    to_generation,
    token_pieces,
)

# -- stand-ins -------------------------------------------------------------------------------

EOS = 256
BOS = 257


class ByteTokenizer:
    """A stand-in for an HF tokenizer: one token per UTF-8 byte, plus EOS and BOS specials."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        data = bytearray()
        for token in ids:
            if token < 256:
                data.append(token)
            elif not skip_special_tokens:
                data += b"<eos>" if token == EOS else b"<bos>"
        return data.decode("utf-8", errors="replace")


@dataclass
class FakeLogprob:
    """Stand-in for vllm.sequence.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletionOutput:
    """Stand-in for vllm.outputs.CompletionOutput."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, FakeLogprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class FakeRequestOutput:
    """Stand-in for vllm.outputs.RequestOutput."""

    prompt_token_ids: list[int]
    outputs: list[FakeCompletionOutput]


@dataclass
class FakeVLLMEngine:
    """Stand-in for vllm.LLM: records each generate() call and answers every sample with its seed.

    Sample j of a request seeded s has text "seed=<s+j>", so a test can tell which seed a
    returned generation came from. Outputs are listed in reverse index order to check that
    the backend maps them by ``CompletionOutput.index``. A prompt containing "explode" makes
    the whole call raise, as vLLM does for a bad request.
    """

    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)
    calls: list[tuple[list[dict], list[dict]]] = field(default_factory=list)

    def get_tokenizer(self) -> ByteTokenizer:
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert use_tqdm is False
        self.calls.append((prompts, sampling_params))
        results = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            if "explode" in self.tokenizer.decode(prompt["prompt_token_ids"]):
                raise ValueError("engine exploded")
            outputs = []
            for j in range(params["n"]):
                text = f"seed={params['seed'] + j}"
                token_ids = [*text.encode(), EOS]
                logprobs = None if params["logprobs"] is None else [{t: FakeLogprob(-0.25)} for t in token_ids]
                outputs.append(FakeCompletionOutput(j, text, token_ids, -0.25 * len(token_ids), logprobs, "stop"))
            results.append(FakeRequestOutput(prompt["prompt_token_ids"], outputs[::-1]))
        return results

    def prompt_texts(self, call: int) -> list[str]:
        return [self.tokenizer.decode(p["prompt_token_ids"]) for p in self.calls[call][0]]


def chat(question: str, prefix: str = "", **kwargs) -> GenerationRequest:
    return GenerationRequest(messages=(("user", question),), assistant_prefix=prefix, **kwargs)


def sample(request: GenerationRequest, seed: int) -> QueuedSample:
    return QueuedSample(request, seed, render_prompt(ByteTokenizer(), request))


def completion(text: str, token_ids: list[int], finish_reason="stop", stop_reason=None, logprobs=None):
    return FakeCompletionOutput(0, text, token_ids, None, logprobs, finish_reason, stop_reason)


@pytest.fixture
def engine():
    return FakeVLLMEngine()


@pytest.fixture
def backend(engine):
    # A long window makes "everything gathered at once is one engine call" deterministic.
    backend = VLLMBackend("org/tiny-model", engine=engine, batch_window_seconds=0.2)
    yield backend
    backend.close()


# -- pure mapping ----------------------------------------------------------------------------


def test_render_opens_the_assistant_turn_and_appends_the_prefix_verbatim():
    tokenizer = ByteTokenizer()
    rendered = render_prompt(tokenizer, chat("What is 2+2?", prefix="Step 1: 2+2"))
    assert rendered == "<|user|>What is 2+2?\n<|assistant|>Step 1: 2+2"
    assert render_prompt(tokenizer, GenerationRequest(prompt="Q: 1+1\nA:")) == "Q: 1+1\nA:"


def test_grouping_merges_consecutive_seeds_of_one_request_and_sorts_by_prompt():
    b, a = chat("b"), chat("a")
    hotter = chat("a", temperature=1.0)  # same prompt, other sampling: a separate vLLM request
    queued = [sample(b, 5), sample(a, 11), sample(a, 10), sample(hotter, 3), sample(a, 13), sample(a, 12),
              sample(a, 20), sample(dataclasses.replace(b, n=4), 6)]
    entries = group_samples(queued)
    summary = [(e.prompt[len("<|user|>")], e.request.temperature, e.first_seed, [s.seed for s in e.samples])
               for e in entries]
    assert summary == [
        ("a", 0.7, 10, [10, 11, 12, 13]),
        ("a", 0.7, 20, [20]),
        ("a", 1.0, 3, [3]),
        ("b", 0.7, 5, [5, 6]),  # n differs between the client calls; the samples are still one run
    ]
    assert [e.n for e in entries] == [4, 1, 1, 2]


def test_a_seed_queued_twice_is_generated_twice():
    a = chat("a")
    entries = group_samples([sample(a, 1), sample(a, 1), sample(a, 2)])
    assert [[s.seed for s in e.samples] for e in entries] == [[1], [1, 2]]


def test_sampling_kwargs():
    request = chat("q", temperature=0.5, top_p=0.9, max_tokens=64, stop=("\n\n", "Step"), logprobs=True)
    assert sampling_kwargs(request, 4, 1234) == {
        "n": 4, "temperature": 0.5, "top_p": 0.9, "max_tokens": 64, "stop": ["\n\n", "Step"], "seed": 1234,
        "logprobs": 0,
    }
    assert sampling_kwargs(chat("q"), 1, 7)["logprobs"] is None


def test_json_schema_becomes_the_structured_output_parameter():
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    request = chat("q", json_schema=json.dumps(schema, sort_keys=True))

    @dataclass
    class FakeStructuredOutputsParams:  # stand-in for vllm.sampling_params.StructuredOutputsParams
        json: dict

    kwargs = sampling_kwargs(request, 2, 9, ("structured_outputs", FakeStructuredOutputsParams))
    assert kwargs["structured_outputs"] == FakeStructuredOutputsParams(json=schema)
    assert sampling_kwargs(request, 2, 9, ("guided_decoding", dict))["guided_decoding"] == {"json": schema}
    with pytest.raises(ValueError, match="JSON schema"):
        sampling_kwargs(request, 2, 9, None)


def test_generation_from_a_completion_ended_by_eos():
    tokenizer = ByteTokenizer()
    ids = [*b"x = 3", EOS]
    logprobs = [{t: FakeLogprob(-0.1 * i), 999: FakeLogprob(-9.0)} for i, t in enumerate(ids)]
    generation = to_generation(completion("x = 3", ids, logprobs=logprobs), tokenizer)
    assert generation.text == "x = 3"
    assert generation.num_tokens == 6  # EOS counted, as llama.cpp counts it
    assert generation.finish_reason == "stop"
    assert generation.logprobs == pytest.approx((0.0, -0.1, -0.2, -0.3, -0.4, -0.5))
    assert generation.token_bytes == (1, 1, 1, 1, 1)  # EOS is not in the text
    assert generation.tokens_in(0, 2) == 2


def test_token_bytes_give_a_split_character_to_the_token_that_completes_it():
    tokenizer = ByteTokenizer()
    ids = [*"é!".encode()]
    generation = to_generation(completion("é!", ids, finish_reason="length"), tokenizer)
    assert generation.finish_reason == "length"
    assert generation.logprobs is None
    assert generation.token_bytes == (0, 2, 1)
    assert sum(generation.token_bytes) == len("é!".encode())


def test_token_bytes_cover_the_stop_string_when_it_cut_the_text():
    tokenizer = ByteTokenizer()
    ids = [*b"x = 3\n\n"]
    generation = to_generation(completion("x = 3", ids, stop_reason="\n\n"), tokenizer)
    assert generation.text == "x = 3"
    assert generation.token_bytes == (1,) * 7  # as llama.cpp: the tokens spelling the stop string stay
    assert generation.tokens_in(0, len(b"x = 3")) == 5


def test_token_bytes_are_none_when_they_do_not_reproduce_the_text():
    generation = to_generation(completion("something else", [*b"x = 3", EOS]), ByteTokenizer())
    assert generation.token_bytes is None
    assert generation.num_tokens == 6


def test_an_aborted_sample_is_an_error():
    with pytest.raises(UnfinishedSampleError, match="abort"):
        to_generation(completion("x", [*b"x"], finish_reason="abort"), ByteTokenizer())


def test_token_pieces_with_a_fast_tokenizer_match_its_decoding():
    """Real HF fast tokenizer (a byte-level BPE trained here): DecodeStream and window paths agree."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    inner.train_from_iterator(["Step 1: 2x + 1 = 7, so x = 3."] * 20, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>")
    prompt_ids = tokenizer.encode("Solve 2x + 1 = 7.", add_special_tokens=False)
    text = " Step 1: x = 3 (é, 你好)."
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]

    streamed = token_pieces(tokenizer, ids, prompt_ids)
    windowed = token_pieces(_SlowOnly(tokenizer), ids, prompt_ids)
    assert "".join(streamed) == "".join(windowed) == text
    assert [len(p.encode()) for p in streamed] == [len(p.encode()) for p in windowed]
    generation = to_generation(completion(text, ids), tokenizer, prompt_ids)
    assert generation.token_bytes is not None and len(generation.token_bytes) == len(ids) - 1
    assert sum(generation.token_bytes) == len(text.encode())


class _SlowOnly:
    """Hides ``backend_tokenizer`` so ``token_pieces`` takes the decode-window path."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# -- the backend through GenerationClient -----------------------------------------------------


def test_backend_attributes(backend):
    assert backend.model_id == "vllm:org/tiny-model"
    assert backend.consecutive_seeds is True
    assert backend.supports_json_schema is True
    assert backend.max_in_flight == 4096
    assert backend.count_tokens("héllo") == 6


def test_samples_of_a_request_become_one_vllm_request_with_n(backend, engine):
    client = GenerationClient(backend)
    first = chat("Solve 2x+1=7.", prefix="Step 1: subtract 1.", n=4, logprobs=True)
    sibling = chat("Solve 2x+1=7.", prefix="Step 1: subtract 1.\nStep 2: divide by 2.", n=2)
    unrelated = chat("Add 3 and 4.", n=1)

    async def step():
        return await asyncio.gather(client.generate(first), client.generate(unrelated), client.generate(sibling))

    first_out, unrelated_out, sibling_out = asyncio.run(step())

    assert len(engine.calls) == 1
    prompts, params = engine.calls[0]
    base = first.consecutive_seed(backend.model_id, 0)
    assert [(p["n"], p["seed"]) for p in params] == [
        (1, unrelated.consecutive_seed(backend.model_id, 0)),
        (4, base),
        (2, sibling.consecutive_seed(backend.model_id, 0)),
    ]
    # Sorted by prompt: the two prefixes of one solution are adjacent, the prefix before its extension.
    texts = engine.prompt_texts(0)
    assert texts == sorted(texts)
    assert texts[1].endswith("Step 1: subtract 1.") and texts[2].startswith(texts[1])
    # Chat prompts are tokenized without special tokens: the template wrote what it needs.
    assert all(BOS not in p["prompt_token_ids"] for p in prompts)
    assert params[1]["logprobs"] == 0 and params[0]["logprobs"] is None

    # Each sample gets the output whose seed is its own, whatever order vLLM listed them in.
    assert [g.text for g in first_out] == [f"seed={base + i}" for i in range(4)]
    assert [g.text for g in sibling_out] == [f"seed={sibling.consecutive_seed(backend.model_id, i)}" for i in range(2)]
    assert unrelated_out[0].text == f"seed={unrelated.consecutive_seed(backend.model_id, 0)}"
    assert first_out[0].logprobs == pytest.approx((-0.25,) * first_out[0].num_tokens)
    assert first_out[0].token_bytes is not None and sum(first_out[0].token_bytes) == len(first_out[0].text)

    # More samples of the same request later continue the seeds: 4..7 are base+4 .. base+7.
    more = asyncio.run(client.generate(first, start=4))
    assert [(p["n"], p["seed"]) for p in engine.calls[1][1]] == [(4, base + 4)]
    assert [g.text for g in more] == [f"seed={base + i}" for i in range(4, 8)]


def test_raw_prompts_are_tokenized_with_special_tokens(backend, engine):
    asyncio.run(GenerationClient(backend).generate(GenerationRequest(prompt="Q: 1+1\nA:")))
    assert engine.calls[0][0][0]["prompt_token_ids"][0] == BOS


def test_an_engine_error_fails_every_sample_of_the_batch(backend, engine):
    client = GenerationClient(backend)

    async def step():
        return await asyncio.gather(
            client.generate_each(chat("explode", n=3)), client.generate_each(chat("fine", n=1))
        )

    bad, good = asyncio.run(step())
    assert len(engine.calls) == 1
    for result in [*bad, *good]:
        assert isinstance(result, GenerationError) and "engine exploded" in str(result)
    assert client.stats.failures == 4


def test_a_malformed_engine_answer_fails_the_samples_instead_of_hanging(engine):
    class NoOutputsEngine(FakeVLLMEngine):
        def generate(self, prompts, sampling_params, use_tqdm=True):
            return [object() for _ in prompts]

    backend = VLLMBackend("org/tiny-model", engine=NoOutputsEngine(), batch_window_seconds=0.05)
    try:
        results = asyncio.run(GenerationClient(backend).generate_each(chat("q", n=2)))
        assert all(isinstance(r, GenerationError) and "AttributeError" in str(r) for r in results)
        # The worker survived: the next batch is served (and fails the same way) rather than hanging.
        assert isinstance(asyncio.run(GenerationClient(backend).generate_each(chat("r")))[0], GenerationError)
    finally:
        backend.close()


def test_a_prompt_that_does_not_fit_fails_alone(engine):
    backend = VLLMBackend("org/tiny-model", engine=engine, batch_window_seconds=0.2, max_model_len=64)
    client = GenerationClient(backend)
    try:
        async def step():
            return await asyncio.gather(
                client.generate_each(chat("x" * 40, max_tokens=32)), client.generate_each(chat("short", max_tokens=32))
            )

        (too_long,), (fine,) = asyncio.run(step())
    finally:
        backend.close()
    assert isinstance(too_long, GenerationError) and "does not fit the 64-token context" in str(too_long)
    assert fine.text.startswith("seed=")
    assert len(engine.calls[0][0]) == 1


def test_callers_on_several_threads_and_event_loops(backend, engine):
    client_by_thread = {}
    results = {}

    def caller(name: str):
        client_by_thread[name] = client = GenerationClient(backend)
        results[name] = asyncio.run(client.generate(chat(f"question {name}", n=3)))

    threads = [threading.Thread(target=caller, args=(name,)) for name in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for name in ("a", "b", "c"):
        request = chat(f"question {name}", n=3)
        assert [g.text for g in results[name]] == [
            f"seed={request.consecutive_seed(backend.model_id, i)}" for i in range(3)
        ]
    assert sum(len(call[0]) for call in engine.calls) == 3


def test_close_fails_queued_samples_and_refuses_new_ones(engine):
    backend = VLLMBackend("org/tiny-model", engine=engine, batch_window_seconds=30)

    async def step():
        pending = asyncio.ensure_future(backend.generate(chat("q"), 1))
        await asyncio.sleep(0.05)  # queued; the worker is inside its batching window
        backend.close()
        with pytest.raises(RuntimeError, match="backend closed"):
            await pending
        with pytest.raises(RuntimeError, match="backend is closed"):
            await backend.generate(chat("q"), 2)

    asyncio.run(step())
    assert engine.calls == []


# -- the real engine ---------------------------------------------------------------------------


def test_real_vllm_engine():
    """A tiny model on real vLLM: samples map back, and vLLM's n-expansion reproduces lone samples."""
    pytest.importorskip("vllm")
    model = os.environ.get("STEPFORGE_VLLM_TEST_MODEL")
    if not model:
        pytest.skip("set STEPFORGE_VLLM_TEST_MODEL to a small chat model (path or HF id) to run vLLM for real")
    backend = VLLMBackend(model, max_model_len=1024, gpu_memory_utilization=0.5, batch_window_seconds=0.1)
    try:
        request = chat("Count from 1 to 10.", prefix="1, 2,", n=3, temperature=1.0, max_tokens=8, logprobs=True)
        together = asyncio.run(GenerationClient(backend).generate(request))
        # Sample 1 alone (a fresh client: no cache) is vLLM's child 1 of the n=3 request above.
        # vLLM is not batch-invariant, so on rare occasions logits differ enough to flip a token.
        alone = asyncio.run(GenerationClient(backend).generate(dataclasses.replace(request, n=1), start=1))
    finally:
        backend.close()
    assert len(together) == 3
    for generation in together:
        assert 1 <= generation.num_tokens <= 8
        assert generation.finish_reason in ("stop", "length")
        assert generation.logprobs is not None and len(generation.logprobs) == generation.num_tokens
        if generation.token_bytes is not None:
            assert sum(generation.token_bytes) >= len(generation.text.encode())
    assert alone[0].text == together[1].text


def test_render_passes_a_tool_conversation_and_its_tools_to_the_template():
    """An HF template gets the tools and each call's arguments as the object it applies ``tojson`` to."""
    from stepforge.stages.llm import tool_chat

    seen = {}

    class ToolTemplate(ByteTokenizer):
        def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False):
            seen.update(messages=messages, tools=tools)
            return super().apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt)

    tools = [{"type": "function", "function": {"name": "python", "parameters": {"type": "object"}}}]
    conversation = [
        {"role": "user", "content": "6*7?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(6*7)"}'}}]},
        {"role": "tool", "tool_call_id": "c", "name": "python", "content": "42"},
    ]
    request = GenerationRequest(conversation=tool_chat.encode(conversation), tools=tool_chat.encode(tools))
    rendered = render_prompt(ToolTemplate(), request)
    assert rendered.endswith("<|tool|>42\n<|assistant|>") and seen["tools"] == tools
    assert seen["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"code": "print(6*7)"}
