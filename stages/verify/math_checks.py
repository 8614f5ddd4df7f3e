"""Tool-grounded verification (GroundedPRM, Safe): check what a step claims with tools, not opinions.

Three checkers, each recording its evidence (the claim as written, the value computed):

- ``arithmetic``: calculations in the step's text — GSM8K ``<<a*b=c>>`` annotations, plain
  ``18 - 6 = 12``, LaTeX ``\\frac{1}{3}\\times 18 = 6`` — recomputed exactly with sympy
  (``stages.verify.claims``).
- ``final_answer``: a step that states the final answer (``\\boxed{}``, "The answer is"),
  checked against the problem's gold answer with math-verify.
- ``code``: Python code blocks of the step run in the sandbox (``stages.tools.sandbox``) after the
  code blocks of the steps above it (so their variables exist), and what the block prints is
  compared with the ```` ```output ```` block the step claims it printed. Code that raises is a
  failed check; a sandbox that stops the code (timeout, memory, a blocked call) decides
  nothing and becomes a reject row with the reason.

A step with at least one decided check gets one ``tool`` evaluation: verdict -1 if any check
failed (confidence 1: a false calculation is wrong whatever else is true of the step), +1 if
all held (no confidence: right arithmetic says little about the reasoning; consensus decides
how much it counts). A step with nothing checkable gets no evaluation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field

from stepforge.schemas.ids import content_hash
from stepforge.schemas.records import Evaluation, Origin, Problem, Record, Reject
from stepforge.stages.rollout.answers import AnswerChecker, extract_final_answer
from stepforge.stages.verify.checks import FROM_CLAIM_STATUS, Check, math_row
from stepforge.stages.verify.claims import check_step
from stepforge.stages.tools.sandbox import SandboxLimits, run_python
from stepforge.stages.tree import StepTree

SOURCE = "tool"  # the evidence source it writes (not a stage of its own: the verify stage runs it)
VERSION = 1
MAX_CHECKS_IN_META = 40
PAYLOAD_CHARS = 2000

_CODE_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# Matched with .match(text, pos) right after a code block: it anchors at pos (\A would mean 0).
_OUTPUT_BLOCK = re.compile(r"\s*```(?:output|text)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")


class ToolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    arithmetic: bool = Field(default=True, description="Recompute the step's calculations with sympy.")
    final_answer: bool = Field(
        default=True, description="Check a final answer stated in a step against the gold answer (math-verify)."
    )
    code: bool = Field(
        default=True, description="Run the step's Python code blocks in the sandbox and compare what they print."
    )
    origins: tuple[Origin, ...] = Field(
        default=("policy", "mc", "mcts"), description="Nodes of which origins are checked (checks are cheap: all)."
    )
    sandbox: SandboxLimits = Field(default_factory=SandboxLimits, description="Limits of each code run.")
    code_workers: int = Field(default=2, ge=1, description="Sandboxed code runs at once.")


_CLAIM_REASON = {"pass": "ok", "fail": "wrong_value", "undecided": "uncheckable"}


def arithmetic_checks(text: str) -> list[Check]:
    """A check per calculation of the step (``annotation`` / ``equation`` / ``latex``), recomputed with sympy."""
    checks = []
    for c in check_step(text):
        status = FROM_CLAIM_STATUS[c.status]
        checks.append(Check(c.claim.kind, status, _CLAIM_REASON[status], c.detail, text=c.claim.text, computed=c.computed))
    return checks


def code_blocks(text: str) -> list[tuple[str, str | None]]:
    """Each Python block of ``text`` with the output block right after it, if the step shows one."""
    blocks = []
    for match in _CODE_BLOCK.finditer(text):
        shown = _OUTPUT_BLOCK.match(text, match.end())
        blocks.append((match.group(1), shown.group(1) if shown else None))
    return blocks


def outputs_match(printed: str, shown: str) -> bool:
    """Printed vs claimed output: numbers compare with a relative tolerance, text exactly (whitespace folded)."""
    a, b = printed.split(), shown.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if _NUMBER.match(x) and _NUMBER.match(y):
            fx, fy = float(x), float(y)
            if abs(fx - fy) > 1e-6 * max(1.0, abs(fx), abs(fy)):
                return False
        elif x != y:
            return False
    return True


_MARKER = "__stepforge_step_code_starts__"


def code_check(earlier_code: list[str], code: str, shown: str | None, limits: SandboxLimits) -> tuple[Check, Reject | None]:
    """Run ``code`` after the path's earlier blocks; a failed check if it raises or prints other than ``shown``."""
    program = "\n".join([*earlier_code, f"print({_MARKER!r})", code])
    result = run_python(program, limits)
    summary = code.strip().splitlines()[0][:120] if code.strip() else "(empty block)"
    if result.status not in ("ok", "error"):
        reason = f"sandbox_{result.status}"
        check = Check("code", "undecided", reason, f"sandbox {result.status}: {result.detail}", text=summary)
        return check, Reject(stage=SOURCE, item="", reason=reason, detail=result.detail, payload=code[:PAYLOAD_CHARS])
    head, marker, own_output = result.stdout.partition(_MARKER + "\n")
    if not marker:
        detail = f"an earlier step's code failed: {result.detail}"
        return Check("code", "undecided", "earlier_code_failed", detail, text=summary), None
    if result.status == "error":
        return Check("code", "fail", "code_raises", f"the code raises {result.detail}", text=summary), None
    printed = own_output.strip()[:200]
    if shown is None:
        return Check("code", "undecided", "no_claimed_output", "no output claimed to compare", summary, printed), None
    if outputs_match(own_output, shown):
        return Check("code", "pass", "ok", "printed what the step shows", summary, printed), None
    detail = f"prints {own_output.strip()[:80]!r}, the step shows {shown.strip()[:80]!r}"
    return Check("code", "fail", "wrong_output", detail, summary, printed), None


