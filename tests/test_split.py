"""Confidence-based step splitting (AdaptiveStep): hand-made token sequences, then the real model."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random

import pytest

from stepforge.schemas.ids import node_id
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.llm.base import Generation, GenerationRequest
from stepforge.stages.rollout.prompting import PromptConfig, SamplingConfig, build_request
from stepforge.stages.rollout.split import SplitConfig, join_prefix, split_by_confidence, split_steps
from stepforge.stages.tree import PathPrefix, TreeBuilder

SURE, UNSURE = math.log(0.95), math.log(0.3)


def tokens(*pairs: tuple[str, float]) -> tuple[str, tuple[int, ...], tuple[float, ...]]:
    """(text, token_bytes, logprobs) from (token text, logprob) pairs."""
    return (
        "".join(t for t, _ in pairs),
        tuple(len(t.encode("utf-8")) for t, _ in pairs),
        tuple(lp for _, lp in pairs),
    )


def confidence(**kw) -> SplitConfig:
    return SplitConfig(mode="confidence", **{"min_step_tokens": 1, **kw})


def token_starts(token_bytes) -> list[int]:
    starts, offset = [], 0
    for length in token_bytes:
        starts.append(offset)
        offset += length
    return starts


def step_starts(steps: list[str]) -> list[int]:
    """Byte offsets where steps 2.. begin."""
    return [len("".join(steps[:i]).encode("utf-8")) for i in range(1, len(steps))]


def test_a_step_starts_exactly_at_each_low_confidence_token():
    text, nbytes, lps = tokens(
        ("We", SURE), (" add", SURE), (" 2", SURE), (" and", SURE), (" 3", UNSURE),
        (" to", SURE), (" get", SURE), (" 5", UNSURE), (".", SURE),
    )
    steps = split_by_confidence(text, nbytes, lps, confidence())
    assert steps == ["We add 2 and", " 3 to get", " 5."]
    assert "".join(steps) == text


def test_the_threshold_is_strict_and_the_first_token_never_cuts():
    text, nbytes, lps = tokens(("A", UNSURE), (" b", math.log(0.5)), (" c", math.log(0.49)))
    assert split_by_confidence(text, nbytes, lps, confidence(confidence_threshold=0.5)) == ["A b", " c"]
    assert split_by_confidence(text, nbytes, lps, confidence(confidence_threshold=0.0)) == [text]


def test_min_step_tokens_skips_early_cuts_and_merges_a_short_tail():
    text, nbytes, lps = tokens(
        ("One", SURE), (" two", UNSURE), (" three", UNSURE), (" four", SURE), (" five", UNSURE),
        (" six", UNSURE), (" seven", SURE),
    )
    assert split_by_confidence(text, nbytes, lps, confidence()) == ["One", " two", " three four", " five", " six seven"]
    # " two" and " six" would each end a one-token step, so they do not cut.
    assert split_by_confidence(text, nbytes, lps, confidence(min_step_tokens=2)) == [
        "One two", " three four", " five six seven"
    ]
    assert split_by_confidence(text, nbytes, lps, confidence(min_step_tokens=3)) == [
        "One two three four", " five six seven"
    ]
    # With four, the cut at " five" would leave a three-token tail: it joins the step before.
    assert split_by_confidence(text, nbytes, lps, confidence(min_step_tokens=4)) == [text]


def test_cuts_fall_only_at_word_starts_or_line_breaks_and_never_inside_a_character():
    # Digits are separate tokens (as in SmolLM2): an unsure "4" inside "1,240" must not cut the number.
    # Byte-level tokens can also hold half a character: "é" arrives as two one-byte tokens.
    text = "Total = 1,240.\nSo café ok"
    nbytes = (5, 2, 2, 1, 1, 1, 1, 1, 1, 2, 4, 1, 1, 3)
    lps = (SURE, SURE, SURE, SURE, SURE, UNSURE, SURE, SURE, SURE, UNSURE, SURE, UNSURE, UNSURE, SURE)
    assert sum(nbytes) == len(text.encode("utf-8"))
    assert split_by_confidence(text, nbytes, lps, confidence()) == ["Total = 1,240.\n", "So café ok"]
    # Without the word rule the unsure digit and the unsure "é" token cut; the split UTF-8
    # character still does not (its second byte is not a character start).
    assert split_by_confidence(text, nbytes, lps, confidence(cut_at_word_start=False)) == [
        "Total = 1,2", "40.\n", "So caf", "é ok"
    ]


def test_a_whitespace_only_step_joins_its_neighbour():
    text, nbytes, lps = tokens(("Done.", SURE), ("\n\n", UNSURE), ("So", UNSURE), (" 5", SURE))
    assert split_by_confidence(text, nbytes, lps, confidence()) == ["Done.", "\n\nSo 5"]
    text, nbytes, lps = tokens(("Done.", SURE), ("\n", UNSURE))
    assert split_by_confidence(text, nbytes, lps, confidence()) == ["Done.\n"]
    text, nbytes, lps = tokens((" ", SURE), ("\n", UNSURE))
    assert split_by_confidence(text, nbytes, lps, confidence()) == []


def test_tokens_past_the_text_are_ignored_and_extra_logprobs_allowed():
    """A stop string cuts the text inside the tokens; an end token is scored but has no bytes."""
    _, nbytes, lps = tokens(("Step", SURE), (" one", SURE), (" two", UNSURE), (" STOP", UNSURE))
    text = "Step one two"
    assert split_by_confidence(text, nbytes, lps + (SURE,), confidence()) == ["Step one", " two"]
    with pytest.raises(ValueError, match="logprobs"):
        split_by_confidence(text, nbytes, lps[:2], confidence())


def test_random_sequences_concatenate_to_the_text_and_obey_every_rule():
    rng = random.Random(0)
    pieces = ["x", " y", "\n", "\n\n", " ", "7", "é", " =", "ü", "。", "\t"]
    for trial in range(300):
        config = confidence(
            confidence_threshold=rng.choice([0.2, 0.5, 0.8, 1.0]), min_step_tokens=rng.randint(1, 4),
            cut_at_word_start=rng.random() < 0.5, max_steps=rng.choice([2, 5, 40]),
        )
        pairs = [(rng.choice(pieces), math.log(rng.uniform(0.01, 1.0))) for _ in range(rng.randint(0, 30))]
        text, nbytes, lps = tokens(*pairs)
        steps = split_by_confidence(text, nbytes, lps, config)
        if not text.strip():
            assert steps == []
            continue
        assert "".join(steps) == text, trial
        assert all(s.strip() for s in steps) and len(steps) <= config.max_steps
        starts = token_starts(nbytes)
        encoded = text.encode("utf-8")
        first_tokens = [0]
        for cut in step_starts(steps):
            i = starts.index(cut)  # every boundary is a token start ...
            assert math.exp(lps[i]) < config.confidence_threshold  # ... of an unsure token
            if config.cut_at_word_start:
                assert encoded[cut:].decode("utf-8")[0].isspace() or encoded[cut - 1 : cut] == b"\n"
            first_tokens.append(i)
        sizes = [b - a for a, b in zip(first_tokens, first_tokens[1:] + [len(nbytes)])]
        if len(steps) > 1:
            assert min(sizes) >= config.min_step_tokens, (trial, sizes)


def test_split_steps_needs_logprobs_in_confidence_mode():
    text, nbytes, lps = tokens(("A", SURE), (" b", UNSURE))
    with pytest.raises(ValueError, match="logprobs"):
        split_steps(text, SplitConfig(mode="confidence"))
    with pytest.raises(ValueError, match="token_bytes"):
        split_steps(text, SplitConfig(mode="confidence"), logprobs=lps)
    config = confidence()
    assert split_steps(text, config, token_bytes=nbytes, logprobs=lps) == ["A", " b"]
    # Delimiter modes ignore the token arguments.
    assert split_steps("a\n\nb", SplitConfig(), token_bytes=nbytes, logprobs=lps) == ["a", "b"]


def test_max_steps_merges_the_tail_without_adding_text():
    text, nbytes, lps = tokens(("a", SURE), (" b", UNSURE), ("\nc", UNSURE), (" d", UNSURE))
    assert split_by_confidence(text, nbytes, lps, confidence(max_steps=2)) == ["a", " b\nc d"]


def test_join_prefix_in_confidence_mode_is_the_text_up_to_the_next_step():
    text, nbytes, lps = tokens(("x = 2", SURE), ("\n\n", UNSURE), ("y", UNSURE), (" = 3", SURE), (" z", UNSURE))
    steps = split_by_confidence(text, nbytes, lps, confidence())
    assert steps == ["x = 2", "\n\ny = 3", " z"]
    config = confidence()
    assert join_prefix(steps[:2], config) == "x = 2\n\ny = 3"
    assert join_prefix(steps[:2], config) + "".join(steps[2:]) == text
    assert join_prefix([], config) == ""
    assert join_prefix(["a", "b"], SplitConfig()) == "a\n\nb\n\n", "other modes write prefixes as before"


def test_build_request_asks_for_logprobs_only_in_confidence_mode():
    prompt, sampling = PromptConfig(), SamplingConfig()
    plain = build_request("What is 1+1?", ["Add."], 2, prompt, SplitConfig(), sampling)
    assert plain.logprobs is False
    # The delimiter modes' requests (hence cache keys) are what they were before the mode existed.
    before = GenerationRequest(
        messages=plain.messages, assistant_prefix="Add.\n\n", n=2, temperature=sampling.temperature,
        top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=sampling.seed,
    )
    assert plain == before and plain.sample_key("m", 0) == before.sample_key("m", 0)
    for mode in ("newline", "step_prefix", "numbered"):
        assert build_request("q", [], 1, prompt, SplitConfig(mode=mode), sampling).logprobs is False
    request = build_request("What is 1+1?", ["Add", " one."], 2, prompt, SplitConfig(mode="confidence"), sampling)
    assert request.logprobs is True
    assert request.assistant_prefix == "Add one."


def _builder(config: SplitConfig, checker: AnswerChecker) -> TreeBuilder:
    return TreeBuilder(config, checker, lambda s: len(s.split()), "model@test")


def test_tree_builder_keeps_confidence_steps_unstripped_and_rejects_a_generation_without_logprobs():
    text, nbytes, lps = tokens(
        ("2 + 3", SURE), (" =", SURE), (" 5", UNSURE), (".", SURE), ("\n\n", SURE), ("The", UNSURE),
        (" answer", SURE), (" is", SURE), (" \\boxed{5}", SURE),
    )
    config = confidence(min_step_tokens=2)
    generation = Generation(text=text, num_tokens=len(nbytes) + 1, finish_reason="stop", logprobs=lps + (SURE,),
                            token_bytes=nbytes, key="k")
    with AnswerChecker() as checker:
        rollout, nodes, reject = _builder(config, checker).from_generation(
            "rollout", "p", "5", PathPrefix(), generation, "policy", 0
        )
        assert reject is None and rollout.outcome is True
        assert [n.text for n in nodes] == ["2 + 3 =", " 5.\n\n", "The answer is \\boxed{5}"]
        assert "".join(n.text for n in nodes) == text
        assert [n.num_tokens for n in nodes] == [2, 3, 4], "token counts come from the generated tokens"
        assert nodes[1].node_id == node_id("p", nodes[0].node_id, "5."), "ids hash the normalised text"
        assert rollout.node_ids == [n.node_id for n in nodes]

        bare = Generation(text=text, num_tokens=len(nbytes), finish_reason="stop", token_bytes=nbytes, key="k")
        rollout, nodes, reject = _builder(config, checker).from_generation(
            "rollout", "p", "5", PathPrefix(), bare, "policy", 0
        )
        assert rollout is None and nodes == []
        assert reject.reason == "no_logprobs" and "logprobs" in reject.detail
        # The same generation still splits by delimiters in another mode.
        rollout, nodes, reject = _builder(SplitConfig(), checker).from_generation(
            "rollout", "p", "5", PathPrefix(), bare, "policy", 0
        )
        assert reject is None and [n.text for n in nodes] == ["2 + 3 = 5.", "The answer is \\boxed{5}"]


def test_real_generation_splits_by_confidence_and_builds_its_path(smollm_backend):
    config = SplitConfig(mode="confidence")
    sampling = SamplingConfig(temperature=0.7, max_tokens=96, seed=0)
    question = "James runs 3 sprints 3 times a week, 60 meters each sprint. How many meters does he run a week?"
    request = build_request(question, [], 1, PromptConfig(), config, sampling)
    assert request.logprobs
    generation = asyncio.run(smollm_backend.generate(request, request.sample_seed(request.sample_key("m", 0))))
    generation = dataclasses.replace(generation, key="real")
    assert generation.logprobs is not None and len(generation.logprobs) >= len(generation.token_bytes) > 20

    steps = split_steps(generation.text, config, token_bytes=generation.token_bytes, logprobs=generation.logprobs)
    assert len(steps) > 2
    assert "".join(steps) == generation.text
    encoded, starts = generation.text.encode("utf-8"), token_starts(generation.token_bytes)
    for cut in step_starts(steps):
        i = starts.index(cut)
        assert math.exp(generation.logprobs[i]) < config.confidence_threshold
        assert encoded[cut : cut + 1].isspace() or encoded[cut - 1 : cut] == b"\n"
        assert i >= config.min_step_tokens

    with AnswerChecker() as checker:
        builder = TreeBuilder(config, checker, smollm_backend.count_tokens, smollm_backend.model_id)
        rollout, nodes, reject = builder.from_generation("rollout", "p", "540", PathPrefix(), generation, "policy", 0)
        assert reject is None
        assert [n.text for n in nodes] == steps
        assert "".join(n.text for n in nodes) == generation.text
        assert sum(n.num_tokens for n in nodes) == len(generation.token_bytes)

        # A Monte Carlo style continuation after two steps is a true continuation of the same text.
        prefix = PathPrefix().extend(nodes[0].node_id, nodes[0].text).extend(nodes[1].node_id, nodes[1].text)
        more = build_request(question, list(prefix.texts), 1, PromptConfig(), config,
                             SamplingConfig(temperature=0.7, max_tokens=24, seed=1))
        assert more.logprobs and more.assistant_prefix == steps[0] + steps[1]
        assert smollm_backend.render(more).endswith(steps[0] + steps[1])
        continuation = asyncio.run(smollm_backend.generate(more, 123))
        continuation = dataclasses.replace(continuation, key="continuation")
        rollout, _, reject = builder.from_generation("mc_label", "p", "540", prefix, continuation, "mc", 0)
        assert reject is None and rollout.node_ids[:2] == [nodes[0].node_id, nodes[1].node_id]
