"""Live agent episodes: tool calls read from what a model writes, tool-using requests through both
backends, math problems posed as tasks, and a hostile policy whose calls are contained in real
episodes while the run goes on (the policy is a fault injected on purpose: tests/hostile_policy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asgi_server import serving
from cli_runs import table_rows
from hostile_policy import ATTACKS, app as hostile_app
from stepforge.flows import runtime
from stepforge.flows.config import RunConfig
from stepforge.schemas.records import Problem
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.agent.episodes import read_action
from stepforge.stages.ingest.sources import IngestConfig
from stepforge.stages.ingest.sources import run as ingest
from stepforge.stages.llm import tool_chat
from stepforge.stages.llm.base import GenerationRequest
from stepforge.stages.llm.openai_http import HttpConfig, parse_response, request_body
from stepforge.stages.tools.environment import environment

FIXTURES = Path(__file__).parent / "fixtures"
REPOSITORY = Path(__file__).parent.parent


# -- reading actions ------------------------------------------------------------------------------
def test_code_blocks_become_calls_of_the_code_tool_and_leave_the_text():
    text = "First the total.\n```python\nx = 48 / 2\nprint(48 + x)\n```\n"
    message = read_action(text, "call_1", "python")
    [call] = agent.tool_calls(message)
    assert (call.id, call.name, json.loads(call.arguments)) == ("call_1_0", "python", {"code": "x = 48 / 2\nprint(48 + x)\n"})
    assert message["content"] == "First the total."
    # Without a code tool (another environment, or code_blocks off) a block is just text.
    assert read_action(text, "call_1", None) == {"role": "assistant", "content": text.strip()}


def test_tool_call_blocks_win_over_code_blocks_and_a_broken_block_stays_as_evidence():
    text = 'Look:\n<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>\n```python\nprint(2)\n```'
    [call] = agent.tool_calls(read_action(text, "c", "python"))
    assert json.loads(call.arguments) == {"code": "print(1)"}
    broken = read_action("<tool_call>{not json</tool_call>", "c", "python")
    [call] = agent.tool_calls(broken)
    assert (call.name, call.arguments) == ("invalid_tool_call", "{not json")


def test_an_answer_without_a_call_ends_the_turn():
    message = read_action("So 72 clips.\n<answer>72</answer>", "c", "python")
    assert "tool_calls" not in message and agent.final_answer(message) == "72"


# -- requests with tools ---------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "Use the tool."},
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": "Compute.", "tool_calls": [
        {"id": "call_1_0", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(6*7)"}'}}]},
    {"role": "tool", "tool_call_id": "call_1_0", "name": "python", "content": "42\n"},
]


def test_a_tool_request_over_http_sends_messages_and_tools_and_reads_calls_back_as_hermes_text():
    tools = environment("python").tools()
    request = GenerationRequest(conversation=tool_chat.encode(CONVERSATION), tools=tool_chat.encode(tools), max_tokens=64)
    path, body = request_body(request, 7, "m", HttpConfig(server="vllm"), None)
    assert path == "/chat/completions" and body["messages"] == CONVERSATION and body["tools"] == tools
    assert body["seed"] == 7
    payload = {"choices": [{"finish_reason": "tool_calls", "message": {"content": None, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(1)"}'}}]}}]}
    generation, _ = parse_response(path, payload, request)
    assert generation.finish_reason == "stop"
    [call] = agent.tool_calls(read_action(generation.text, "c", "python"))
    assert (call.name, json.loads(call.arguments)) == ("python", {"code": "print(1)"})


def test_tool_requests_key_the_cache_by_the_conversation_and_leave_other_keys_alone():
    one = GenerationRequest(conversation=tool_chat.encode(CONVERSATION[:2]), tools="[]")
    two = GenerationRequest(conversation=tool_chat.encode(CONVERSATION), tools="[]")
    assert one.sample_key("m", 0) != two.sample_key("m", 0) != two.sample_key("m", 1)
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest(messages=(("user", "x"),), conversation="[]")
    with pytest.raises(ValueError, match="tools"):
        GenerationRequest(messages=(("user", "x"),), tools="[]")


def test_a_template_without_tools_gets_the_conversation_as_plain_turns():
    turns = tool_chat.plain_turns(CONVERSATION, environment("python").tools())
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert '"name": "python"' in turns[0]["content"] and "<tool_call>" in turns[2]["content"]
    assert turns[3]["content"] == "<tool_response>\n42\n\n</tool_response>"


# -- tasks -----------------------------------------------------------------------------------------
def test_ingest_poses_math_problems_as_tasks_of_the_environment():
    plain = [r for r in ingest(IngestConfig(source=str(FIXTURES / "gsm8k_sample.jsonl"), format="gsm8k", limit=2))]
    posed = [r for r in ingest(IngestConfig(source=str(FIXTURES / "gsm8k_sample.jsonl"), format="gsm8k", limit=2,
                                            environment="python"))]
    assert all(isinstance(r, Problem) for r in posed) and len(posed) == len(plain) == 2
    for before, after in zip(plain, posed):
        assert after.problem_id == before.problem_id and after.question == before.question
        info = agent.agent_meta(after.meta)
        assert info["environment"] == "python" and info["gold_answers"] == [before.gold_answer]
        assert [m["role"] for m in info["context"]] == ["system", "user"] and info["context"][1]["content"] == before.question
        assert [t["function"]["name"] for t in info["tools"]] == ["python"]
    with pytest.raises(ValueError, match="environment"):
        IngestConfig(source="x.jsonl", format="agent_messages", environment="python")


# -- a hostile policy in real episodes -------------------------------------------------------------
def hostile_config(tmp: Path, base_url: str, pairs_per_problem: int = 1) -> RunConfig:
    source = tmp / "attacks.jsonl"
    source.write_text("".join(json.dumps({"question": f"ATTACK: {name}. What is 0 + 1?", "answer": "#### 1"}) + "\n"
                              for name in ATTACKS))
    return RunConfig.model_validate({
        "run": "hostile", "store": str(tmp / "store"), "shard_size": 4, "concurrent_shards": 3,
        "backend": {"kind": "openai", "model": "hostile-policy", "max_in_flight": 8,
                    "http": {"base_url": base_url + "/v1", "server": "openai", "max_retries": 0}},
        "ingest": {"source": str(source), "format": "gsm8k", "environment": "python"},
        "rollout": {"samples_per_problem": 2, "sampling": {"max_tokens": 64, "temperature": 0.7}},
        "agent": {"max_steps": 3, "python": {"max_observation_chars": 400,
                                             "limits": {"wall_seconds": 4, "cpu_seconds": 2, "memory_mb": 256}}},
        # MC continues every episode after its hostile step: restoring that prefix re-executes the
        # hostile call in a fresh sandbox, which must be contained as well.
        # The same sampling as the episodes: a continuation must still draw new turns, not replay them.
        "labeller": "mc", "mc_label": {"completions_per_step": 1, "sampling": {"max_tokens": 64, "temperature": 0.7}},
        "verify": {"sources": ["tool"]},
        "consensus": {"policy": "tool"},  # a failed cell is a wrong step, whatever the answer after it
        # Wrong first steps get executed alternatives: sampled apart from the episodes' own first turns.
        "agent_pairs": {"enabled": True, "alternatives": 1, "continuations": 1, "max_tokens": 64, "temperature": 0.7,
                        "max_pairs_per_problem": pairs_per_problem},
    })


@pytest.mark.parametrize("pairs_per_problem", [1, 2])
def test_hostile_tool_calls_are_contained_and_recorded_and_the_run_goes_on(tmp_path, pairs_per_problem):
    escape = tmp_path / "escaped.txt"
    secret = REPOSITORY / "pyproject.toml"
    with serving(hostile_app(str(secret), str(escape))) as url:
        ctx = runtime.RunContext(hostile_config(tmp_path, url, pairs_per_problem))
        runtime.run_shards(ctx, runtime.ingest_shards(ctx)[0])
    if pairs_per_problem == 1:
        # Every turn was a new request: continuations after step 1 did not replay the episodes' turn 2,
        # nor alternatives the episodes' first turns. (With 2, the varied task's two wrong steps share
        # a prefix and so their alternatives: the same requests, legitimately.)
        assert ctx.client().stats.cache_hits == 0 and ctx.client().stats.generated > 0
    rows = {t: [json.loads(r) for r in rs] for t, rs in table_rows(tmp_path / "store").items()}
    problems = {p["problem_id"]: p["question"].split(".")[0].removeprefix("ATTACK: ") for p in rows["problems"]}
    assert sorted(problems.values()) == sorted(ATTACKS)
    policy = [r for r in rows["rollouts"] if r["origin"] == "policy"]
    # Every episode ran to its answer: no attack ended a shard, a stage or an episode.
    assert len(policy) == 2 * len(ATTACKS) and all(r["final_answer"] == "1" and r["outcome"] for r in policy)
    assert not [r for r in rows["rejects"] if r["stage"] == "rollout"]
    nodes = {n["node_id"]: n for n in rows["nodes"]}
    observed = {}
    for rollout in policy:
        first = agent.step_messages(nodes[rollout["node_ids"][0]]["text"])
        assert [m["role"] for m in first] == ["assistant", "tool"]
        observed[problems[rollout["problem_id"]]] = first[1]["content"]
    for table, lines in table_rows(tmp_path / "store").items():
        assert len(set(lines)) == len(lines), f"duplicated rows in {table}"
    assert "ValueError: variant" in observed["varied_error"]
    for attack in ("network", "urllib", "fork_bomb", "read_passwd", "read_repository", "write_outside"):
        assert "Error: Blocked by the sandbox" in observed[attack], (attack, observed[attack])
    assert "root:" not in observed["read_passwd"] and "[project]" not in observed["read_repository"]
    assert not escape.exists()
    assert "Error:" in observed["infinite_loop"] and ("CPU" in observed["infinite_loop"] or "Timed out" in observed["infinite_loop"])
    assert "Error:" in observed["memory_bomb"]
    huge = observed["huge_output"]
    assert "more characters]" in huge and len(huge) <= 400 + len("…[10000000 more characters]")
    assert "not valid JSON" in observed["bad_arguments"] or "JSON" in observed["bad_arguments"]
    # The MC continuations restored each hostile prefix in a fresh sandbox and answered after it.
    continued = [r for r in rows["rollouts"] if r["origin"] == "mc"]
    assert {problems[r["problem_id"]] for r in continued} == set(ATTACKS)
    assert all(r["node_ids"][0] == r["prefix_node_id"] for r in continued)
    # The tool checks read every failed cell as a tool error: the hostile steps are labelled -1.
    tool_verdicts = {e["node_id"]: e["verdict"] for e in rows["evaluations"] if e["source"] == "tool"}
    for rollout in policy:
        assert tool_verdicts[rollout["node_ids"][0]] == -1, problems[rollout["problem_id"]]
    # The hostile steps are labelled -1, so agent curation tried alternatives at each. Where the
    # policy repeats itself, each alternative is the wrong action again: no pair, a reason each.
    labels = {r["node_id"]: r["label"] for r in rows["labels"]}
    varied = {pid for pid, name in problems.items() if name == "varied_error"}
    wrong_first = {r["node_ids"][0] for r in policy if labels.get(r["node_ids"][0]) == -1 and r["problem_id"] not in varied}
    assert len(wrong_first) == len(ATTACKS) - 1
    assert {r["item"] for r in rows["rejects"] if r["reason"] == "no_better_action"} == wrong_first
    assert {p["problem_id"] for p in rows["pairs"]} <= varied
    # Where the policy varies, the alternatives were new actions, executed, each stored once with its value.
    alternatives = [n for n in rows["nodes"] if n["origin"] == "alternative" and n["problem_id"] in varied]
    assert alternatives and all(agent.step_messages(n["text"])[1]["role"] == "tool" for n in alternatives)
    valued = {e["node_id"] for e in rows["evaluations"] if e["source"] == "mc" and '"executed": true' in e["meta"]}
    assert {n["node_id"] for n in alternatives} <= valued


# -- an episode through a real OpenAI-compatible server ------------------------------------------
@pytest.mark.slow
def test_an_episode_over_http_sends_the_tools_and_reproduces_from_its_seed(llama_server, monkeypatch):
    """llama.cpp's own server (SmolLM2: the model's skill does not matter here) takes the tool-using
    conversation with ``tools``; a seeded episode comes out the same from a fresh client."""
    import asyncio

    from conftest import LLAMA_KEY_ENV, LLAMA_SERVER_KEY
    from stepforge.stages.agent.episodes import AgentConfig, Episode, EpisodeRunner
    from stepforge.stages.llm.base import GenerationClient
    from stepforge.stages.llm.openai_http import OpenAIBackend
    from stepforge.stages.rollout.prompting import SamplingConfig
    from stepforge.stages.tree import PathPrefix

    monkeypatch.setenv(LLAMA_KEY_ENV, LLAMA_SERVER_KEY)
    [problem] = [r for r in ingest(IngestConfig(source=str(FIXTURES / "gsm8k_sample.jsonl"), format="gsm8k", limit=1,
                                                environment="python"))]

    def episode() -> Episode:
        http = HttpConfig(base_url=llama_server.base_url, server="llamacpp", api_key_env=LLAMA_KEY_ENV, timeout_seconds=300)
        runner = EpisodeRunner(GenerationClient(OpenAIBackend(llama_server.model, http)), AgentConfig(max_steps=2, max_tokens=96))
        return asyncio.run(runner.run(problem, PathPrefix(), 0, SamplingConfig(temperature=0.9, max_tokens=48, seed=2)))

    first, again = episode(), episode()
    assert isinstance(first, Episode), first
    assert first.steps and first.steps[0][0]["role"] == "assistant" and first.num_tokens > 0
    assert first.steps == again.steps and first.keys == again.keys


def test_a_continuation_never_replays_the_episode_it_continues():
    """Continuing after step 1 asks for turn 2 with a seed of its own: with the episode's seed the
    request would be the episode's own turn 2, and the 'new' sample a replay counted twice."""
    from stepforge.stages.agent.episodes import continuation_seed

    assert continuation_seed(0, None) == 0
    assert continuation_seed(0, "a" * 20) != 0
    assert continuation_seed(0, "a" * 20) != continuation_seed(0, "b" * 20)
    assert continuation_seed(0, "a" * 20) == continuation_seed(0, "a" * 20)
    # Alternatives to a wrong first step are new samples too, not the policy's own first actions.
    assert continuation_seed(0, None, "alternative") != 0
    assert continuation_seed(0, "a" * 20, "alternative") != continuation_seed(0, "a" * 20)