def run(
    problems: Iterable[Problem],
    rollouts: Iterable[dict],
    nodes: Iterable[dict],
    config: ToolConfig,
    checker: AnswerChecker,
    on_problem_done: Callable[[int], None] | None = None,
) -> Iterator[Record]:
    """A ``tool`` evaluation per node with a decided check, and a reject per sandbox that stopped code."""
    problems = list(problems)
    gold = {p.problem_id: p.gold_answer for p in problems}
    tree = StepTree(n for n in nodes if n["problem_id"] in gold)
    node_by_id = tree.nodes
    leaves = {r["node_ids"][-1] for r in rollouts if r["node_ids"] and r["problem_id"] in gold}
    checked = sorted(nid for nid, n in node_by_id.items() if n["origin"] in config.origins)

    checks: dict[str, list[Check]] = {nid: [] for nid in checked}
    rejects: dict[str, list[Reject]] = {nid: [] for nid in checked}
    if config.arithmetic:
        for nid in checked:
            checks[nid].extend(arithmetic_checks(node_by_id[nid]["text"]))
    if config.final_answer:
        stated = [(nid, extract_final_answer(node_by_id[nid]["text"])) for nid in checked if nid in leaves]
        stated = [(nid, answer) for nid, answer in stated if answer is not None]
        results = checker.check_many([(gold[node_by_id[nid]["problem_id"]], answer) for nid, answer in stated])
        for (nid, answer), (outcome, reason) in zip(stated, results):
            status = "undecided" if outcome is None else ("pass" if outcome else "fail")
            gold_answer = gold[node_by_id[nid]["problem_id"]]
            checks[nid].append(Check("final_answer", status, reason, f"{answer!r} vs gold {gold_answer!r}: {reason}",
                                     text=answer, computed=gold_answer))
    if config.code:
        jobs = []
        for nid in checked:
            blocks = code_blocks(node_by_id[nid]["text"])
            if not blocks:
                continue
            # A path broken by a node this shard lacks runs the step's code alone.
            earlier = [code for step in tree.texts(tree.above(nid)) for code, _ in code_blocks(step)]
            for k, (code, shown) in enumerate(blocks):
                jobs.append((nid, k, earlier + [c for c, _ in blocks[:k]], code, shown))
        with ThreadPoolExecutor(max_workers=config.code_workers) as pool:
            outcomes = list(pool.map(lambda job: code_check(job[2], job[3], job[4], config.sandbox), jobs))
        for (nid, k, *_), (check, reject) in zip(jobs, outcomes):
            checks[nid].append(check)
            if reject is not None:
                rejects[nid].append(reject.model_copy(update={"item": f"{nid}#code{k}"}))

    done_problems: set[str] = set()
    for nid in checked:
        yield from rejects[nid]
        decided = [c for c in checks[nid] if c.decided]
        if decided:
            failed = [c for c in decided if c.failed]
            kinds = sorted({c.name for c in decided})
            yield Evaluation(
                evaluation_id=content_hash("eval", nid, SOURCE, VERSION, config.model_dump(mode="json", exclude={"code_workers"})),
                node_id=nid, problem_id=node_by_id[nid]["problem_id"], source="tool", value=None,
                n=len(decided), successes=len(decided) - len(failed), verdict=-1 if failed else 1,
                confidence=1.0 if failed else None,
                rationale="; ".join(c.detail for c in failed) if failed else f"{len(decided)} checks held ({', '.join(kinds)})",
                model="+".join(sorted({_TOOL_OF[c.name] for c in decided})),
                cost_tokens=0,
                meta=json.dumps({"checks": [math_row(c) for c in checks[nid][:MAX_CHECKS_IN_META]]}),
            )
    if on_problem_done:
        for p in problems:
            if p.problem_id not in done_problems:
                done_problems.add(p.problem_id)
                on_problem_done(1)


_TOOL_OF = {"annotation": "sympy", "equation": "sympy", "latex": "sympy", "final_answer": "math-verify", "code": "sandbox"}
