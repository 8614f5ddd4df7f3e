"""Agent datasets: step-filtered SFT conversations, step-level preference pairs, and the filtered-out steps.

Each is an entry of ``AGENT_DATASETS`` (``registry.ExportedDataset``), exported only when the run
has agent tasks. Messages share one struct so every row has the same columns: ``role, content,
tool_calls (id, type, function{name, arguments as the model wrote them}), tool_call_id, name``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
from datasets import Features, List, Value

from stepforge.stages.agent import trajectory as agent
from stepforge.stages.export.registry import Built, ExportedDataset, ExportInputs

MESSAGE = {
    "role": Value("string"),
    "content": Value("string"),
    "tool_calls": List(
        {"id": Value("string"), "type": Value("string"),
         "function": {"name": Value("string"), "arguments": Value("string")}}
    ),
    "tool_call_id": Value("string"),
    "name": Value("string"),
}
AGENT_SFT_FEATURES = Features(
    {
        "messages": List(MESSAGE),
        "train_mask": List(Value("bool")),
        "original_contents": List(Value("string")),
        "step_labels": List(Value("int8")),
        "step_scores": List(Value("float64")),
        "tools": Value("string"),
        "problem_id": Value("string"),
        "rollout_id": Value("string"),
        "kept_steps": Value("int32"),
        "total_steps": Value("int32"),
        "filter_policy": Value("string"),
        "model": Value("string"),
    }
)
AGENT_DPO_FEATURES = Features(
    {
        "prompt": List(MESSAGE),
        "chosen": List(MESSAGE),
        "rejected": List(MESSAGE),
        "pair_id": Value("string"),
        "problem_id": Value("string"),
        "kind": Value("string"),
        "margin": Value("float64"),
        "chosen_value": Value("float64"),
        "rejected_value": Value("float64"),
        "sources": Value("string"),
    }
)
AGENT_REJECT_FEATURES = Features(
    {
        "action": Value("string"),
        "filter_reason": Value("string"),
        "problem_id": Value("string"),
        "rollout_id": Value("string"),
        "node_id": Value("string"),
        "step_index": Value("int32"),
        "step_label": Value("int8"),
        "score": Value("float64"),
        "filter_policy": Value("string"),
    }
)


def message_row(message: dict[str, Any]) -> dict[str, Any]:
    """A stored message in the one struct every exported message has."""
    return {
        "role": message["role"],
        "content": message.get("content") or "",
        "tool_calls": [
            {"id": call.get("id"), "type": call.get("type", "function"),
             "function": {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}}
            for call in message.get("tool_calls") or []
        ],
        "tool_call_id": message.get("tool_call_id"),
        "name": message.get("name"),
    }


def build_agent_sft_rows(
    problems: pa.Table, rollouts: pa.Table, nodes: pa.Table, decisions: pa.Table, augmentations: pa.Table,
    use_reasoning: bool,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One conversation per policy trajectory of an agent task with at least one kept step.

    ``messages`` are the task's context and the trajectory's turns up to its last kept step
    (later turns are neither trained on nor context for a trained turn); ``train_mask`` flags the
    kept assistant turns, the only ones a trainer should put loss on (STeP-style partial masking:
    a wrong turn stays visible as context, untrained). With ``use_reasoning`` a kept turn whose
    reasoning was written (``augment``) carries it as its ``content`` (in ``<think>`` tags before
    any answer text); ``original_contents`` keeps what the agent wrote. ``step_labels`` /
    ``step_scores`` give each message's consensus label and rubric score (null where none);
    ``tools`` is the task's tool declarations as JSON.
    """
    meta_of = {p["problem_id"]: agent.agent_meta(p["meta"]) for p in problems.select(["problem_id", "meta"]).to_pylist()}
    text_of = dict(zip(nodes.column("node_id").to_pylist(), nodes.column("text").to_pylist()))
    reasoning_of = dict(zip(augmentations.column("node_id").to_pylist(), augmentations.column("reasoning").to_pylist()))
    by_rollout: dict[str, dict[int, dict]] = {}
    for d in decisions.to_pylist():
        by_rollout.setdefault(d["rollout_id"], {})[d["step_index"]] = d
    rows, skipped = [], Counter()
    for rollout in sorted(rollouts.to_pylist(), key=lambda r: (r["problem_id"], r["sample_index"], r["rollout_id"])):
        info = meta_of.get(rollout["problem_id"])
        if rollout["origin"] != "policy" or info is None:
            continue
        steps = by_rollout.get(rollout["rollout_id"])
        if not steps:
            skipped["not_filtered"] += 1
            continue
        kept = [i for i, d in sorted(steps.items()) if d["kept"]]
        if not kept:
            skipped["no_kept_steps"] += 1
            continue
        if any(nid not in text_of for nid in rollout["node_ids"][: kept[-1] + 1]):
            skipped["missing_node"] += 1
            continue
        messages = [message_row(m) for m in info.get("context", [])]
        mask = [False] * len(messages)
        originals: list[str | None] = [None] * len(messages)
        labels: list[int | None] = [None] * len(messages)
        scores: list[float | None] = [None] * len(messages)
        for index, nid in enumerate(rollout["node_ids"][: kept[-1] + 1]):
            step = [message_row(m) for m in agent.step_messages(text_of[nid])]
            decision = steps.get(index, {})
            action = step[0]
            original = None
            if decision.get("kept") and use_reasoning and nid in reasoning_of:
                original = action["content"]
                answer = agent.without_thoughts(original).strip()
                action = {**action, "content": f"<think>\n{reasoning_of[nid]}\n</think>" + (f"\n\n{answer}" if answer else "")}
            messages += [action, *step[1:]]
            mask += [bool(decision.get("kept"))] + [False] * (len(step) - 1)
            originals += [original] + [None] * (len(step) - 1)
            labels += [decision.get("label")] + [None] * (len(step) - 1)
            scores += [decision.get("score")] + [None] * (len(step) - 1)
        rows.append(
            {
                "messages": messages, "train_mask": mask, "original_contents": originals, "step_labels": labels,
                "step_scores": scores, "tools": json.dumps(info.get("tools", []), ensure_ascii=False),
                "problem_id": rollout["problem_id"], "rollout_id": rollout["rollout_id"], "kept_steps": len(kept),
                "total_steps": len(rollout["node_ids"]), "filter_policy": next(iter(steps.values()))["policy"],
                "model": rollout["model"],
            }
        )
    return rows, skipped