def test_llamacpp_renders_tools_with_a_template_that_knows_them_and_as_plain_turns_otherwise():
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from stepforge.stages.llm.llamacpp import render_conversation

    chatml = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% for c in m.tool_calls or [] %}"
              "[{{ c.function.name }} {{ c.function.arguments.code }}]{% endfor %}\n{% endfor %}<|assistant|>")
    with_tools = "{% if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}" + chatml
    tools = environment("python").tools()
    request = GenerationRequest(conversation=tool_chat.encode(CONVERSATION), tools=tool_chat.encode(tools))
    native = render_conversation(Jinja2ChatFormatter(template=with_tools, eos_token="", bos_token=""), True, request)
    # The template got the tools and each call's arguments as an object (it reads .code from them).
    assert native.startswith("TOOLS python\n") and "[python print(6*7)]" in native and "<|tool|>42" in native
    plain = render_conversation(Jinja2ChatFormatter(template=chatml, eos_token="", bos_token=""), False, request)
    assert "You can call these tools" in plain and "<|user|><tool_response>\n42" in plain and "<|tool|>" not in plain


def test_prompt_tools_mode_sends_plain_turns_and_keys_another_model():
    """For a server that refuses ``tools`` (vLLM without a tool parser): no tools field, the tools in words."""
    from stepforge.stages.llm.openai_http import http_model_id

    request = GenerationRequest(conversation=tool_chat.encode(CONVERSATION), tools=tool_chat.encode(environment("python").tools()))
    path, body = request_body(request, 7, "m", HttpConfig(server="vllm", tools="prompt"), None)
    assert path == "/chat/completions" and "tools" not in body
    assert body["messages"] == tool_chat.plain_turns(CONVERSATION, json.loads(request.tools))
    assert "You can call these tools" in body["messages"][0]["content"]
    assert http_model_id("m", HttpConfig(tools="prompt")) != http_model_id("m", HttpConfig())


