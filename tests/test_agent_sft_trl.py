"""The agent SFT export trains in TRL's SFTTrainer as is, and the turns the filter dropped get no loss.

``agent_sft_steps`` is TRL's conversational prompt-completion layout: one row per kept step, every
turn before it (dropped ones and tool results included) as ``prompt``, the kept turn as
``completion``; SFTTrainer's completion-only loss does the masking. The tables are hand-built (no
model, no pipeline stage): two trajectories with dropped steps before, between and after kept ones.
The TRL tests read the labels of the batch the trainer's own collator makes from its own processed
dataset; nothing here re-implements the masking.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pytest

from stepforge.schemas.formats import validate_conversational_prompt_completion
from stepforge.schemas.records import to_arrow
from stepforge.stages.agent.trajectory import step_text
from test_export import _problem, _rollout, _tiny_model_and_tokenizer, load_both, run_export

CONTEXT = [{"role": "system", "content": "Use the tools then answer"}, {"role": "user", "content": "What is two plus two"}]
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# node_id: (the step's messages: its assistant turn, then what came back; kept by the filter)
STEPS = {
    "ra0": ([{"role": "assistant", "content": "maybe search wikipedia", "tool_calls": [_call("c1", "search", '{"q": "sum"}')]},
             {"role": "tool", "content": "nothing found", "tool_call_id": "c1", "name": "search"}], False),
    "ra1": ([{"role": "assistant", "content": "use the calculator", "tool_calls": [_call("c2", "calc", '{"x": "2+2"}')]},
             {"role": "tool", "content": "4", "tool_call_id": "c2", "name": "calc"}], True),
    "ra2": ([{"role": "assistant", "content": "Final answer 4"}], True),
    "rb0": ([{"role": "assistant", "content": "compute with calc", "tool_calls": [_call("c1", "calc", '{"x": "2+2"}')]},
             {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "calc"}], True),
    "rb1": ([{"role": "assistant", "content": "guess five instead"}], False),
    "rb2": ([{"role": "assistant", "content": "Final answer 4"}], True),
    "rb3": ([{"role": "assistant", "content": "or five"}], False),  # after the last kept step: in no row
}
ROLLOUTS = {"ra": ["ra0", "ra1", "ra2"], "rb": ["rb0", "rb1", "rb2", "rb3"]}
REASONING = {"rb0": "Adding is safest with the calculator"}
DROPPED_TEXTS = {"maybe search wikipedia", "guess five instead"}

# A chat template with tools and tool calls that renders each message on its own, so a prompt's
# tokens are a prefix of prompt + completion; TRL passes the row's `tools` column to it.
CHAT_TEMPLATE = (
    "{%- if tools %}<|tools|> {% for tool in tools %}{{ tool.function.name }} {% endfor %}[EOS] {% endif -%}"
    "{%- for message in messages -%}"
    "<|{{ message.role }}|> {{ message.content }}"
    "{%- for call in message.tool_calls or [] %} <|call|> {{ call.function.name }} {{ call.function.arguments }}"
    "{%- endfor %} [EOS] "
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|> {% endif -%}"
)


def build_tables() -> dict[str, pa.Table]:
    """One agent task, two filtered policy trajectories, written reasoning for one kept step."""
    meta = {"kind": "agent", "agent": {"context": CONTEXT, "tools": TOOLS}}
    nodes, decisions = [], []
    for rollout_id, node_ids in ROLLOUTS.items():
        for index, node_id in enumerate(node_ids):
            messages, kept = STEPS[node_id]
            nodes.append({"node_id": node_id, "problem_id": "a1", "parent_id": node_ids[index - 1] if index else None,
                          "depth": index + 1, "text": step_text(messages), "origin": "policy", "num_tokens": 5})
            decisions.append({"rollout_id": rollout_id, "problem_id": "a1", "node_id": node_id, "step_index": index,
                              "kept": kept, "reason": "kept" if kept else "label_negative", "label": 1 if kept else -1,
                              "score": 9.0 if kept else 2.0, "confidence": 0.9, "policy": "filter@1"})
    return {
        "problems": to_arrow("problems", [{**_problem("a1", "What is two plus two", "4"), "meta": json.dumps(meta)}]),
        "rollouts": to_arrow(
            "rollouts",
            [{**_rollout(rollout_id, "a1", [], "4", True), "node_ids": node_ids, "sample_index": i, "text": "Final answer 4"}
             for i, (rollout_id, node_ids) in enumerate(ROLLOUTS.items())],
        ),
        "nodes": to_arrow("nodes", nodes),
        "labels": to_arrow("labels", []),
        "pairs": to_arrow("pairs", []),
        "step_filter": to_arrow("step_filter", decisions),
        "augmentations": to_arrow(
            "augmentations",
            [{"node_id": node_id, "problem_id": "a1", "reasoning": reasoning, "original": STEPS[node_id][0][0]["content"],
              "model": "writer", "generation_key": f"g-{node_id}", "cost_tokens": 7}
             for node_id, reasoning in REASONING.items()],
        ),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out_dir = tmp_path_factory.mktemp("agent-export")
    return out_dir, run_export(out_dir, build_tables(), formats=["agent_sft", "agent_sft_steps"])


def _turn(message: dict[str, Any]) -> tuple[str, str]:
    return message["role"], message["content"]


def test_one_row_per_kept_step_with_everything_before_it_as_prompt(exported: tuple[Path, dict[str, dict]]) -> None:
    out_dir, summaries = exported
    assert summaries["agent_sft_steps"]["format"] == "conversational_prompt_completion"
    steps = load_both(out_dir, "agent_sft_steps")
    validate_conversational_prompt_completion(steps)
    assert {"messages", "train_mask", "label", "labels", "chosen", "rejected"}.isdisjoint(steps.column_names)
    kept = [(r, i) for r, node_ids in ROLLOUTS.items() for i, n in enumerate(node_ids) if STEPS[n][1]]
    assert list(zip(steps["rollout_id"], steps["step_index"])) == kept == [("ra", 1), ("ra", 2), ("rb", 0), ("rb", 2)]
    rows = {(row["rollout_id"], row["step_index"]): row for row in steps}

    # The prompt is the task and every earlier turn as the agent saw it, the dropped ones included.
    assert [_turn(m) for m in rows["ra", 1]["prompt"]] == [_turn(m) for m in CONTEXT + STEPS["ra0"][0]]
    assert [_turn(m) for m in rows["ra", 1]["completion"]] == [_turn(STEPS["ra1"][0][0])]
    assert rows["ra", 1]["completion"][0]["tool_calls"][0]["function"] == {"name": "calc", "arguments": '{"x": "2+2"}'}
    assert [m["role"] for m in rows["rb", 2]["prompt"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert rows["rb", 2]["prompt"][4]["content"] == "guess five instead"
    assert not any(m["content"] == "or five" for row in steps for m in row["prompt"] + row["completion"])
    # Written reasoning: the completion carries it, original_content what the agent wrote.
    assert rows["rb", 0]["completion"][0]["content"] == "<think>\nAdding is safest with the calculator\n</think>\n\ncompute with calc"
    assert rows["rb", 0]["original_content"] == "compute with calc" and rows["ra", 1]["original_content"] is None
    assert (rows["ra", 1]["node_id"], rows["ra", 1]["step_label"], rows["ra", 1]["step_score"]) == ("ra1", 1, 9.0)
    assert json.loads(rows["ra", 1]["tools"]) == TOOLS and rows["ra", 1]["total_steps"] == 3

    # The same turns as agent_sft: each train_mask turn is one row, with the messages before it as prompt.
    sft = datasets.load_from_disk(str(out_dir / "agent_sft"))
    expected = [
        (row["rollout_id"], row["messages"][:position], [row["messages"][position]])
        for row in sft for position, flag in enumerate(row["train_mask"]) if flag
    ]
    assert [(row["rollout_id"], row["prompt"], row["completion"]) for row in steps] == expected
    assert summaries["agent_sft_steps"]["skipped"] == summaries["agent_sft"]["skipped"] == {}


# ---------------------------------------------------------------------------------------------
# TRL's SFTTrainer on the export, unchanged: no collator, formatting function or template markers.


def _tokenizer_texts(dataset: datasets.Dataset) -> list[str]:
    """The rendered conversations, for the word-level vocabulary of the tiny tokenizer."""
    _, renderer = _tiny_model_and_tokenizer(["x"])
    renderer.chat_template = CHAT_TEMPLATE
    return [renderer.apply_chat_template(row["prompt"] + row["completion"], tools=json.loads(row["tools"]), tokenize=False)
            for row in dataset]


def _sft_trainer(train_dataset: datasets.Dataset, out_dir: Path, **config: Any):
    """TRL's SFTTrainer on a tiny random Llama, as a user would set it up; ``config`` goes to SFTConfig."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _tiny_model_and_tokenizer(_tokenizer_texts(train_dataset))
    tokenizer.chat_template = CHAT_TEMPLATE
    args = SFTConfig(
        output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=len(train_dataset), report_to=[],
        use_cpu=True, bf16=False, activation_checkpointing=False, logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, **config,
    )
    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer), tokenizer


