"""Live agent episodes: the policy acts in a tool environment, turn by turn, until it answers.

An **episode** starts from a task (a problem whose ``meta.agent.environment`` names a live
environment, ``stages.tools.environment``) or from a stored prefix of one, and alternates:

1. the policy writes one assistant turn for the conversation so far (a tool-using request,
   ``stages.llm.tool_chat``: through every backend, the model's own chat template or the server's);
2. its tool calls — ``<tool_call>`` blocks, or, for an environment that takes them, fenced code
   blocks (tool-integrated reasoning: what small code models write) — run in the environment's
   session, and what came back is the turn's observation;
3. a turn without a call ends the episode with the answer it states
   (``trajectory.final_answer``).

The episode also ends at ``max_steps`` assistant turns (``step_limit``) or when its token budget
is spent (``token_budget``). Each step is one assistant turn plus its observations: the node
text ``trajectory.step_text`` that imported trajectories use, so checks, the judge, the WebSTAR
filter, augmentation and exports read generated and imported episodes alike.

**Continuing** an episode from a stored prefix (the labellers' completions, agent pairs'
alternatives) restores the environment by re-executing the prefix's tool calls in a fresh
session, then goes on as above. Turn ``t`` of sample ``i`` is one cached sample: its request is
the whole conversation so far and its sample index is ``i``, so a resumed run replays every turn
it has (and the sandbox reproduces the same observations) instead of generating again.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash, node_id
from stepforge.schemas.records import Node, Origin, Problem, Reject, Rollout
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.llm import tool_chat
from stepforge.stages.llm.base import GenerationClient, GenerationError, GenerationRequest
from stepforge.stages.rollout.prompting import SamplingConfig
from stepforge.stages.tools.environment import Environment, Observation, environment
from stepforge.stages.tools.python_env import PythonToolConfig
from stepforge.stages.tree import PathPrefix

FINISH_REASONS = ("stop", "length", "step_limit", "token_budget")
"""A generated episode's ``Rollout.finish_reason``: it answered (stop), its last turn hit the turn's
token limit without an answer (length), it still called tools at ``max_steps`` (step_limit), or the
episode's token budget ran out (token_budget)."""

_CODE_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_OUTPUT_FENCE = "```output"


class AgentConfig(BaseModel):
    """How live episodes run (ingest.environment names the environment)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_steps: int = Field(default=6, ge=1, le=64, description="Assistant turns per episode; one still calling tools at the limit ends as step_limit.")
    max_tokens: int = Field(
        default=1536, ge=16,
        description="Token budget of an episode: generated tokens over all its turns (a turn gets at most the "
        "sampling's max_tokens and what is left of the budget).",
    )
    code_blocks: bool = Field(
        default=True,
        description="Read fenced ```python blocks as calls of the environment's code tool (tool-integrated "
        "reasoning, as ToRA): generation stops at a ```output fence, so the model never invents the output.",
    )
    concurrent_tools: int = Field(
        default=2, ge=1, le=64,
        description="Tool executions at once in this process (each is a sandboxed interpreter): keeps the sandbox "
        "from starving the policy's engine of cores.",
    )
    python: PythonToolConfig = Field(default_factory=PythonToolConfig, description="The python environment's tool.")

    def environment(self, name: str) -> Environment:
        return environment(name, getattr(self, name))


def live_environment(problem: Problem | Mapping[str, Any]) -> str | None:
    """The live environment a problem is a task for, or None (a math problem, an imported trajectory)."""
    meta = problem.meta if isinstance(problem, Problem) else problem["meta"]
    info = agent.agent_meta(meta)
    return None if info is None else info.get("environment")


@dataclass(frozen=True)
class Episode:
    """What one episode (or the continuation of a prefix) generated."""

    steps: tuple[tuple[dict, ...], ...]
    """Each generated step's messages: the assistant turn, then its tool results."""
    step_tokens: tuple[int, ...]
    answer: str | None
    finish_reason: str
    keys: tuple[str, ...]
    """The generation key of every turn, in order."""

    @property
    def num_tokens(self) -> int:
        return sum(self.step_tokens)

    @property
    def key(self) -> str:
        return content_hash("episode", self.keys, length=32)


_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def _tool_slots(n: int) -> threading.BoundedSemaphore:
    """One bound per process (every shard's runner shares it), as ``concurrent_tools`` promises."""
    with _slots_lock:
        return _slots.setdefault(n, threading.BoundedSemaphore(n))