def build_agent_dpo_rows(pairs: pa.Table) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The ``agent_step`` pairs: ``prompt`` the context messages, ``chosen`` / ``rejected`` one assistant message each."""
    rows, skipped = [], Counter()
    for pair in sorted(pairs.to_pylist(), key=lambda p: (p["problem_id"], p["pair_id"])):
        if pair["kind"] != "agent_step":
            continue
        chosen, rejected = json.loads(pair["chosen"]), json.loads(pair["rejected"])
        if chosen == rejected:
            skipped["identical_sides"] += 1
            continue
        rows.append(
            {
                "prompt": [message_row(m) for m in json.loads(pair["prompt"])], "chosen": [message_row(chosen)],
                "rejected": [message_row(rejected)],
                **{k: pair[k] for k in ("pair_id", "problem_id", "kind", "margin", "chosen_value", "rejected_value", "sources")},
            }
        )
    return rows, skipped


def build_agent_reject_rows(decisions: pa.Table, nodes: pa.Table) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Every step the filter dropped, with ``filter_reason``, its label and score, and its action as JSON."""
    text_of = dict(zip(nodes.column("node_id").to_pylist(), nodes.column("text").to_pylist()))
    rows, skipped = [], Counter()
    for d in sorted(decisions.to_pylist(), key=lambda d: (d["problem_id"], d["rollout_id"], d["step_index"])):
        if d["kept"]:
            continue
        if d["node_id"] not in text_of:
            skipped["missing_node"] += 1
            continue
        rows.append(
            {
                "action": json.dumps(agent.action_of(text_of[d["node_id"]]), ensure_ascii=False),
                "filter_reason": d["reason"], "problem_id": d["problem_id"], "rollout_id": d["rollout_id"],
                "node_id": d["node_id"], "step_index": d["step_index"], "step_label": d["label"], "score": d["score"],
                "filter_policy": d["policy"],
            }
        )
    return rows, skipped


# ---------------------------------------------------------------------------------------------
# Registry entries (see ``registry``): all that makes each agent dataset, in one place.


def _agent_sft(inputs: ExportInputs) -> Built:
    return build_agent_sft_rows(
        inputs.problems, inputs.rollouts, inputs.nodes, inputs.step_filter, inputs.augmentations,
        inputs.config.use_reasoning,
    )


AGENT_DATASETS = (
    ExportedDataset(
        name="agent_sft",
        format="conversational_sft",
        features=AGENT_SFT_FEATURES,
        build=_agent_sft,
        applies_to="agent",
        consumer="TRL SFTTrainer (conversational messages; put loss only on turns flagged in train_mask)",
        card="step-filtered agent trajectories (WebSTAR). Every step was graded (tool checks, a 1-10 rubric judge, "
        "imported human labels, combined by the consensus policy) and only the steps that passed the filter are "
        "trained on: `train_mask` flags them (STeP-style partial masking); the other turns stay as context. "
        "Trajectories end at their last kept step. A kept turn with written reasoning carries it in `<think>` tags; "
        "the agent's own text is in `original_contents`. `step_labels` / `step_scores` hold each turn's label and "
        "rubric score.",
    ),
    ExportedDataset(
        name="agent_dpo",
        format="conversational_preference",
        features=AGENT_DPO_FEATURES,
        build=lambda inputs: build_agent_dpo_rows(inputs.agent_pairs),
        applies_to="agent",
        consumer="TRL DPOTrainer (conversational preference, explicit prompt)",
        card="at a step labelled -1, the wrong action (`rejected`) vs an action sampled from the same context that "
        "the rubric judge scored well (`chosen`).",
    ),
    ExportedDataset(
        name="agent_step_rejects",
        format="step_decisions",
        features=AGENT_REJECT_FEATURES,
        build=lambda inputs: build_agent_reject_rows(inputs.step_filter, inputs.nodes),
        applies_to="agent",
        consumer="inspection: the agent steps the filter dropped, with the reason",
        card="every step the filter dropped, with `filter_reason`.",
    ),
)