def test_mcts_continues_live_episodes_below_their_prefixes(tmp_path):
    """MCTS draws through the same episode sampler: its completions are episodes continued from a
    selected step (the prefix's calls re-executed first), and every step it reached has a Q value."""
    escape = tmp_path / "escaped.txt"
    with serving(hostile_app(str(REPOSITORY / "pyproject.toml"), str(escape))) as url:
        config = RunConfig.model_validate({**hostile_config(tmp_path, url).model_dump(mode="json"), "labeller": "mcts",
                                           "mcts": {"iterations": 3, "breadth": 1, "sampling": {"max_tokens": 64}},
                                           "agent_pairs": {"enabled": False}})
        ctx = runtime.RunContext(config)
        runtime.run_shards(ctx, runtime.ingest_shards(ctx)[0])
    rows = {t: [json.loads(r) for r in rs] for t, rs in table_rows(tmp_path / "store").items()}
    nodes = {n["node_id"]: n for n in rows["nodes"]}
    expansions = [r for r in rows["rollouts"] if r["origin"] == "mcts"]
    assert expansions and not [r for r in rows["rejects"] if r["stage"] == "mcts"]
    for rollout in expansions:
        if rollout["prefix_node_id"] is not None:
            depth = nodes[rollout["prefix_node_id"]]["depth"]
            assert rollout["node_ids"][depth - 1] == rollout["prefix_node_id"] and len(rollout["node_ids"]) > depth
        assert rollout["final_answer"] == "1"
    valued = {e["node_id"] for e in rows["evaluations"] if e["source"] == "mcts"}
    assert {r["node_ids"][0] for r in rows["rollouts"] if r["origin"] == "policy"} <= valued
