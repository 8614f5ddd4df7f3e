"""Agent trajectories: import, tool-grounded checks, rubric parsing, filtering, SFT masks, card and Hub layout.

Fixtures are hand-written (tests/fixtures/agent_trajectories.jsonl, agent_steps.jsonl). The flow
tests run the real stages over a real store and DuckDB; the model-backed one uses SmolLM2 on llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepforge.schemas.records import Evaluation, Problem, Reject
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.verify import agent_checks
from stepforge.stages.verify.agent_judge import AgentJudgeConfig, parse_score
from stepforge.stages.agent.agent_pairs import parse_action, policy_messages
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.ingest.sources import IngestConfig
from stepforge.stages.ingest.sources import run as ingest
from stepforge.stages.verify.judge import JudgementError

FIXTURES = Path(__file__).parent / "fixtures"
TRAJECTORIES = FIXTURES / "agent_trajectories.jsonl"
TOOLS = {t["function"]["name"]: t["function"] for t in json.loads(TRAJECTORIES.read_text().splitlines()[0])["tools"]}


def imported(invalid_calls: str = "label", source: Path = TRAJECTORIES, format: str = "agent_messages"):
    records = list(ingest(IngestConfig(source=str(source), format=format, invalid_calls=invalid_calls)))
    return records, {r.item.rsplit("#", 1)[1]: r.reason for r in records if isinstance(r, Reject)}


def test_malformed_trajectories_become_rejects_with_reasons():
    records, rejects = imported()
    assert rejects == {
        "4": "last_turn_not_assistant", "5": "missing_tool_result", "6": "label_not_assistant",
        "7": "orphan_tool_result", "8": "wrong_type", "9": "unknown_role",
    }
    rollouts = [r for r in records if r.TABLE == "rollouts"]
    assert len(rollouts) == 4  # the four well-formed rows are kept, including the ones with bad calls


def test_invalid_calls_reject_mode_names_the_check():
    _, rejects = imported("reject")
    assert rejects["1"] == "bad_json_arguments"
    assert rejects["2"] == "unknown_tool"
    assert rejects["3"] == "schema_mismatch"


def test_import_builds_steps_context_and_human_labels():
    records, _ = imported()
    problems = {p.problem_id: p for p in records if isinstance(p, Problem)}
    first = next(p for p in problems.values() if "spiders" in p.question)
    meta = agent.agent_meta(first.meta)
    assert [m["role"] for m in meta["context"]] == ["system", "user"]
    assert meta["gold_answers"] == ["24"] and first.gold_answer == "24"
    rollout = next(r for r in records if r.TABLE == "rollouts" and r.final_answer == "24")
    nodes = {n.node_id: n for n in records if n.TABLE == "nodes"}
    steps = [agent.step_messages(nodes[nid].text) for nid in rollout.node_ids]
    # a step is the assistant turn plus what came back, in order
    assert [[m["role"] for m in step] for step in steps] == [["assistant", "tool"], ["assistant", "tool"], ["assistant"]]
    assert rollout.outcome is True
    humans = [e for e in records if isinstance(e, Evaluation) and e.source == "human" and e.node_id in rollout.node_ids]
    assert sorted(e.verdict for e in humans) == [1, 1, 1]
    # context of the last step: task + both earlier steps, exactly as the agent saw them
    context = agent.context_messages(meta, [nodes[n].text for n in rollout.node_ids[:-1]])
    assert [m["role"] for m in context] == ["system", "user", "assistant", "tool", "assistant", "tool"]


def test_generic_step_logs_become_conversations():
    records, rejects = imported(source=FIXTURES / "agent_steps.jsonl", format="agent_steps")
    assert rejects == {"2": "missing_field"}
    nodes = {n.node_id: n for n in records if n.TABLE == "nodes"}
    rollouts = [r for r in records if r.TABLE == "rollouts"]
    tool_run = next(r for r in rollouts if r.final_answer == "Tokyo")
    first = agent.step_messages(nodes[tool_run.node_ids[0]].text)
    assert first[0]["tool_calls"][0]["function"] == {"name": "search", "arguments": '{"query": "capital of Japan"}'}
    assert first[1] == {"role": "tool", "tool_call_id": "call_0", "name": "search", "content": "Tokyo is the capital of Japan."}
    click = next(r for r in rollouts if r is not tool_run)
    action = agent.step_messages(nodes[click.node_ids[0]].text)
    assert action[0]["content"].endswith("Action: click [gear]") and action[1]["content"] == "Observation: Settings page"


@pytest.mark.parametrize(
    ("name", "arguments", "failed"),
    [
        ("search", '{"query": "x"}', []),
        ("search", '{"query": ""}', ["schema_mismatch"]),  # minLength
        ("search", '{"query": "x", "page": 2}', ["schema_mismatch"]),  # additionalProperties
        ("search", '{"query": 3}', ["schema_mismatch"]),
        ("search", '{"query": "x"', ["bad_json_arguments"]),
        ("search", "[1, 2]", ["bad_json_arguments"]),
        ("browse", '{"url": "u"}', ["unknown_tool"]),
    ],
)
def test_calls_are_checked_against_the_declared_tools(name, arguments, failed):
    checks = agent_checks.call_checks(agent.ToolCall("c", name, arguments), TOOLS, agent_checks.AgentCheckConfig().checks)
    assert [c.reason for c in checks if c.status == "fail"] == failed
    if failed == ["schema_mismatch"]:
        assert next(c for c in checks if c.status == "fail").detail.startswith("search: ")


def test_schema_violation_names_the_path():
    [*_, schema] = agent_checks.call_checks(agent.ToolCall("c", "search", '{"query": 3}'), TOOLS, ["arguments_json", "known_tool", "arguments_schema"])
    assert schema.detail.startswith("search: query: 3 is not of type 'string'")


def test_tool_checks_label_steps_of_the_imported_trajectories():
    records, _ = imported()
    problems = [r for r in records if isinstance(r, Problem)]
    nodes = [r.model_dump() for r in records if r.TABLE == "nodes"]
    rollouts = {r.generation_key: r.model_dump() for r in records if r.TABLE == "rollouts"}
    evaluations = list(agent_checks.run(problems, list(rollouts.values()), nodes, agent_checks.AgentCheckConfig(), AnswerChecker()))
    failed = {e.node_id: json.loads(e.meta)["failed"] for e in evaluations}
    by_id = {json.loads(line)["id"]: json.loads(line) for line in TRAJECTORIES.read_text().splitlines()}
    paths = {}
    for rollout in rollouts.values():
        answer = rollout["final_answer"]
        key = next(i for i, row in by_id.items() if row.get("messages") and isinstance(row["messages"], list)
                   and row["messages"][-1].get("content", "").endswith(f"<answer>{answer}</answer>")
                   and len(rollout["node_ids"]) == sum(m["role"] == "assistant" for m in row["messages"]))
        paths[key] = [failed.get(nid) for nid in rollout["node_ids"]]
    assert paths["good-1"] == [[], [], []]
    assert paths["bad-json-1"] == [["bad_json_arguments", "tool_error"], [], ["wrong_answer"]]
    assert paths["unknown-tool-1"] == [["unknown_tool", "tool_error"], [], ["repeated_call"], [], []]
    assert paths["schema-1"] == [["schema_mismatch"], []]
    repeated = next(e for e in evaluations if json.loads(e.meta)["failed"] == ["repeated_call"])
    assert repeated.verdict == -1 and repeated.confidence == 0.7  # weaker evidence than a malformed call


def test_answer_matching_modes():
    checker = AnswerChecker()
    assert agent_checks.answer_matches("The Eiffel Tower.", ["eiffel tower"], "normalized", checker)[0] is True
    assert agent_checks.answer_matches("No, it is Australian", ["no"], "normalized", checker)[0] is False
    assert agent_checks.answer_matches("No, it is Australian", ["no"], "cover", checker)[0] is True
    assert agent_checks.answer_matches("Nothing", ["no"], "cover", checker)[0] is False  # whole words only
    assert agent_checks.answer_matches("1/2", ["0.5"], "math_verify", checker)[0] is True
    assert agent.final_answer({"role": "assistant", "content": "<think>maybe <answer>x</answer></think> <answer>Paris</answer>"}) == "Paris"


@pytest.mark.parametrize(
    ("text", "score"),
    [('{"rationale": "ok", "score": 8}', 8.0), ("It helps.\nScore: 3", 3.0), ("I'd give it 9/10.", 9.0)],
)
def test_rubric_scores_are_read(text, score):
    assert parse_score(text).value == score


@pytest.mark.parametrize(
    ("text", "reason"),
    [('{"score": 11}', "score_out_of_range"), ("no idea", "no_score"), ("", "empty_judgement"), ('{"score": "high"}', "no_score")],
)
def test_unreadable_rubric_answers_are_rejects(text, reason):
    with pytest.raises(JudgementError) as error:
        parse_score(text)
    assert error.value.reason == reason


def test_scores_map_to_ternary_labels():
    config = AgentJudgeConfig()
    assert [config.verdict(s) for s in (1, 3, 4, 6, 7, 10)] == [-1, -1, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        AgentJudgeConfig(good_score=4, bad_score=4)


def test_alternative_actions_are_parsed_and_context_is_rendered_for_any_template():
    action = parse_action('Let me look. <tool_call>{"name": "search", "arguments": {"query": "Tolkien"}}</tool_call>')
    assert action["content"] == "Let me look."
    assert action["tool_calls"][0]["function"] == {"name": "search", "arguments": '{"query": "Tolkien"}'}
    assert "tool_calls" not in parse_action("<answer>1973</answer>")
    info = {"tools": [{"type": "function", "function": TOOLS["search"]}]}
    context = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "search", "arguments": '{"query": "a"}'}}]},
               {"role": "tool", "tool_call_id": "1", "content": "R"}]
    turns = policy_messages(info, context)
    assert [role for role, _ in turns] == ["system", "user", "assistant", "user"]
    assert '"name": "search"' in turns[0][1] and "<tool_call>" in turns[2][1] and "<tool_response>\nR" in turns[3][1]


# -- the flow: filter, SFT mask, card, Hub layout ------------------------------------------------
def agent_config(tmp_path: Path, **extra) -> dict:
    return {
        "run": "agents", "store": str(tmp_path / "store"), "shard_size": 8,
        "ingest": {"source": str(TRAJECTORIES), "format": "agent_messages"},
        "rollout": {"samples_per_problem": 0}, "labeller": "none",
        "verify": {"sources": ["tool"]},
        "consensus": {"policy": "tool", "human_override": False},
        "filter": {"min_label": 1, "min_score": None},
        **extra,
    }


def run_chains(config: dict):
    from stepforge.flows.config import RunConfig
    from stepforge.flows.runtime import RunContext, export_run, ingest_shards, record_run, run_chain, shard_traffic

    ctx = RunContext(RunConfig.model_validate(config))
    shards, rejects = ingest_shards(ctx)
    chains = [run_chain(ctx, shard) for shard in shards]
    exports = export_run(ctx, chains, rejects)
    from dataclasses import asdict

    record_run(ctx, "completed", exports, shard_traffic([{k: asdict(v) for k, v in c.items()} for c in chains]))
    return ctx, chains, {e["dataset"]: e for e in exports}


def test_filtered_sft_trains_only_on_kept_turns(tmp_path):
    from datasets import load_from_disk

    from stepforge.flows.runtime import chain_shard_keys, ingest_shards
    from stepforge.storage.catalog import Catalog

    ctx, chains, exports = run_chains(agent_config(tmp_path))
    assert set(exports) == {"agent_sft", "agent_sft_steps", "agent_dpo", "agent_step_rejects"}  # math formats do not apply
    sft = load_from_disk(exports["agent_sft"]["path"])
    with Catalog(ctx.store.root) as catalog:
        catalog.refresh(run="agents", shards=chain_shard_keys(chains, ingest_shards(ctx)[1]))
        decisions = catalog.query("select rollout_id, step_index, kept, reason from step_filter").to_pylist()
    kept = {(d["rollout_id"], d["step_index"]) for d in decisions if d["kept"]}
    for row in sft:
        assistant_turns = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        trained = [k for k, i in enumerate(assistant_turns) if row["train_mask"][i]]
        assert trained == sorted(step for rollout, step in kept if rollout == row["rollout_id"])
        assert all(not flag for i, flag in enumerate(row["train_mask"]) if i not in assistant_turns)
        assert row["train_mask"][assistant_turns[-1]]  # the row ends at its last kept step
    # the bad-JSON trajectory: step 0 fails its checks, step 2 answers wrongly; only step 1 is trained on
    bad = next(r for r in sft if any(m["tool_calls"] and m["tool_calls"][0]["function"]["arguments"].endswith('legs"') for m in r["messages"]))
    assert [m["role"] for m in bad["messages"]] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert bad["train_mask"] == [False, False, False, False, True, False]
    rejects = load_from_disk(exports["agent_step_rejects"]["path"])
    assert sorted(rejects["filter_reason"]) == sorted(d["reason"] for d in decisions if not d["kept"])
    assert len(rejects) + sum(sft["kept_steps"]) == len(decisions)


def test_dataset_card_counts_equal_the_catalog_and_the_export_loads_back(tmp_path):
    import datasets
    from typer.testing import CliRunner

    from stepforge.flows.cli import app
    from stepforge.flows.runtime import chain_shard_keys, ingest_shards
    from stepforge.storage.catalog import Catalog

    ctx, chains, exports = run_chains(agent_config(tmp_path))
    card = (Path(exports["agent_sft"]["path"]).parent / "README.md").read_text()
    with Catalog(ctx.store.root) as catalog:
        catalog.refresh(run="agents", shards=chain_shard_keys(chains, ingest_shards(ctx)[1]))
        labels = {r["label"]: r["n"] for r in catalog.query("select label, count(*) n from labels group by 1").to_pylist()}
        rejects = catalog.query("select stage, reason, count(*) n from rejects group by all").to_pylist()
        tables = {t: catalog.query(f"select count(*) n from {t}").to_pylist()[0]["n"] for t in ("problems", "nodes", "evaluations")}
    for label, name in ((1, "+1"), (0, "0"), (-1, "-1")):
        assert f"| {name} | {labels.get(label, 0)} |" in card
    assert rejects and all(f"| {r['stage']} | `{r['reason']}` | {r['n']} |" in card for r in rejects)
    assert all(f"{table} {n}" in card for table, n in tables.items())
    assert "tool@1" in card and '"format": "agent_messages"' in card

    target = tmp_path / "hub"
    result = CliRunner().invoke(app, ["export", "--store", str(ctx.store.root), "--run", "agents", "--push-to-hub", f"file://{target}"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "agent_dpo.parquet", "agent_sft.parquet", "agent_sft_steps.parquet", "agent_step_rejects.parquet",
    ]
    loaded = datasets.load_dataset(str(target), "agent_sft", split="train")
    assert loaded.num_rows == exports["agent_sft"]["rows"] and "train_mask" in loaded.column_names
    assert loaded[0]["messages"][0]["role"] == "system"


def test_report_command_writes_html(tmp_path):
    from typer.testing import CliRunner

    from stepforge.flows.cli import app

    ctx, _, _ = run_chains(agent_config(tmp_path))
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", "agents", "--store", str(ctx.store.root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert 'id="plot-rejects"' in html and "last_turn_not_assistant" in html


@pytest.mark.slow
def test_judge_reasoning_and_pairs_with_a_real_model(tmp_path, smollm_backend):
    """SmolLM2 on llama.cpp grades every step, writes reasoning for kept steps and samples alternatives."""
    config = agent_config(
        tmp_path,
        backend={"kind": "llamacpp", "model": "smollm2-135m", "n_ctx": 4096},
        verify={"sources": ["tool", "judge"], "agent_judge": {"max_tokens": 96, "max_observation_chars": 200}},
        consensus={"policy": "vote", "human_override": False},
        filter={"min_label": 1, "min_score": None},
        augment={"enabled": True, "max_tokens": 64},
        agent_pairs={"enabled": True, "alternatives": 2, "max_tokens": 48},
    )
    ctx, chains, exports = run_chains(config)
    store = ctx.store
    verify = store.read_rows("evaluations", [c["verification"] for c in chains])
    judged = [e for e in verify if e["source"] == "judge"]
    judge_rejects = [r for r in store.read_rows("rejects", [c["verification"] for c in chains]) if r["stage"] == "judge"]
    nodes = store.read_rows("nodes", [c["problems"] for c in chains])
    assert len(judged) + len({r["item"].split("#")[0] for r in judge_rejects}) >= len(nodes)
    assert all(1 <= json.loads(e["meta"])["score"] <= 10 and e["verdict"] in (-1, 0, 1) for e in judged)
    filtered = [c["agent_steps"] for c in chains]
    decisions = store.read_rows("step_filter", filtered)
    written = store.read_rows("augmentations", filtered)
    filter_rejects = store.read_rows("rejects", filtered)
    kept = {d["node_id"] for d in decisions if d["kept"]}
    assert kept and {a["node_id"] for a in written} | {r["item"] for r in filter_rejects if r["stage"] == "augment"} == kept
    assert all(a["reasoning"].strip() and a["model"].startswith("smollm2") for a in written)
    wrong = {d["node_id"] for d in decisions if d["label"] == -1}
    alternatives = [n for n in store.read_rows("nodes", filtered) if n["origin"] == "alternative"]
    pairs = store.read_rows("pairs", filtered)
    pair_rejects = [r for r in filter_rejects if r["stage"] == "agent_pairs" and r["reason"] == "no_better_action"]
    assert {p["rejected_node_id"] for p in pairs} | {r["item"] for r in pair_rejects} <= wrong
    assert alternatives and all(n["parent_id"] in {m["parent_id"] for m in nodes if m["node_id"] in wrong} for n in alternatives)
    assert exports["agent_dpo"]["rows"] == len(pairs)
    assert Path(exports["agent_sft"]["parquet_path"]).exists()
    # a second run finds every shard complete: it loads no model and generates nothing
    again, _, _ = run_chains(config)
    assert not again.clients, "no model loaded: neither the policy nor the judge"
