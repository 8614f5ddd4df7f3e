"""Step-level preference pairs for agents: a wrong action vs a better one from the same context.

For each step of an agent trajectory that consensus labels -1, the policy samples
``alternatives`` actions from the same context (the tools are described in the system message;
calls are read back from ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format
Qwen's and Hermes' chat templates use). The rubric judge (``stages.verify.agent_judge``) grades each
alternative in that context, without a result (it was never executed). The best alternative
whose score reaches the judge's ``good_score`` becomes the chosen side; the wrong step's action
is the rejected side (Step-DPO's rule: same prefix, first the error, then a correct next step).

Written: the alternatives as nodes (origin ``alternative``, under the wrong step's parent), their
grades as ``judge`` evaluations, and ``Pair`` rows of kind ``agent_step`` whose ``prompt`` is the
JSON list of context messages and whose ``chosen`` / ``rejected`` are the JSON assistant messages
(the export turns them into TRL's conversational preference format). A wrong step with no
alternative good enough is a ``no_better_action`` reject; at most ``max_pairs_per_problem``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash, node_id
from stepforge.schemas.records import Evaluation, Node, Pair, Problem, Record, Reject
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.agent.episodes import (
    Episode, EpisodeBuilder, EpisodeRunner, EpisodeSampler, gold_check, live_environment,
)
from stepforge.stages.rollout.prompting import SamplingConfig
from stepforge.stages.verify.agent_judge import AgentJudgeConfig, evaluation_of, grade_step
from stepforge.stages.verify.judging import structured_output
from stepforge.stages.llm import tool_chat
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient, GenerationError, GenerationRequest
from stepforge.stages.tree import PathPrefix, StepTree, failed_generation, first_occurrences

STAGE = "agent_pairs"
VERSION = 1
PAIR_KIND = "agent_step"



class AgentPairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Sample better actions at wrong agent steps and pair them.")
    alternatives: int = Field(default=4, ge=1, description="Actions sampled from the policy per wrong step.")
    temperature: float = Field(default=0.8, gt=0.0, le=2.0, description="Sampling temperature of the alternatives.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass of the alternatives.")
    max_tokens: int = Field(default=256, ge=16, description="Generation budget of one alternative action.")
    seed: int = Field(default=0, description="Seed of the alternatives.")
    max_pairs_per_problem: int = Field(default=4, ge=1, description="At most this many pairs per task.")
    continuations: int = Field(
        default=4, ge=1,
        description="Live agent tasks: episodes continued after each executed alternative to value it (its "
        "Monte Carlo value); an alternative that answers is valued by its own outcome.",
    )

    def key(self, live: bool) -> dict:
        """The settings as they enter the curation key (``continuations`` only for live agent tasks,
        so stores of imported trajectories keep their keys)."""
        return self.model_dump(mode="json", exclude=None if live else {"continuations"})


def policy_messages(agent_info: Mapping[str, Any], context: list[dict]) -> tuple[tuple[str, str], ...]:
    """The context as plain chat turns any chat template renders (``tool_chat.plain_turns``), calls
    written inline right after the turn's text, as this stage always wrote them (its cached samples
    are keyed by these prompts)."""
    turns = tool_chat.plain_turns(context, agent_info.get("tools", []), call_text=_inline_calls)
    return tuple((turn["role"], turn["content"]) for turn in turns)


def _inline_calls(message: Mapping[str, Any]) -> str:
    return (message.get("content") or "") + "".join(
        f"<tool_call>{json.dumps({'name': c.name, 'arguments': tool_chat.json_or_text(c.arguments)}, ensure_ascii=False)}</tool_call>"
        for c in agent.tool_calls(message)
    )


def parse_action(text: str) -> dict[str, Any]:
    """An assistant message from generated text (``tool_chat.parse_action``, ids ``alt_<k>``); a block
    that is not a readable call is dropped here: an alternative is judged on what it would call."""
    message = tool_chat.parse_action(text, "alt")
    calls = [c for c in message.get("tool_calls", []) if c["function"]["name"] != tool_chat.INVALID_CALL]
    message.pop("tool_calls", None)
    if calls:
        message["tool_calls"] = calls
    return message


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    labels: Iterable[dict],
    config: AgentPairsConfig,
    judge_config: AgentJudgeConfig,
    policy: GenerationClient,
    judge: GenerationClient,
    runner: EpisodeRunner | None = None,
    checker=None,
) -> Iterator[Record]:
    """Alternative nodes, their grades (or, for live agent tasks with a ``runner``, their executed
    observations and continuation values), pairs and rejects, problem by problem."""
    tasks = [p for p in problems if agent.is_agent_problem(p)]
    tree = StepTree(nodes)
    label_of = {label["node_id"]: label for label in labels}
    structured = structured_output(judge_config, judge)
    wrong: dict[str, list[str]] = {}
    for rollout in sorted(rollouts, key=lambda r: (r["sample_index"], r["rollout_id"])):
        if rollout["origin"] != "policy":
            continue
        for nid in rollout["node_ids"]:
            label = label_of.get(nid)
            if label is not None and label["label"] == -1 and nid in tree:
                found = wrong.setdefault(rollout["problem_id"], [])
                if nid not in found:
                    found.append(nid)

    async def pairs_for(problem: Problem) -> list[Record]:
        info = agent.agent_meta(problem.meta) or {}
        steps = wrong.get(problem.problem_id, [])[: config.max_pairs_per_problem]
        if runner is not None and live_environment(problem):
            parts = await asyncio.gather(*(_executed_pair_at(problem, info, nid) for nid in steps))
            return _once([r for part in parts for r in part])
        parts = await asyncio.gather(*(_pair_at(problem, info, nid) for nid in steps))
        return [r for part in parts for r in part]

    def _once(records: list[Record]) -> list[Record]:
        """Each node, rollout and evaluation once, and no node the tree already holds: two wrong
        steps under one prefix draw the same alternatives (same context, same seeds), with the same
        observations and continuations; an alternative may also be a step some episode took."""
        seen: set[tuple[str, str]] = {("nodes", nid) for nid in tree.nodes}
        kept = []
        for record in records:
            ident = {"nodes": "node_id", "rollouts": "rollout_id", "evaluations": "evaluation_id"}.get(record.TABLE)
            if ident is not None:
                key = (record.TABLE, getattr(record, ident))
                if key in seen:
                    continue
                seen.add(key)
            kept.append(record)
        return kept

    async def _executed_pair_at(problem: Problem, info: Mapping[str, Any], nid: str) -> list[Record]:
        """A wrong step of a live episode against actions sampled in its place and *executed*: each
        alternative's node holds its real observation, and its value is the share of episodes
        continued after it that reach the gold answer (its own outcome if it answers)."""
        node = tree.nodes[nid]
        above = tree.above(nid)
        prefix = PathPrefix(above, tuple(tree.texts(above)))
        used = sum(tree.nodes[i]["num_tokens"] for i in above)
        sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                                  seed=config.seed)
        acts = await asyncio.gather(
            *(runner.run(problem, prefix, index, sampling, used, max_turns=1, purpose="alternative")
              for index in range(config.alternatives))
        )
        rejected_action = agent.action_of(node["text"])
        builder = EpisodeBuilder(checker, policy.model_id, frozenset(tree.nodes))
        continuer = EpisodeSampler(runner, problem, sampling, builder, {i: tree.nodes[i]["num_tokens"] for i in above})
        records: list[Record] = []
        candidates: list[tuple[str, dict, Episode]] = []
        for index, act in enumerate(acts):
            item = f"{nid}#{index}"
            if isinstance(act, GenerationError):
                records.append(Reject(stage=STAGE, item=item, reason="generation_failed", detail=str(act)))
                continue
            if not act.steps:
                records.append(Reject(stage=STAGE, item=item, reason="empty_action", detail=f"episode ended: {act.finish_reason}"))
                continue
            messages = act.steps[0]
            action = messages[0]
            if not action["content"] and not action.get("tool_calls"):
                records.append(Reject(stage=STAGE, item=item, reason="empty_action", detail="no text, no call"))
                continue
            text = agent.step_text(messages)
            alt_id = node_id(problem.problem_id, node["parent_id"], text)
            if _same_action(action, rejected_action) or alt_id == nid or any(c[0] == alt_id for c in candidates):
                continue  # the policy repeated the wrong action (or an alternative): no pair in it
            records.append(Node(node_id=alt_id, problem_id=problem.problem_id, parent_id=node["parent_id"],
                                depth=node["depth"], text=text, origin="alternative", num_tokens=act.step_tokens[0]))
            candidates.append((alt_id, action, act))
        values = await asyncio.gather(*(_value(problem, prefix.extend(alt_id, agent.step_text(act.steps[0])), act, continuer)
                                        for alt_id, _, act in candidates))
        best = None
        rejected_value = label_of[nid]["value"] if label_of[nid].get("value") is not None else 0.0
        for (alt_id, action, act), (successes, drawn, spent, made) in zip(candidates, values):
            records.extend(made)
            if not drawn:
                continue
            value = successes / drawn
            records.append(Evaluation(
                evaluation_id=content_hash("eval", alt_id, "mc", policy.model_id, STAGE, config.key(True)),
                node_id=alt_id, problem_id=problem.problem_id, source="mc", value=value, n=drawn, successes=successes,
                model=policy.model_id, cost_tokens=spent,
                meta=json.dumps({"alternative_to": nid, "executed": True, "continuations": config.continuations,
                                 "answered": act.answer is not None and len(act.steps) == 1 and not act.steps[0][0].get("tool_calls")},
                                sort_keys=True),
            ))
            if value > rejected_value and value > 0 and (best is None or value > best[2]):
                best = (alt_id, action, value)
        if best is None:
            records.append(Reject(stage=STAGE, item=nid, reason="no_better_action",
                                  detail=f"none of {len(candidates)} distinct executed alternatives reached the answer more "
                                  f"often than the wrong step ({rejected_value:.2f})"))
            return records
        alt_id, action, value = best
        context = agent.context_messages(info, tree.texts(above))
        records.append(
            Pair(
                pair_id=content_hash("pair", PAIR_KIND, node["parent_id"], alt_id, nid), problem_id=problem.problem_id,
                kind=PAIR_KIND, prompt=json.dumps(context, ensure_ascii=False), chosen=json.dumps(action, ensure_ascii=False),
                rejected=json.dumps(rejected_action, ensure_ascii=False), prefix_node_id=node["parent_id"],
                chosen_node_id=alt_id, rejected_node_id=nid, chosen_value=value, rejected_value=rejected_value,
                margin=round(value - rejected_value, 6),
                sources="+".join(sorted({"mc", *[s for s in (label_of[nid].get("sources") or "").split("+") if s]})),
            )
        )
        return records

    async def _value(problem: Problem, prefix: PathPrefix, act: Episode, continuer: EpisodeSampler):
        """(successes, drawn, tokens, records) of an executed alternative: its own outcome when it
        answered, else ``continuations`` episodes continued after it."""
        if not act.steps[0][0].get("tool_calls"):
            outcome, _ = gold_check(checker, problem, act.answer)
            return int(bool(outcome)), 1, 0, []
        made: list[Record] = []
        successes = drawn = spent = 0
        for index, result in enumerate(await continuer.draw(prefix, config.continuations, 0)):
            rollout, new_nodes, reject = continuer.make(STAGE, prefix, result, "mc", index, f"{prefix.leaf}#{index}")
            made.extend(new_nodes)
            made.append(rollout or reject)
            if rollout is not None:
                drawn += 1
                successes += bool(rollout.outcome)
                spent += rollout.num_tokens
        return successes, drawn, spent, first_occurrences(made, set())

    async def _pair_at(problem: Problem, info: Mapping[str, Any], nid: str) -> list[Record]:
        node = tree.nodes[nid]
        above = tree.above(nid)
        context = agent.context_messages(info, tree.texts(above))
        request = GenerationRequest(
            messages=policy_messages(info, context), n=config.alternatives, temperature=config.temperature,
            top_p=config.top_p, max_tokens=config.max_tokens, seed=config.seed,
        )
        rejected_action = agent.action_of(node["text"])
        records: list[Record] = []
        candidates = []
        for index, result in enumerate(await policy.generate_each(request)):
            if (failed := failed_generation(STAGE, f"{nid}#{index}", result)) is not None:
                records.append(failed)
                continue
            action = parse_action(result.text)
            if not action["content"] and not action.get("tool_calls"):
                records.append(Reject(stage=STAGE, item=f"{nid}#{index}", reason="empty_action", detail="no text, no call"))
                continue
            if _same_action(action, rejected_action):
                continue  # the policy repeated the wrong action: no pair in it
            text = agent.step_text([action])
            alt_id = node_id(problem.problem_id, node["parent_id"], text)
            if any(c[0] == alt_id for c in candidates):
                continue
            records.append(
                Node(node_id=alt_id, problem_id=problem.problem_id, parent_id=node["parent_id"], depth=node["depth"],
                     text=text, origin="alternative", num_tokens=result.num_tokens)
            )
            candidates.append((alt_id, action))
        graded = await asyncio.gather(
            *(grade_step(context, [action], judge_config, judge, structured, alt_id) for alt_id, action in candidates)
        )
        best = None
        for (alt_id, action), (grades, rejects, cost) in zip(candidates, graded):
            records.extend(rejects)
            if not grades:
                continue
            evaluation = evaluation_of(alt_id, problem.problem_id, grades, cost, judge_config, judge.model_id,
                                       above, {"alternative_to": nid})
            records.append(evaluation)
            score = json.loads(evaluation.meta)["score"]
            if evaluation.verdict == 1 and (best is None or score > best[2]):
                best = (alt_id, action, score, evaluation)
        if best is None:
            records.append(Reject(stage=STAGE, item=nid, reason="no_better_action",
                                  detail=f"none of {len(candidates)} distinct alternatives scored >= {judge_config.good_score}"))
            return records
        alt_id, action, score, evaluation = best
        label = label_of[nid]
        rejected_value = label["value"] if label.get("value") is not None else 0.0
        chosen_value = evaluation.value
        records.append(
            Pair(
                pair_id=content_hash("pair", PAIR_KIND, node["parent_id"], alt_id, nid), problem_id=problem.problem_id,
                kind=PAIR_KIND, prompt=json.dumps(context, ensure_ascii=False), chosen=json.dumps(action, ensure_ascii=False),
                rejected=json.dumps(rejected_action, ensure_ascii=False), prefix_node_id=node["parent_id"],
                chosen_node_id=alt_id, rejected_node_id=nid, chosen_value=chosen_value, rejected_value=rejected_value,
                margin=round(chosen_value - rejected_value, 6) if chosen_value is not None else None,
                sources="+".join(sorted({"judge", *[s for s in (label.get("sources") or "").split("+") if s]})),
            )
        )
        return records

    yield from run_in_order(tasks, pairs_for)


def _same_action(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def signature(message: Mapping[str, Any]):
        calls = [(c.name, json.dumps(tool_chat.json_or_text(c.arguments), sort_keys=True)) for c in agent.tool_calls(message)]
        return calls or agent.normalize_answer(message.get("content") or "")

    return signature(a) == signature(b)
