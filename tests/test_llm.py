"""The generation seam on the real llama.cpp backend with SmolLM2."""

from __future__ import annotations

import asyncio
import math

import pytest

from stepforge.stages.llm import GenerationCache, GenerationClient, GenerationRequest


def generate(client: GenerationClient, request: GenerationRequest):
    return asyncio.run(client.generate(request))


def chat(text: str, **kw) -> GenerationRequest:
    return GenerationRequest(messages=(("user", text),), **kw)


def test_generation_has_text_token_count_and_finish_reason(smollm_backend):
    out = generate(GenerationClient(smollm_backend), chat("Tell me a story about a cat.", max_tokens=12))
    assert len(out) == 1
    assert out[0].text.strip()
    assert out[0].num_tokens == 12
    assert out[0].finish_reason == "length"


def test_seeded_samples_reproduce_and_differ_by_seed_and_index(smollm_backend):
    request = chat("Name a colour and explain why you like it.", n=3, max_tokens=24, temperature=1.0, seed=7)
    first = generate(GenerationClient(smollm_backend), request)
    again = generate(GenerationClient(smollm_backend), request)
    assert [g.text for g in first] == [g.text for g in again]
    assert len({g.text for g in first}) > 1, "samples of one request must be independent, not copies"
    other_seed = generate(GenerationClient(smollm_backend), chat(
        "Name a colour and explain why you like it.", n=3, max_tokens=24, temperature=1.0, seed=8))
    assert [g.text for g in other_seed] != [g.text for g in first]


def test_output_does_not_depend_on_what_ran_before(smollm_backend):
    """KV-cache reuse between prompts must not change results: resume relies on it."""
    a = chat("List three fruits.", n=2, max_tokens=20, temperature=0.9, seed=3)
    b = chat("List three fruits and three vegetables.", n=2, max_tokens=20, temperature=0.9, seed=3)
    client = GenerationClient(smollm_backend)
    a_first, b_second = generate(client, a), generate(client, b)
    b_first, a_second = generate(client, b), generate(client, a)
    assert [g.text for g in a_first] == [g.text for g in a_second]
    assert [g.text for g in b_first] == [g.text for g in b_second]


def test_stop_sequence_ends_generation_before_the_stop_text(smollm_backend):
    request = GenerationRequest(
        messages=(("user", "Write the numbers from 1 to 10."),), assistant_prefix="1, 2, 3, 4,",
        max_tokens=30, temperature=0.0, stop=(" 8",),
    )
    out = generate(GenerationClient(smollm_backend), request)[0]
    assert out.finish_reason == "stop"
    assert out.text == " 5, 6, 7,"


def test_assistant_prefix_is_a_true_continuation(smollm_backend):
    request = GenerationRequest(
        messages=(("user", "Write the numbers from 1 to 10."),), assistant_prefix="1, 2, 3, 4,",
        max_tokens=6, temperature=0.0, logprobs=True,
    )
    rendered = smollm_backend.render(request)
    # The assistant turn is opened by the chat template and left open after the prefix.
    assert rendered.endswith("<|im_start|>assistant\n1, 2, 3, 4,")
    out = generate(GenerationClient(smollm_backend), request)[0]
    assert out.text.startswith(" 5")
    assert out.logprobs[0] > math.log(0.5), "continuing a count, ' 5' should be the likely next token"


def test_logprobs_are_per_generated_token(smollm_backend):
    out = generate(GenerationClient(smollm_backend), chat("Say hello.", max_tokens=10, temperature=0.7, logprobs=True))[0]
    assert len(out.logprobs) == out.num_tokens
    assert all(lp <= 0.0 for lp in out.logprobs)
    no_lp = generate(GenerationClient(smollm_backend), chat("Say hello.", max_tokens=10, temperature=0.7))[0]
    assert no_lp.logprobs is None


def test_cache_replays_and_shares_samples_across_n(smollm_backend, tmp_path):
    cache = GenerationCache(tmp_path / "gen.sqlite")
    client = GenerationClient(smollm_backend, cache)
    two = generate(client, chat("Pick a number.", n=2, max_tokens=8, temperature=1.0))
    assert client.stats.generated == 2 and client.stats.cache_hits == 0
    four = generate(client, chat("Pick a number.", n=4, max_tokens=8, temperature=1.0))
    assert client.stats.generated == 4 and client.stats.cache_hits == 2
    assert [g.text for g in four[:2]] == [g.text for g in two]
    assert all(g.cached for g in four[:2]) and not any(g.cached for g in four[2:])
    # A new process (new cache object) replays everything without touching the engine.
    replay = GenerationClient(smollm_backend, GenerationCache(tmp_path / "gen.sqlite"))
    assert [g.text for g in generate(replay, chat("Pick a number.", n=4, max_tokens=8, temperature=1.0))] == [
        g.text for g in four
    ]
    assert replay.stats.generated == 0 and replay.stats.cache_hits == 4


def test_prompt_longer_than_context_is_a_generation_error(smollm_backend):
    from stepforge.stages.llm import GenerationError

    client = GenerationClient(smollm_backend)
    with pytest.raises(GenerationError, match="does not fit"):
        generate(client, chat("word " * 5000, max_tokens=4))
    assert client.stats.failures == 1


def test_requests_are_batched_across_callers(smollm_backend):
    """Many awaiting callers keep many samples in flight at once."""
    client = GenerationClient(smollm_backend, max_in_flight=8)

    async def many():
        return await asyncio.gather(*(client.generate(chat(f"Count to {i}.", max_tokens=4)) for i in range(12)))

    asyncio.run(many())
    assert client.stats.max_in_flight_seen == 8
    assert client.stats.mean_in_flight > 4


def test_request_validation():
    with pytest.raises(ValueError):
        GenerationRequest(prompt="x", messages=(("user", "x"),))
    with pytest.raises(ValueError):
        GenerationRequest(prompt="x", assistant_prefix="y")
    key = chat("a", n=1).sample_key("m", 0)
    assert key == chat("a", n=8).sample_key("m", 0), "n must not change a sample's identity"
    assert key != chat("a").sample_key("m", 1) != chat("a").sample_key("other-model", 0)


def test_step_token_counts_come_from_the_generated_tokens(smollm_backend):
    from stepforge.stages.rollout.answers import AnswerChecker
    from stepforge.stages.rollout.split import SplitConfig
    from stepforge.stages.tree import PathPrefix, TreeBuilder

    out = generate(GenerationClient(smollm_backend), chat("List five animals, one per line.", max_tokens=40, seed=2))[0]
    assert sum(out.token_bytes) == len(out.text.encode("utf-8"))
    assert out.tokens_in(0, len(out.text.encode())) == len(out.token_bytes) <= out.num_tokens
    with AnswerChecker() as checker:
        builder = TreeBuilder(SplitConfig(mode="newline"), checker, smollm_backend.count_tokens, "m")
        _, nodes, _ = builder.from_generation("t", "p", "1", PathPrefix(), out, "policy", 0)
    assert len(nodes) > 1
    for node in nodes:  # generated tokens vs re-tokenizing the stripped step: equal up to boundary whitespace
        assert abs(node.num_tokens - smollm_backend.count_tokens(node.text)) <= 2