class EpisodeRunner:
    """Runs and continues episodes of one run: the policy's client, the environments, the limits."""

    def __init__(self, client: GenerationClient, config: AgentConfig):
        self.client, self.config = client, config
        self._environments: dict[str, Environment] = {}
        self._tools = _tool_slots(config.concurrent_tools)

    def _environment(self, name: str) -> Environment:
        if name not in self._environments:
            self._environments[name] = self.config.environment(name)
        return self._environments[name]

    async def run(
        self, problem: Problem, prefix: PathPrefix, index: int, sampling: SamplingConfig, prefix_tokens: int = 0,
        max_turns: int | None = None, purpose: str = "continue",
    ) -> Episode | GenerationError:
        """Sample ``index`` of an episode after ``prefix`` (empty: from the task), ``max_turns``
        turns at most (None: to its end; 1: one action and what it observed, still ``stop``). A
        failed generation ends it as a ``GenerationError`` (a reject for the caller). ``purpose``
        keeps the samples of different uses of one prefix apart (``continuation_seed``)."""
        info = agent.agent_meta(problem.meta) or {}
        env = self._environment(info["environment"])
        conversation = agent.context_messages(info, prefix.texts)
        tools = tool_chat.encode(info.get("tools", []))
        code_tool = getattr(env, "code_tool", None) if self.config.code_blocks else None
        stop = (_OUTPUT_FENCE,) if code_tool else ()
        restore = [call for text in prefix.texts for call in agent.tool_calls(agent.action_of(text))]
        seed = continuation_seed(sampling.seed, prefix.leaf, purpose)
        session = None
        steps: list[tuple[dict, ...]] = []
        step_tokens: list[int] = []
        keys: list[str] = []
        used = prefix_tokens
        depth = len(prefix.texts)
        try:
            while True:
                if depth >= self.config.max_steps:
                    return Episode(tuple(steps), tuple(step_tokens), None, "step_limit", tuple(keys))
                left = self.config.max_tokens - used
                if left <= 0:
                    return Episode(tuple(steps), tuple(step_tokens), None, "token_budget", tuple(keys))
                request = GenerationRequest(
                    conversation=tool_chat.encode(conversation), tools=tools, temperature=sampling.temperature,
                    top_p=sampling.top_p, max_tokens=min(sampling.max_tokens, left), seed=seed, stop=stop,
                )
                [result] = await self.client.generate_each(request, start=index)
                if isinstance(result, GenerationError):
                    return result
                if isinstance(result, BaseException):
                    raise result  # anything but a failed generation is a bug
                keys.append(result.key)
                used += result.num_tokens
                depth += 1
                action = read_action(result.text, f"call_{depth}", code_tool)
                messages: list[dict] = [agent.normalize_message(action, "action")]
                calls = agent.tool_calls(messages[0])
                if calls:
                    if session is None:
                        session = env.reset(info)
                        if restore:
                            await self._execute(session.replay, restore)
                    for call in calls:
                        observation: Observation = await self._execute(session.execute, call)
                        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": observation.content})
                steps.append(tuple(messages))
                step_tokens.append(result.num_tokens)
                conversation.extend(messages)
                if not calls:
                    answer = agent.final_answer(messages[0])
                    finish = "length" if answer is None and result.finish_reason == "length" else "stop"
                    return Episode(tuple(steps), tuple(step_tokens), answer, finish, tuple(keys))
                if max_turns is not None and len(steps) >= max_turns:
                    return Episode(tuple(steps), tuple(step_tokens), None, "stop", tuple(keys))
        finally:
            if session is not None:
                await asyncio.to_thread(session.close)

    async def _execute(self, function, *args):
        """A blocking environment call on a worker thread, at most ``concurrent_tools`` at once."""

        def bounded():
            with self._tools:
                return function(*args)

        return await asyncio.to_thread(bounded)


def continuation_seed(seed: int, leaf: str | None, purpose: str = "continue") -> int:
    """The request seed of an episode's turns: the sampling's own for an episode from the task, else
    one drawn from the purpose and the prefix's leaf. A continuation's first request is otherwise
    the very request the episode through that step already made (same conversation, same seed),
    and its sample would replay that episode instead of drawing a new one: counted twice as
    evidence for the step. Alternatives to a wrong step (``purpose="alternative"``) are drawn apart
    even at the task's root, where they would otherwise replay the policy's own first actions."""
    if leaf is None and purpose == "continue":
        return seed
    return int(content_hash(purpose, seed, leaf)[:8], 16) & 0x7FFFFFFF


def read_action(text: str, call_prefix: str, code_tool: str | None) -> dict[str, Any]:
    """The assistant message a turn's text makes: ``<tool_call>`` blocks (``tool_chat.parse_action``)
    and, when the environment has a code tool, fenced code blocks as calls of it. The code leaves
    the message's text (it is the call's argument now), so an exported step is an ordinary
    OpenAI tool-calling turn."""
    message = tool_chat.parse_action(text, call_prefix)
    if code_tool is None or message.get("tool_calls"):
        return message
    blocks = [b for b in _CODE_BLOCK.findall(message["content"]) if b.strip()]
    if not blocks:
        return message
    message["content"] = _CODE_BLOCK.sub("", message["content"]).replace(_OUTPUT_FENCE, "").strip()
    message["tool_calls"] = [
        {"id": f"{call_prefix}_{k}", "type": "function",
         "function": {"name": code_tool, "arguments": json.dumps({"code": code}, ensure_ascii=False)}}
        for k, code in enumerate(blocks)
    ]
    return message