def _collated_batch(trainer) -> dict[str, Any]:
    """The trainer's data collator over the trainer's processed train dataset, in dataset order."""
    prepared = trainer.train_dataset
    return trainer.data_collator([prepared[i] for i in range(len(prepared))])


def _span(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]], index: int, input_ids: list[int]):
    """Token positions of ``messages[index]`` in ``input_ids``: the tokens the chat template adds for it.

    Tokenized as TRL tokenizes (``apply_chat_template`` with the row's tools); checked to be a
    prefix of the sequence the trainer built, so the positions are that sequence's.
    """

    def ids(upto: int) -> list[int]:
        return tokenizer.apply_chat_template(messages[:upto], tools=tools, tokenize=True, return_dict=True)["input_ids"]

    before, through = ids(index), ids(index + 1)
    assert index > 0 and input_ids[: len(through)] == through and through[: len(before)] == before
    return range(len(before), len(through))


@pytest.mark.slow
def test_sft_trainer_takes_a_step_and_the_dropped_turns_get_no_loss(
    exported: tuple[Path, dict[str, dict]], tmp_path: Path
) -> None:
    out_dir, _ = exported
    train_dataset = datasets.load_dataset("parquet", data_files=str(out_dir / "agent_sft_steps.parquet"), split="train")
    trainer, tokenizer = _sft_trainer(train_dataset, tmp_path / "sft-run", completion_only_loss=True)
    assert trainer.train_dataset["rollout_id"] == train_dataset["rollout_id"], "no row dropped or reordered"
    batch = _collated_batch(trainer)
    checked_dropped = 0
    for i, row in enumerate(train_dataset):
        input_ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        messages, tools = row["prompt"] + row["completion"], json.loads(row["tools"])
        completion = _span(tokenizer, messages, tools, len(row["prompt"]), input_ids)
        # Every token of the prompt, dropped turns and earlier kept turns alike, is out of the loss.
        assert all(label == -100 for label in labels[: completion.start]), row["rollout_id"]
        for index, message in enumerate(row["prompt"]):
            if message["role"] == "assistant" and message["content"] in DROPPED_TEXTS:
                dropped = _span(tokenizer, messages, tools, index, input_ids)
                assert message["content"] in tokenizer.decode([input_ids[p] for p in dropped])
                assert all(labels[p] == -100 for p in dropped), (row["rollout_id"], message["content"])
                checked_dropped += 1
        # The kept turn is trained on: after the generation prompt, its text and its end of turn.
        trained = [p for p, label in enumerate(labels) if label != -100]
        assert trained and set(trained) <= set(completion) and trained[-1] == completion[-1]
        assert all(labels[p] == input_ids[p] for p in trained)
        trained_text = tokenizer.decode([input_ids[p] for p in trained])
        assert row["completion"][0]["content"].split()[-1] in trained_text and trained_text.endswith("[EOS]")
    assert checked_dropped == 3  # ra0 in both ra rows, rb1 in the rb2 row

    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
    assert math.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.slow
def test_completion_only_loss_is_sft_trainers_default_for_the_export(
    exported: tuple[Path, dict[str, dict]], tmp_path: Path
) -> None:
    """Left unset, SFTTrainer picks completion-only loss from the prompt/completion columns; turned
    off, the dropped turns are trained on, so the check above is not vacuous."""
    out_dir, _ = exported
    train_dataset = datasets.load_dataset("parquet", data_files=str(out_dir / "agent_sft_steps.parquet"), split="train")
    explicit, _ = _sft_trainer(train_dataset, tmp_path / "explicit", completion_only_loss=True)
    default, _ = _sft_trainer(train_dataset, tmp_path / "default")
    off, tokenizer = _sft_trainer(train_dataset, tmp_path / "off", completion_only_loss=False)
    assert default.completion_only_loss is True and off.completion_only_loss is False
    assert _collated_batch(default)["labels"].equal(_collated_batch(explicit)["labels"])

    row = train_dataset[0]
    batch = _collated_batch(off)
    input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    messages = row["prompt"] + row["completion"]
    assert messages[2]["content"] in DROPPED_TEXTS
    dropped = _span(tokenizer, messages, json.loads(row["tools"]), 2, input_ids)
    assert all(labels[p] == input_ids[p] for p in dropped)
