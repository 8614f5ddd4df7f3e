"""The synthetic world's settings (the policy's error model), apart from the world itself: the engine
config (``stages.llm.BackendConfig``) names them, and the world imports the engine seam, so they
live where both can import them without a cycle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

LEAD_INS = (
    "{name} {phrase}:",
    "Next, {name} {phrase}, so",
    "After {name} {phrase}, that is",
    "Then {name} {phrase}, giving",
    "Since {name} {phrase}, we get",
)


class WorldConfig(BaseModel):
    """The policy's error model. Every rate enters ``SyntheticBackend.model_id``; ``max_in_flight``
    does not (it never changes a sample)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slip_rate: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Probability that a step applies the right operation but writes a wrong result "
        "(e.g. '7 + 5 = 13'): the written equation is false, so a calculator could catch it.",
    )
    wrong_op_rate: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Probability that a step applies the wrong operation with correct arithmetic (the "
        "problem says 'finds 5 more' and the step writes '7 - 5 = 2'): the equation is true, so a "
        "calculator could not catch it.",
    )
    recover_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Probability that a step following a wrong carried value recomputes from the true "
        "value instead (the solution recovers); that step can still err at the rates above.",
    )
    phrasings: int = Field(
        default=1, ge=1, le=len(LEAD_INS),
        description="Ways the policy words a step (chosen uniformly per step; the arithmetic is unchanged). "
        "1: a step's text is a function of its arithmetic, so equal steps are one node, as with a "
        "deterministic writer; more: equal arithmetic is often different text, as with a real model, so "
        "rollouts share fewer prefixes.",
    )
    max_in_flight: int = Field(default=256, ge=1, description="Samples the generation client runs at once.")

    @model_validator(mode="after")
    def _rates_are_a_distribution(self) -> WorldConfig:
        if self.slip_rate + self.wrong_op_rate > 1.0 + 1e-12:
            raise ValueError("slip_rate + wrong_op_rate must be at most 1")
        return self

    @property
    def step_success(self) -> float:
        """q: probability that one step is free of both kinds of error."""
        return max(0.0, 1.0 - self.slip_rate - self.wrong_op_rate)
