"""Reasoning augmentation (WebSTAR): for each kept agent step, write the reasoning behind its action.

A (possibly stronger) model sees the context the agent had, the action it took and — with
``show_result`` — what came back, and writes the reasoning that leads from that context to that
action, in the agent's voice and without citing the result (which the agent could not have
seen). The original thought stays beside it (``Augmentation.original``); the SFT export puts
the written reasoning in the trained turn and keeps the original in its own column.

One request per distinct kept step; an empty or cut-off answer is a reject
(``empty_reasoning`` / ``truncated_reasoning``), a failed generation ``generation_failed``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.records import Augmentation, Problem, Record, Reject
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.llm.aio import run_in_order
from stepforge.stages.llm.base import GenerationClient, GenerationRequest
from stepforge.stages.tree import StepTree, failed_generation

STAGE = "augment"
VERSION = 1
PAYLOAD_CHARS = 2000

SYSTEM = "You write the inner reasoning of a careful tool-using agent."
TASK = (
    "[Context the agent had]\n{context}\n\n[The action it took]\n{action}\n\n{result}"
    "Write the reasoning, in the agent's first person, that leads from the context to exactly this action: what "
    "the agent knows so far, what is still missing, and why this action is the right next move. Use only what "
    "the context shows; do not mention the result. Two to five sentences, no preamble."
)
RESULT = "[What came back (for you only; the agent had not seen it)]\n{observations}\n\n"
_PREAMBLE = re.compile(r"^\s*(?:reasoning|thought|here is the reasoning)\s*[:：]\s*", re.IGNORECASE)


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Write reasoning for kept agent steps (one generation per step).")
    show_result: bool = Field(default=True, description="Show the writer the step's result (WebSTAR conditions on it).")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="Sampling temperature of the writer.")
    max_tokens: int = Field(default=256, ge=16, description="Generation budget of one reasoning.")
    seed: int = Field(default=0, description="Seed of the writer's samples.")
    max_observation_chars: int = Field(default=1200, ge=50, description="Tool results longer than this are cut in the prompt.")


def reasoning_messages(context: list[dict], step: list[dict], config: AugmentConfig) -> tuple[tuple[str, str], ...]:
    cut = config.max_observation_chars
    result = RESULT.format(observations=agent.render_transcript(step[1:], cut)) if config.show_result and step[1:] else ""
    task = TASK.format(
        context=agent.render_transcript(context, cut), action=agent.render_transcript(step[:1], cut), result=result
    )
    return (("system", SYSTEM), ("user", task))


def run(
    problems: Iterable[Problem],
    nodes: Iterable[dict],
    kept: Iterable[str],
    config: AugmentConfig,
    client: GenerationClient,
) -> Iterator[Record]:
    """An ``Augmentation`` per kept step (node id), or a reject saying why not."""
    tree = StepTree(nodes)
    wanted = sorted({nid for nid in kept if nid in tree})
    metas = {p.problem_id: agent.agent_meta(p.meta) or {} for p in problems}

    async def write(nid: str) -> list[Record]:
        node = tree.nodes[nid]
        context = agent.context_messages(metas.get(node["problem_id"], {}), tree.texts(tree.above(nid)))
        step = agent.step_messages(node["text"])
        request = GenerationRequest(
            messages=reasoning_messages(context, step, config), n=1, temperature=config.temperature,
            max_tokens=config.max_tokens, seed=config.seed,
        )
        [result] = await client.generate_each(request)
        if (failed := failed_generation(STAGE, nid, result)) is not None:
            return [failed]
        text = _PREAMBLE.sub("", result.text).strip()
        if not text:
            return [Reject(stage=STAGE, item=nid, reason="empty_reasoning", detail="the writer returned no text")]
        if result.finish_reason == "length":
            return [Reject(stage=STAGE, item=nid, reason="truncated_reasoning",
                           detail=f"the reasoning ran past max_tokens={config.max_tokens}", payload=text[:PAYLOAD_CHARS])]
        return [
            Augmentation(
                node_id=nid, problem_id=node["problem_id"], reasoning=text, original=agent.thought_of(step[0]),
                model=client.model_id, generation_key=request.sample_key(client.model_id, 0), cost_tokens=result.num_tokens,
            )
        ]

    yield from run_in_order(wanted, write)
