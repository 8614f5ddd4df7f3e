"""How a problem is put to the policy, shared by every stage that samples from it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from stepforge.stages.llm.base import GenerationRequest
from stepforge.stages.rollout.split import SplitConfig, join_prefix


class PromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str | None = Field(
        default="Please reason step by step, and put your final answer within \\boxed{}.",
        description="System message; None to send none.",
    )
    user_template: str = Field(
        default="{question}\n\nSolve it step by step. Separate the steps with a blank line. "
        "End with the final answer in \\boxed{{}}.",
        description="User message; {question} is replaced by the problem text.",
    )


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=512, ge=1, description="Generation budget per sample.")
    seed: int = Field(default=0, description="Run seed; every sample's seed derives from it and the sample's content.")


def build_request(
    question: str, prefix_steps: list[str], n: int, prompt: PromptConfig, split: SplitConfig, sampling: SamplingConfig
) -> GenerationRequest:
    """A chat request for ``n`` solutions, continuing after ``prefix_steps`` if any.

    Logprobs are requested only when the split needs them (``confidence`` mode): every stage
    that samples builds its request here, and leaving the flag off elsewhere keeps the other
    modes' requests, hence their cache keys, unchanged.
    """
    messages = []
    if prompt.system:
        messages.append(("system", prompt.system))
    messages.append(("user", prompt.user_template.format(question=question)))
    return GenerationRequest(
        messages=tuple(messages),
        assistant_prefix=join_prefix(prefix_steps, split),
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        logprobs=split.mode == "confidence",
    )
