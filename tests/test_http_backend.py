"""The OpenAI-compatible HTTP backend against a real server (llama.cpp's, with SmolLM2), directly and
through the fault-injection proxy; and its request/response mapping for the other servers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import LLAMA_KEY_ENV as KEY_ENV
from conftest import LLAMA_SERVER_KEY
from fault_accounting import assert_retries_accounted_for
from stepforge.stages.llm import GenerationClient, GenerationError, GenerationRequest
from stepforge.stages.instruments.fault_proxy import FaultConfig, running_proxy
from stepforge.stages.llm.openai_http import (
    HttpConfig, OpenAIBackend, _RateLimiter, _Retry, parse_response, request_body,
)

PROBLEM = (("user", "Tom has 3 apples and buys 4 more. How many apples does he have?"),)


@pytest.fixture
def key_in_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, LLAMA_SERVER_KEY)


def backend(server, base_url: str | None = None, max_in_flight: int = 8, **http) -> OpenAIBackend:
    config = HttpConfig(
        base_url=base_url or server.base_url, server="llamacpp", tokenizer="smollm2-135m", api_key_env=KEY_ENV,
        **{"timeout_seconds": 120, "backoff_seconds": 0.05, "backoff_max_seconds": 0.2, **http},
    )
    return OpenAIBackend(server.model, config, max_in_flight=max_in_flight)


def continuation(n: int = 4, **fields) -> GenerationRequest:
    settings = {"max_tokens": 24, "temperature": 0.9, "stop": ("\n\n",), "seed": 5, **fields}
    return GenerationRequest(messages=PROBLEM, assistant_prefix="Step 1: Tom starts with 3 apples.\n", n=n, **settings)


def sample(b: OpenAIBackend, request: GenerationRequest, start: int = 0):
    return asyncio.run(GenerationClient(b).generate(request, start))


@pytest.mark.slow  # 16 samples through a server that evaluates prompts one token at a time
def test_seeded_samples_from_the_server_reproduce_and_carry_token_detail(llama_server, key_in_env):
    first, again = backend(llama_server), backend(llama_server)
    try:
        texts = [g.text for g in sample(first, continuation(logprobs=True))]
        assert [g.text for g in sample(again, continuation(logprobs=True))] == texts
        assert len(set(texts)) > 1  # distinct seeds per sample, not one sample four times
        for g in sample(first, continuation(n=2, logprobs=True)):
            assert 0 < g.num_tokens <= 24 and g.finish_reason in ("stop", "length")
            assert len(g.logprobs) == g.num_tokens and all(lp <= 0 for lp in g.logprobs)
            if g.token_bytes is not None:
                assert sum(g.token_bytes) == len(g.text.encode())
        # Samples 2 and 3 asked for on their own are the same samples: a resumed run asks like this.
        assert [g.text for g in sample(first, continuation(n=2, logprobs=True), start=2)] == texts[2:4]
        counts = first.counters()
        assert counts["http_requests"] == 4 + 2 + 2 and counts["retries"] == 0, counts
        assert counts["completion_tokens"] > 0 and counts["prompt_tokens"] > 0
        assert first.count_tokens("Tom has 7 apples.") == len(first.tokenizer._llama.tokenize(b"Tom has 7 apples.", add_bos=False))
    finally:
        first.close()
        again.close()


def test_a_wrong_key_fails_at_once_without_retries(llama_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    b = backend(llama_server)
    try:
        (result,) = asyncio.run(GenerationClient(b).generate_each(continuation(n=1)))
        assert isinstance(result, GenerationError) and "http_401" in str(result)
        assert b.counters()["http_requests"] == 1 and b.counters()["retries"] == 0
        assert "sk-wrong" not in str(result)
    finally:
        b.close()


def test_requests_in_flight_are_bounded_by_the_backend(llama_server, key_in_env):
    b = backend(llama_server, max_in_flight=3)
    try:
        generations = sample(b, GenerationRequest(messages=PROBLEM, n=9, max_tokens=4))
        assert len(generations) == 9
        assert b.stats.max_in_flight_seen == 3
        assert b.stats.mean_in_flight > 1
    finally:
        b.close()


def test_json_schema_is_enforced_by_the_server_grammar(llama_server, key_in_env):
    schema = json.dumps({"type": "object", "properties": {"verdict": {"enum": ["correct", "incorrect"]}}, "required": ["verdict"]})
    b = backend(llama_server)
    try:
        (g,) = sample(b, GenerationRequest(messages=(("user", "Is 3 + 4 = 7? Answer in JSON."),), max_tokens=40, json_schema=schema))
        assert json.loads(g.text)["verdict"] in ("correct", "incorrect")
    finally:
        b.close()


def test_cost_is_priced_from_the_server_usage(llama_server, key_in_env):
    b = backend(llama_server, usd_per_million_prompt_tokens=2.0, usd_per_million_completion_tokens=10.0)
    try:
        sample(b, continuation(n=2))
        c = b.counters()
        assert c["cost_usd"] == pytest.approx((c["prompt_tokens"] * 2 + c["completion_tokens"] * 10) / 1e6)
    finally:
        b.close()


# -- through the fault-injection proxy -------------------------------------------------------
@pytest.mark.slow  # hangs are waited out to the client's timeout
def test_every_fault_kind_is_retried_to_the_clean_answer(llama_server, key_in_env):
    clean = backend(llama_server)
    try:
        expected = [g.text for g in sample(clean, continuation(n=6))]
    finally:
        clean.close()
    faults = FaultConfig(rate=0.6, seed=3, hang_seconds=6, retry_after_seconds=0.2, max_faults_per_request=3)
    with running_proxy(llama_server.base_url.removesuffix("/v1"), faults) as proxy:
        # One request at a time, so the short timeout that catches hangs never catches a queued request.
        flaky = backend(
            llama_server, base_url=proxy.base_url + "/v1", timeout_seconds=4, max_retries=4, max_in_flight=1
        )
        try:
            assert [g.text for g in sample(flaky, continuation(n=6))] == expected
            counts = flaky.counters()
        finally:
            flaky.close()
        injected = dict(proxy.counts)
    assert sum(n for kind, n in injected.items() if kind != "forwarded") > 0, injected
    # Each kind the proxy injected shows up under the reason the client saw, and a retry beyond them
    # is a slow answer timed out on a busy machine.
    assert_retries_accounted_for(injected, counts)


def test_a_sample_the_server_keeps_failing_is_given_up_with_its_reason(llama_server, key_in_env):
    faults = FaultConfig(rate=1.0, kinds=("http_503",), max_faults_per_request=10)
    with running_proxy(llama_server.base_url.removesuffix("/v1"), faults) as proxy:
        flaky = backend(llama_server, base_url=proxy.base_url + "/v1", max_retries=2)
        try:
            (result,) = asyncio.run(GenerationClient(flaky).generate_each(continuation(n=1)))
            counts = flaky.counters()
        finally:
            flaky.close()
    assert isinstance(result, GenerationError) and "gave up after 3 attempts" in str(result) and "http_503" in str(result)
    assert counts["retries.http_503"] == 2 and counts["gave_up.http_503"] == 1 and counts["http_requests"] == 3


def test_retry_after_is_waited_for(llama_server, key_in_env):
    faults = FaultConfig(rate=1.0, kinds=("http_429",), retry_after_seconds=1.0, max_faults_per_request=1)
    with running_proxy(llama_server.base_url.removesuffix("/v1"), faults) as proxy:
        flaky = backend(llama_server, base_url=proxy.base_url + "/v1")
        try:
            started = time.monotonic()
            sample(flaky, continuation(n=1, max_tokens=2))
            waited = time.monotonic() - started
            assert flaky.counters()["retries.http_429"] == 1
        finally:
            flaky.close()
    assert waited >= 1.0  # the jittered backoff alone is at most 0.05 s here


# -- mapping for every server, without one -----------------------------------------------------
def test_each_server_continues_a_partial_answer_its_own_way():
    request = continuation(n=1, json_schema='{"type": "object"}')
    path, body = request_body(request, 11, "m", HttpConfig(server="vllm"), None)
    assert path == "/chat/completions"
    assert body["messages"][-1] == {"role": "assistant", "content": request.assistant_prefix}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["seed"] == 11 and body["n"] == 1 and body["stop"] == ["\n\n"]
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    with pytest.raises(GenerationError, match="cannot continue a partial assistant turn"):
        request_body(request, 11, "m", HttpConfig(server="openai"), None)
    with pytest.raises(GenerationError, match="tokenizer"):
        request_body(request, 11, "m", HttpConfig(server="tgi"), None)
    # A question without a prefix is a plain chat everywhere, and llama.cpp's own sampler tweaks are off.
    path, body = request_body(GenerationRequest(messages=PROBLEM), 1, "m", HttpConfig(server="llamacpp"), None)
    assert path == "/chat/completions" and "continue_final_message" not in body
    assert (body["top_k"], body["min_p"], body["repeat_penalty"]) == (0, 0.0, 1.0)
    path, body = request_body(GenerationRequest(prompt="2 + 2 ="), 1, "m", HttpConfig(server="openai", extra_body={"user": "x"}), None)
    assert path == "/completions" and body["prompt"] == "2 + 2 =" and body["user"] == "x"


@pytest.mark.parametrize(
    "payload", [{}, {"choices": []}, {"choices": [{"message": {}}]}, {"choices": [{"text": 5}]}, [1, 2]],
)
def test_a_response_without_the_protocol_shape_is_retried(payload):
    path = "/completions" if payload and isinstance(payload, dict) and payload.get("choices") and "text" in payload["choices"][0] else "/chat/completions"
    with pytest.raises(_Retry) as caught:
        parse_response(path, payload, GenerationRequest(messages=PROBLEM))
    assert caught.value.reason == "bad_response"


def test_chat_logprobs_give_token_bytes_that_add_up():
    payload = {"choices": [{"message": {"content": "7 apples"}, "finish_reason": "stop", "logprobs": {"content": [
        {"token": "7", "logprob": -0.1, "bytes": [55]}, {"token": " apples", "logprob": -0.2, "bytes": list(b" apples")},
    ]}}], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    generation, usage = parse_response("/chat/completions", payload, GenerationRequest(messages=PROBLEM, logprobs=True))
    assert generation.token_bytes == (1, 7) and generation.logprobs == (-0.1, -0.2) and generation.num_tokens == 2
    assert usage == {"prompt_tokens": 9, "completion_tokens": 2}


def test_the_rate_limiter_spaces_requests_beyond_its_budget():
    async def scenario() -> float:
        limiter = _RateLimiter(per_minute=60)  # one per second once the minute's budget is spent
        await limiter.acquire(59)
        started = time.monotonic()
        await limiter.acquire(2)
        return time.monotonic() - started

    assert asyncio.run(scenario()) >= 0.9


def test_calls_cross_to_the_backend_loop_and_back_with_their_context_and_cancellation():
    import contextvars
    import threading

    from stepforge.stages.llm.openai_http import _LoopBridge

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    bridge, var, cancelled = _LoopBridge(loop), contextvars.ContextVar("caller", default=None), []

    async def job(x, delay=0.0):
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        if x == "boom":
            raise ValueError("boom")
        return x, var.get(), asyncio.get_running_loop() is loop

    async def caller(i):
        var.set(i)
        return await bridge.call(job(i, 0.001))

    async def scenario():
        assert await asyncio.gather(*(caller(i) for i in range(500))) == [(i, i, True) for i in range(500)]
        with pytest.raises(ValueError, match="boom"):
            await bridge.call(job("boom"))
        with pytest.raises(asyncio.TimeoutError):  # a caller that gives up cancels the call it made
            await asyncio.wait_for(bridge.call(job("slow", 30)), 0.05)
        await asyncio.sleep(0.1)

    try:
        asyncio.run(scenario())
        assert cancelled == ["slow"] and bridge._outboxes == {} and bridge._inbox == []
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
