"""Tool-grounded checks of agent steps: what the trajectory itself proves about a step.

Per step (node) of an agent problem (``stages.agent.trajectory``), every check that applies:

- ``arguments_json``: each tool call's ``arguments`` is a JSON object (``bad_json_arguments``).
- ``known_tool``: each call names a declared tool (``unknown_tool``); skipped when the task
  declares no tools.
- ``arguments_schema``: the arguments validate against the declared tool's ``parameters``
  JSON schema (``schema_mismatch``, naming the path and the rule). A declared schema that is
  itself invalid decides nothing (``bad_tool_schema`` in the evaluation's meta).
- ``tool_error``: a message that came back (a tool result, or the environment's reply) reports
  an error (``error_patterns``, or a JSON object whose ``error`` is set or whose ``status`` is
  an error).
- ``repeated_call``: the same call (tool name and canonical arguments) was made earlier in the
  trajectory and got the same result: no new information for the cost of a step.
- ``final_answer``: a final turn's answer (``stages.agent.final_answer``) against the task's
  gold answers (``answer_match``); a final turn with no answer fails as ``no_answer``.

A step with at least one decided check gets one ``tool`` evaluation: verdict -1 if any check
failed, with the confidence of the surest failed check (``confidence``), else +1 with no
confidence (a well-formed call says little about whether it was the right call; consensus
decides how much it counts). The checks and their details are in ``meta.checks``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Origin, Problem, Record
from stepforge.stages.agent import trajectory as agent
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.stages.tree import StepTree
from stepforge.stages.verify.checks import Check, agent_row

SOURCE = "tool"  # the evidence source it writes (not a stage of its own: the verify stage runs it)
VERSION = 1

CheckName = Literal["arguments_json", "known_tool", "arguments_schema", "tool_error", "repeated_call", "final_answer"]
AnswerMatch = Literal["exact", "normalized", "cover", "math_verify"]

DEFAULT_ERROR_PATTERNS = (
    r"^\s*(?:error|exception|traceback)\b",
    r"\bno (?:effective|valid) tool call\b",
    r'"status"\s*:\s*"(?:error|failed|failure)"',
)


class AgentCheckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checks: tuple[CheckName, ...] = Field(
        default=("arguments_json", "known_tool", "arguments_schema", "tool_error", "repeated_call", "final_answer"),
        description="Which checks run (see stages/verify/agent_checks.py).",
    )
    answer_match: AnswerMatch = Field(
        default="normalized",
        description="How a final answer meets a gold answer: exact (string equality after strip), normalized "
        "(SQuAD normalisation: case, punctuation, articles, spaces), cover (the normalised gold appears as whole "
        "words in the normalised answer: for agents that answer in a sentence), math_verify (symbolic).",
    )
    error_patterns: tuple[str, ...] = Field(
        default=DEFAULT_ERROR_PATTERNS,
        description="Regular expressions (case-insensitive, multiline) that mark a returned message as an error.",
    )
    confidence: dict[str, float] = Field(
        default_factory=lambda: {"tool_error": 0.8, "repeated_call": 0.7},
        description="Confidence of a failed check by name (default 1.0): an environment error or a repeated call "
        "is weaker evidence of a wrong step than a malformed call or a wrong answer.",
    )
    origins: tuple[Origin, ...] = Field(
        default=("policy",), description="Steps of which rollouts are checked (imported trajectories are policy)."
    )


# -- single checks (also used by the importer to reject malformed calls) ----------------------------
def call_checks(call: agent.ToolCall, tools: Mapping[str, Mapping[str, Any]], wanted: Iterable[str]) -> list[Check]:
    """The arguments / tool / schema checks of one call, in that order (a later one needs the earlier)."""
    wanted = set(wanted)
    checks: list[Check] = []
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError as error:
        if "arguments_json" in wanted:
            checks.append(Check("arguments_json", "fail", "bad_json_arguments", f"{call.name}: arguments are not JSON ({error.msg} at {error.pos})"))
        return checks
    if not isinstance(arguments, dict):
        if "arguments_json" in wanted:
            checks.append(Check("arguments_json", "fail", "bad_json_arguments", f"{call.name}: arguments are {type(arguments).__name__}, not an object"))
        return checks
    if "arguments_json" in wanted:
        checks.append(Check("arguments_json", "pass", "ok", f"{call.name}: arguments parse"))
    if not tools:
        return checks
    declared = tools.get(call.name)
    if declared is None:
        if "known_tool" in wanted:
            checks.append(Check("known_tool", "fail", "unknown_tool", f"{call.name!r} is not a declared tool ({', '.join(sorted(tools))})"))
        return checks
    if "known_tool" in wanted:
        checks.append(Check("known_tool", "pass", "ok", f"{call.name} is declared"))
    if "arguments_schema" in wanted:
        checks.append(_schema_check(call.name, arguments, declared.get("parameters")))
    return checks


def _schema_check(name: str, arguments: dict, schema: Any) -> Check:
    import jsonschema

    if schema is None:
        return Check("arguments_schema", "undecided", "no_schema", f"{name} declares no parameters schema")
    try:
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        return Check("arguments_schema", "undecided", "bad_tool_schema", f"{name}: the declared schema is invalid: {error.message}")
    errors = sorted(validator_class(schema).iter_errors(arguments), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(arguments)"
        return Check("arguments_schema", "fail", "schema_mismatch", f"{name}: {where}: {first.message}")
    return Check("arguments_schema", "pass", "ok", f"{name}: arguments match the schema")


def reports_error(message: Mapping[str, Any], patterns: Iterable[re.Pattern]) -> str | None:
    """Why a returned message reads as an error, or None."""
    content = message.get("content") or ""
    try:
        parsed = json.loads(content)
    except (json.JSONDecodeError, TypeError):
        parsed = None
    if isinstance(parsed, dict):
        if parsed.get("error") not in (None, "", False, [], {}):
            return f"returned error: {str(parsed['error'])[:200]}"
        if str(parsed.get("status", "")).lower() in ("error", "failed", "failure"):
            return f"returned status {parsed['status']!r}"
        return None  # structured output without an error field: patterns would match inside documents
    for pattern in patterns:
        if match := pattern.search(content):
            return f"returned {match.group(0).strip()!r}"
    return None


def answer_matches(answer: str, golds: Iterable[str], mode: AnswerMatch, checker: AnswerChecker) -> tuple[bool | None, str]:
    golds = [g for g in golds if g]
    if mode == "math_verify":
        results = [checker.check(gold, answer) for gold in golds]
        if any(ok for ok, _ in results):
            return True, "correct"
        if any(ok is False for ok, _ in results):
            return False, "wrong"
        return None, results[0][1] if results else "no_gold"
    if mode == "exact":
        return any(answer.strip() == g.strip() for g in golds), "exact"
    said = agent.normalize_answer(answer)
    if mode == "normalized":
        return any(said == agent.normalize_answer(g) for g in golds), "normalized"
    padded = f" {said} "
    return any(agent.normalize_answer(g) and f" {agent.normalize_answer(g)} " in padded for g in golds), "cover"


# -- the stage -----------------------------------------------------------------------------------
def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: AgentCheckConfig,
    checker: AnswerChecker,
    on_problem_done: Callable[[int], None] | None = None,
) -> Iterator[Record]:
    """One ``tool`` evaluation per decided step of the agent problems' chosen rollouts."""
    problems = list(problems)
    agents = {p.problem_id: (p, agent.agent_meta(p.meta)) for p in problems}
    agents = {pid: pm for pid, pm in agents.items() if pm[1] is not None}
    tree = StepTree(nodes)
    patterns = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in config.error_patterns]
    key = config.model_dump(mode="json")
    seen: set[str] = set()
    leaves = {r["node_ids"][-1] for r in rollouts if r["origin"] in config.origins and r["node_ids"]}
    for rollout in sorted(rollouts, key=lambda r: r["rollout_id"]):
        if rollout["origin"] not in config.origins or rollout["problem_id"] not in agents:
            continue
        problem, meta = agents[rollout["problem_id"]]
        tools = agent.declared_tools(meta)
        golds = meta.get("gold_answers") or ([problem.gold_answer] if problem.gold_answer else [])
        for nid in rollout["node_ids"]:
            if nid in seen or nid not in tree:
                continue
            seen.add(nid)
            above = tree.texts(tree.above(nid))
            checks = step_checks(tree.nodes[nid]["text"], above, tools, golds, nid in leaves, config, patterns, checker)
            decided = [c for c in checks if c.decided]
            if not decided:
                continue
            failed = [c for c in decided if c.failed]
            yield Evaluation(
                evaluation_id=content_hash("eval", nid, "agent_tool", VERSION, key),
                node_id=nid, problem_id=problem.problem_id, source="tool", value=None,
                n=len(decided), successes=len(decided) - len(failed), verdict=-1 if failed else 1,
                confidence=max(config.confidence.get(c.name, 1.0) for c in failed) if failed else None,
                rationale="; ".join(f"{c.reason}: {c.detail}" for c in failed) if failed
                else f"{len(decided)} checks held ({', '.join(sorted({c.name for c in decided}))})",
                model="agent-checks", cost_tokens=0,
                meta=json.dumps({"checks": [agent_row(c) for c in checks], "failed": [c.reason for c in failed]}),
            )
    if on_problem_done:
        on_problem_done(len(problems))


