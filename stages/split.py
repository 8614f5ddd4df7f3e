"""Step splitting: a solution's text becomes a list of steps.

The splitter also fixes how a prefix of steps is written back for continuation
(``join_prefix``), so that a model continuing ``join_prefix(steps[:i])`` produces text that
splits into further steps the same way. That round trip is what makes a Monte Carlo
completion a true continuation of the same solution.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SplitMode = Literal["blank_line", "newline", "step_prefix", "numbered", "regex"]
_STEP_PREFIX = re.compile(r"(?im)^\s*(?:#+\s*)?\**step\s*\d+\s*[:.)]\**\s*")
# A blank line, or a line break before a numbered item ("2. ", "3) ", "**Step 4", "### 5.").
_NUMBERED = re.compile(r"\n[ \t]*\n+|\n(?=[ \t]*(?:#+[ \t]*)?\**(?:step[ \t]*)?\d+[.):])", re.IGNORECASE)


class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: SplitMode = Field(
        default="blank_line",
        description="blank_line: steps separated by an empty line; newline: one step per line; "
        "step_prefix: steps introduced by 'Step k:'; numbered: blank lines or numbered items "
        "('1.', 'Step 2:'), as instruct models write; regex: split on `pattern`.",
    )
    pattern: str | None = Field(default=None, description="Regex separating steps when mode is 'regex'.")
    max_steps: int = Field(default=40, ge=1, description="Later steps are merged into the last one.")

    def separator(self) -> str:
        """The text placed between steps when a prefix is written back for continuation."""
        return "\n" if self.mode == "newline" else "\n\n"


def split_steps(text: str, config: SplitConfig) -> list[str]:
    """Non-empty, stripped steps in order. Text with no separator is one step."""
    if config.mode == "blank_line":
        parts = re.split(r"\n[ \t]*\n+", text)
    elif config.mode == "newline":
        parts = text.split("\n")
    elif config.mode == "step_prefix":
        parts = _STEP_PREFIX.split(text)
    elif config.mode == "numbered":
        parts = _NUMBERED.split(text)
    else:
        if not config.pattern:
            raise ValueError("split mode 'regex' needs a pattern")
        parts = re.split(config.pattern, text)
    steps = [p.strip() for p in parts if p and p.strip()]
    if len(steps) > config.max_steps:
        steps = steps[: config.max_steps - 1] + [config.separator().join(steps[config.max_steps - 1 :])]
    return steps


def join_prefix(steps: list[str], config: SplitConfig) -> str:
    """Steps written back as the start of an assistant turn, ending where the next step begins."""
    if not steps:
        return ""
    if config.mode == "step_prefix":
        return "".join(f"Step {i}: {s}\n" for i, s in enumerate(steps, 1)) + f"Step {len(steps) + 1}:"
    sep = config.separator()
    return sep.join(steps) + sep
