"""Agent datasets: step-filtered SFT data, step-level preference pairs, and the filtered-out steps.

Each is an entry of ``AGENT_DATASETS`` (``registry.ExportedDataset``), exported only when the run
has agent tasks. Messages share one struct so every row has the same columns: ``role, content,
tool_calls (id, type, function{name, arguments as the model wrote them}), tool_call_id, name``.

The step-filtered SFT data comes in two layouts of the same turns: ``agent_sft``, one
conversation per trajectory with ``train_mask`` on the kept turns (for a trainer that honours a
per-turn mask), and ``agent_sft_steps``, one TRL conversational prompt-completion row per kept
turn, which TRL's ``SFTTrainer`` trains as is: its completion-only loss (on by default for
prompt-completion rows) leaves every prompt token, the dropped turns among them, out of the loss.
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
AGENT_SFT_STEP_FEATURES = Features(
    {
        "prompt": List(MESSAGE),
        "completion": List(MESSAGE),
        "tools": Value("string"),
        "original_content": Value("string"),
        "step_label": Value("int8"),
        "step_score": Value("float64"),
        "problem_id": Value("string"),
        "rollout_id": Value("string"),
        "node_id": Value("string"),
        "step_index": Value("int32"),
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


def _filtered_trajectories(
    problems: pa.Table, rollouts: pa.Table, nodes: pa.Table, decisions: pa.Table, augmentations: pa.Table,
    use_reasoning: bool,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The policy trajectories of agent tasks with at least one kept step, as the turns a trainer sees.

    Each is ``{rollout, tools, steps, turns}``: ``turns`` are the task's context and the
    trajectory's messages up to its last kept step, one dict per message with the ``message``
    (``message_row``), whether it is ``kept`` (only a kept step's assistant turn is), its step's
    ``step_index`` / ``node_id`` (None in the context), and on a step's assistant turn its
    decision's ``label`` and ``score``. With ``use_reasoning`` a kept turn whose reasoning was
    written (``augment``) carries it as its ``content`` (in ``<think>`` tags before any answer
    text) and ``original`` is what the agent wrote.
    """
    meta_of = {p["problem_id"]: agent.agent_meta(p["meta"]) for p in problems.select(["problem_id", "meta"]).to_pylist()}
    text_of = dict(zip(nodes.column("node_id").to_pylist(), nodes.column("text").to_pylist()))
    reasoning_of = dict(zip(augmentations.column("node_id").to_pylist(), augmentations.column("reasoning").to_pylist()))
    by_rollout: dict[str, dict[int, dict]] = {}
    for d in decisions.to_pylist():
        by_rollout.setdefault(d["rollout_id"], {})[d["step_index"]] = d
    trajectories, skipped = [], Counter()
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
        context = {"kept": False, "step_index": None, "node_id": None, "original": None, "label": None, "score": None}
        turns = [{**context, "message": message_row(m)} for m in info.get("context", [])]
        for index, nid in enumerate(rollout["node_ids"][: kept[-1] + 1]):
            step = [message_row(m) for m in agent.step_messages(text_of[nid])]
            decision = steps.get(index, {})
            action = step[0]
            original = None
            if decision.get("kept") and use_reasoning and nid in reasoning_of:
                original = action["content"]
                answer = agent.without_thoughts(original).strip()
                action = {**action, "content": f"<think>\n{reasoning_of[nid]}\n</think>" + (f"\n\n{answer}" if answer else "")}
            where = {"step_index": index, "node_id": nid}
            turns.append({**where, "message": action, "kept": bool(decision.get("kept")), "original": original,
                          "label": decision.get("label"), "score": decision.get("score")})
            turns += [{**context, **where, "message": m} for m in step[1:]]
        trajectories.append(
            {"rollout": rollout, "tools": json.dumps(info.get("tools", []), ensure_ascii=False), "steps": steps,
             "turns": turns}
        )
    return trajectories, skipped


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
    ``tools`` is the task's tool declarations as JSON. ``build_agent_sft_step_rows`` lays the
    same turns out for TRL's ``SFTTrainer``.
    """
    trajectories, skipped = _filtered_trajectories(problems, rollouts, nodes, decisions, augmentations, use_reasoning)
    rows = []
    for trajectory in trajectories:
        rollout, turns, steps = trajectory["rollout"], trajectory["turns"], trajectory["steps"]
        rows.append(
            {
                "messages": [t["message"] for t in turns], "train_mask": [t["kept"] for t in turns],
                "original_contents": [t["original"] for t in turns], "step_labels": [t["label"] for t in turns],
                "step_scores": [t["score"] for t in turns], "tools": trajectory["tools"],
                "problem_id": rollout["problem_id"], "rollout_id": rollout["rollout_id"],
                "kept_steps": sum(1 for d in steps.values() if d["kept"]), "total_steps": len(rollout["node_ids"]),
                "filter_policy": next(iter(steps.values()))["policy"], "model": rollout["model"],
            }
        )
    return rows, skipped


def build_agent_sft_step_rows(
    problems: pa.Table, rollouts: pa.Table, nodes: pa.Table, decisions: pa.Table, augmentations: pa.Table,
    use_reasoning: bool,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The ``agent_sft`` turns as TRL conversational prompt-completion rows: one per kept step.

    ``prompt`` is every message before the kept assistant turn, exactly as in that trajectory's
    ``agent_sft`` row (the task's context and all earlier turns, dropped ones and tool results
    included, so a wrong turn stays visible as context); ``completion`` is the kept turn alone.
    TRL's ``SFTTrainer`` puts loss on the completion only (``completion_only_loss``, on by default
    for prompt-completion data), so each kept turn is trained with the same context as under
    ``agent_sft``'s ``train_mask`` and no other turn is trained on. ``tools`` is the JSON TRL
    passes to the chat template; ``original_content`` is what the agent wrote when the completion
    carries written reasoning. Rows are in ``agent_sft`` order, then by step.
    """
    trajectories, skipped = _filtered_trajectories(problems, rollouts, nodes, decisions, augmentations, use_reasoning)
    rows = []
    for trajectory in trajectories:
        rollout, turns, steps = trajectory["rollout"], trajectory["turns"], trajectory["steps"]
        for position, turn in enumerate(turns):
            if not turn["kept"]:
                continue
            rows.append(
                {
                    "prompt": [t["message"] for t in turns[:position]], "completion": [turn["message"]],
                    "tools": trajectory["tools"], "original_content": turn["original"], "step_label": turn["label"],
                    "step_score": turn["score"], "problem_id": rollout["problem_id"],
                    "rollout_id": rollout["rollout_id"], "node_id": turn["node_id"], "step_index": turn["step_index"],
                    "total_steps": len(rollout["node_ids"]), "filter_policy": steps[turn["step_index"]]["policy"],
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


def _agent_sft_steps(inputs: ExportInputs) -> Built:
    return build_agent_sft_step_rows(
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
        consumer="trainers that honour a per-turn mask (loss only on turns flagged in train_mask); "
        "for TRL SFTTrainer as is, use agent_sft_steps",
        card="step-filtered agent trajectories (WebSTAR). Every step was graded (tool checks, a 1-10 rubric judge, "
        "imported human labels, combined by the consensus policy) and only the steps that passed the filter are "
        "trained on: `train_mask` flags them (STeP-style partial masking); the other turns stay as context. "
        "Trajectories end at their last kept step. A kept turn with written reasoning carries it in `<think>` tags; "
        "the agent's own text is in `original_contents`. `step_labels` / `step_scores` hold each turn's label and "
        "rubric score.",
    ),
    ExportedDataset(
        name="agent_sft_steps",
        format="conversational_prompt_completion",
        features=AGENT_SFT_STEP_FEATURES,
        build=_agent_sft_steps,
        applies_to="agent",
        consumer="TRL SFTTrainer as is (conversational prompt-completion; its completion-only loss trains only "
        "the kept turns)",
        card="the `agent_sft` turns, one row per kept step, in TRL's conversational prompt-completion layout: "
        "`prompt` is every message before the kept assistant turn (the task, earlier turns including the dropped "
        "ones, tool results), `completion` the kept turn. TRL's `SFTTrainer` puts loss on the completion only "
        "(`completion_only_loss`, its default for prompt-completion data), so the turns the filter dropped are "
        "context and never trained on, with no custom collator. `tools` is the JSON TRL hands to the chat "
        "template; `original_content` is the agent's own text when the completion carries written reasoning.",
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