def step_checks(
    text: str,
    above: list[str],
    tools: Mapping[str, Mapping[str, Any]],
    golds: list[str],
    is_leaf: bool,
    config: AgentCheckConfig,
    patterns: list[re.Pattern],
    checker: AnswerChecker,
) -> list[Check]:
    """Every configured check of one step, given the texts of the steps above it."""
    wanted = set(config.checks)
    messages = agent.step_messages(text)
    action, returned = messages[0], messages[1:]
    calls = agent.tool_calls(action)
    checks: list[Check] = []
    for call in calls:
        checks.extend(call_checks(call, tools, wanted))
    if "tool_error" in wanted and (calls or returned):
        errors = [why for m in returned if (why := reports_error(m, patterns))]
        checks.append(
            Check("tool_error", "fail", "tool_error", "; ".join(errors)) if errors
            else Check("tool_error", "pass", "ok", "no error came back")
        )
    if "repeated_call" in wanted and calls:
        earlier = _earlier_calls(above)
        result_of = _results_by_call(messages)
        for call in calls:
            signature = _signature(call)
            repeats = earlier.get(signature, [])
            mine = result_of.get(call.id) if call.id else None
            same = [r for r in repeats if r is None or mine is None or r == mine]
            if same:
                checks.append(Check("repeated_call", "fail", "repeated_call", f"{call.name} {call.arguments} was already called with the same result"))
        if not any(c.name == "repeated_call" for c in checks):
            checks.append(Check("repeated_call", "pass", "ok", "no call repeats an earlier one"))
    if "final_answer" in wanted and not calls and is_leaf and golds:
        answer = agent.final_answer(action)
        if answer is None:
            checks.append(Check("final_answer", "fail", "no_answer", "the final turn states no answer"))
        else:
            ok, how = answer_matches(answer, golds, config.answer_match, checker)
            if ok is None:
                checks.append(Check("final_answer", "undecided", how, f"{answer!r}: could not be compared"))
            else:
                checks.append(
                    Check("final_answer", "pass" if ok else "fail", "ok" if ok else "wrong_answer",
                          f"{answer[:200]!r} vs gold {golds[:3]!r} ({how})")
                )
    return checks


def _signature(call: agent.ToolCall) -> tuple[str, str]:
    try:
        canonical = json.dumps(json.loads(call.arguments), sort_keys=True, ensure_ascii=False)
    except json.JSONDecodeError:
        canonical = call.arguments.strip()
    return call.name, canonical


def _results_by_call(messages: list[dict]) -> dict[str, str]:
    return {m["tool_call_id"]: m.get("content") or "" for m in messages[1:] if m["role"] == "tool" and m.get("tool_call_id")}


def _earlier_calls(above: list[str]) -> dict[tuple[str, str], list[str | None]]:
    """Signature -> the results the same call got in the steps above (None where unknown)."""
    found: dict[tuple[str, str], list[str | None]] = {}
    for text in above:
        messages = agent.step_messages(text)
        results = _results_by_call(messages)
        for call in agent.tool_calls(messages[0]):
            found.setdefault(_signature(call), []).append(results.get(call.id) if call.id else None)
    return found
