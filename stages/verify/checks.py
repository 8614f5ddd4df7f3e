"""One check type for the tool-grounded verifiers (math: ``stages.verify.math_checks``; agents:
``stages.verify.agent_checks``): what was checked of a step, whether it held, and the evidence.

Both verifiers speak one status vocabulary: ``pass`` (the check held), ``fail`` (it did not:
evidence the step is wrong) and ``undecided`` (the check could not be made: nothing to compare,
a sandbox that stopped the code, an invalid tool schema). A step's ``tool`` evaluation counts
the decided checks; any failed one makes its verdict -1.

The evaluations' ``meta.checks`` rows keep the layout each verifier has always stored, so stores
written before read the same (``math_row``, ``agent_row``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["pass", "fail", "undecided"]

# The math verifier's stored rows say whether the claim was true (claims.py's vocabulary).
_MATH_STATUS = {"pass": "true", "fail": "false", "undecided": "uncheckable"}
FROM_CLAIM_STATUS: dict[str, Status] = {"true": "pass", "false": "fail", "uncheckable": "undecided"}


@dataclass(frozen=True)
class Check:
    """One check of one step.

    ``name`` says what was checked (math: ``annotation`` / ``equation`` / ``latex`` /
    ``final_answer`` / ``code``; agents: ``arguments_json`` / ``known_tool`` / ``arguments_schema``
    / ``tool_error`` / ``repeated_call`` / ``final_answer``); ``reason`` is a snake_case why
    (``ok`` for a check that held); ``detail`` the human-readable specifics. A math check also
    keeps the checked text as written and the value the tool computed.
    """

    name: str
    status: Status
    reason: str
    detail: str
    text: str | None = None
    computed: str | None = None

    @property
    def decided(self) -> bool:
        return self.status != "undecided"

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def math_row(check: Check) -> dict[str, Any]:
    """The stored row of a math check: ``{kind, text, status: true/false/uncheckable, computed, detail}``."""
    return {
        "kind": check.name, "text": check.text, "status": _MATH_STATUS[check.status],
        "computed": check.computed, "detail": check.detail,
    }


def agent_row(check: Check) -> dict[str, Any]:
    """The stored row of an agent check: ``{name, status: pass/fail/undecided, reason, detail}``."""
    return {"name": check.name, "status": check.status, "reason": check.reason, "detail": check.detail}
