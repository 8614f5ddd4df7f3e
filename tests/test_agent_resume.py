"""Real live episodes with the demo model (Qwen2.5-Coder-1.5B: a model that does write code; SmolLM2
does not call tools): observations are what the code prints, continuations restore the prefix's
state, and a SIGKILLed run resumes to the tables the same samples give, generating nothing twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from cli_runs import finish, run_cli, start_run, table_rows
from processes import kill_all, marked, wait_until_gone
from stepforge.schemas.records import TABLES
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.agent.episodes import AgentConfig
from test_resume import cached_samples, generation_record

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.slow

AGENT = {"max_steps": 3, "max_tokens": 480, "python": {"max_observation_chars": 300}}


def write_config(tmp: Path, name: str) -> Path:
    config = {
        "run": "resume",
        "store": str(tmp / name),
        "shard_size": 1,
        "backend": {"model": "qwen2.5-coder-1.5b", "n_ctx": 3072, "max_in_flight": 8},
        "ingest": {"source": str(FIXTURES / "gsm8k_sample.jsonl"), "format": "gsm8k", "limit": 2, "environment": "python"},
        "rollout": {"samples_per_problem": 2, "sampling": {"max_tokens": 200, "temperature": 0.8, "seed": 3}},
        "agent": AGENT,
        "labeller": "mc",
        "mc_label": {"completions_per_step": 1, "sampling": {"max_tokens": 200, "temperature": 0.8, "seed": 4}},
        "verify": {"sources": ["tool"]},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_live_episodes_observe_real_execution_and_resume_after_sigkill(tmp_path):
    mark = os.urandom(8).hex()  # inherited by everything the run starts (tests/processes.py)
    victim = start_run(write_config(tmp_path, "killed"), tmp_path, env={"STEPFORGE_TEST_RUN_MARK": mark})
    killed = tmp_path / "killed"
    deadline = time.monotonic() + 900
    while cached_samples(killed) < 3:  # a few turns in: episodes are part-way through
        assert victim.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    left = wait_until_gone(lambda: marked("STEPFORGE_TEST_RUN_MARK", mark), 30)
    kill_all(left)  # so that a failure here leaves nothing running either
    assert left == [], f"the killed run left processes behind: {left}"
    survived = cached_samples(killed)

    finish(start_run(write_config(tmp_path, "killed"), tmp_path))
    resumed = generation_record(killed)
    total = cached_samples(killed)
    assert resumed["generated"] == total - survived, "every turn generated before the kill is replayed, not redone"

    # The same samples into a fresh store (the cache copied, so nothing is generated): the tables a
    # run that was never killed makes from them.
    clean = tmp_path / "clean"
    (clean / "cache").mkdir(parents=True)
    for name in os.listdir(killed / "cache"):
        shutil.copy(killed / "cache" / name, clean / "cache" / name)
    run_cli(write_config(tmp_path, "clean"), tmp_path)
    assert generation_record(clean)["generated"] == 0
    killed_rows, clean_rows = table_rows(killed), table_rows(clean)
    for table in TABLES:
        assert killed_rows[table] == clean_rows[table], f"{table} differs after resume"
        assert len(set(killed_rows[table])) == len(killed_rows[table]), f"duplicated rows in {table}"

    rows = {t: [json.loads(r) for r in rs] for t, rs in killed_rows.items()}
    nodes = {n["node_id"]: n for n in rows["nodes"]}
    policy = [r for r in rows["rollouts"] if r["origin"] == "policy"]
    assert len(policy) == 4 and not [r for r in rows["rejects"] if r["stage"] == "rollout"]
    # Every stored observation is what executing the calls again, in a fresh session, prints.
    env = AgentConfig.model_validate(AGENT).environment("python")
    executed = 0
    for rollout in rows["rollouts"]:
        with env.reset({}) as session:
            for nid in rollout["node_ids"]:
                messages = agent.step_messages(nodes[nid]["text"])
                stored = [m["content"] for m in messages[1:] if m["role"] == "tool"]
                again = [session.execute(call).content for call in agent.tool_calls(messages[0])]
                assert stored == again, (nid, stored, again)
                executed += len(again)
    assert executed > 0, "the model made no tool call: nothing was executed"
    # Continuations hang below their prefix: a continued episode's path starts with the prefix's path.
    for rollout in rows["rollouts"]:
        if rollout["origin"] == "mc":
            prefix, path = rollout["prefix_node_id"], rollout["node_ids"]
            depth = nodes[prefix]["depth"]
            assert path[depth - 1] == prefix and len(path) > depth
    assert {e["source"] for e in rows["evaluations"]} >= {"mc", "outcome", "tool"}