class EpisodeBuilder:
    """Makes a rollout and its new nodes from an episode, like ``tree.TreeBuilder`` for text."""

    def __init__(self, checker, model: str, known_node_ids: frozenset[str] = frozenset()):
        self.checker, self.model, self.known_node_ids = checker, model, known_node_ids

    def from_result(
        self, stage: str, problem: Problem, prefix: PathPrefix, result: Episode | BaseException,
        origin: Origin, sample_index: int, item: str,
    ) -> tuple[Rollout | None, list[Node], Reject | None]:
        if isinstance(result, GenerationError):
            return None, [], Reject(stage=stage, item=item, reason="generation_failed", detail=str(result))
        if isinstance(result, BaseException):
            raise result
        rollout_id = content_hash("rollout", problem.problem_id, prefix.leaf, result.key)
        if not result.steps:  # a prefix already at the step limit or past the budget: nothing to continue
            reject = Reject(stage=stage, item=rollout_id, reason="empty_generation",
                            detail=f"the episode ended before its first turn ({result.finish_reason})")
            return None, [], reject
        nodes, path, parent = [], list(prefix.node_ids), prefix.leaf
        for messages, tokens in zip(result.steps, result.step_tokens):
            text = agent.step_text(messages)
            nid = node_id(problem.problem_id, parent, text)
            if nid not in self.known_node_ids:
                nodes.append(Node(node_id=nid, problem_id=problem.problem_id, parent_id=parent, depth=len(path) + 1,
                                  text=text, origin=origin, num_tokens=tokens))
            path.append(nid)
            parent = nid
        outcome, reason = gold_check(self.checker, problem, result.answer)
        rollout = Rollout(
            rollout_id=rollout_id, problem_id=problem.problem_id, origin=origin, prefix_node_id=prefix.leaf,
            sample_index=sample_index, node_ids=path, text=agent.step_text([m for step in result.steps for m in step]),
            final_answer=result.answer, outcome=outcome, outcome_reason=reason, finish_reason=result.finish_reason,
            num_tokens=result.num_tokens, model=self.model, generation_key=result.key,
        )
        return rollout, nodes, None


def gold_check(checker, problem: Problem, answer: str | None) -> tuple[bool | None, str]:
    """An episode's answer against the task's gold answers (the run's answer checker; any gold
    that matches counts). No answer is a wrong outcome, as for sampled solutions."""
    golds = (agent.agent_meta(problem.meta) or {}).get("gold_answers") or ([problem.gold_answer] if problem.gold_answer else [])
    if not golds:
        return None, "no_gold"
    verdicts = [checker.check(gold, answer) for gold in golds]
    for outcome, reason in verdicts:
        if outcome:
            return True, reason
    outcome, reason = verdicts[0]
    if outcome is None and reason == "no_answer":
        outcome = False
    return outcome, reason


class EpisodeSampler:
    """The labellers' sampler for a live agent task: a completion of a prefix is an episode
    continued from it (``stages.label.search``'s ``TextSampler`` for text)."""

    def __init__(self, runner: EpisodeRunner, problem: Problem, sampling: SamplingConfig,
                 builder: EpisodeBuilder, tokens_of: Mapping[str, int]):
        self.runner, self.problem, self.sampling, self.builder = runner, problem, sampling, builder
        self.tokens_of = tokens_of  # stored steps' token counts: a prefix's share of the episode budget

    async def draw(self, prefix: PathPrefix, n: int, start: int) -> list[Episode | GenerationError]:
        used = sum(self.tokens_of.get(nid, 0) for nid in prefix.node_ids)
        return list(await asyncio.gather(
            *(self.runner.run(self.problem, prefix, index, self.sampling, used) for index in range(start, start + n))
        ))

    def make(self, stage: str, prefix: PathPrefix, result, origin: Origin, index: int, item: str):
        return self.builder.from_result(stage, self.problem, prefix, result, origin, index, item)

    @staticmethod
    def tokens(result) -> int | None:
        return result.num_tokens if isinstance(result, Episode) else None


def runner_for(ctx) -> EpisodeRunner | None:
    """The run's episode runner when its problems are live agent tasks (``ingest.environment``)."""
    if getattr(ctx.config.ingest, "environment", None) is None:
        return None
    return EpisodeRunner(ctx.client(), ctx.config.agent)


def key_of(ctx) -> tuple:
    """What of the agent settings enters a generating stage's key: nothing for a run without a live
    environment (its keys stay as they were), else the episode limits and the environment's identity."""
    name = getattr(ctx.config.ingest, "environment", None)
    if name is None:
        return ()
    settings = ctx.config.agent.model_dump(mode="json", exclude={"python", "concurrent_tools"})
    return ({"episodes": settings, "environment": ctx.config.agent.environment(name).identity()},)

