"""Generation: the request/response seam, its cache, and the backends behind it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stepforge.stages.llm.base import (
    Backend,
    Generation,
    GenerationClient,
    GenerationError,
    GenerationRequest,
)
from stepforge.stages.llm.cache import GenerationCache
from stepforge.stages.llm.synthetic import WorldConfig


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llamacpp", "synthetic"] = Field(
        default="llamacpp",
        description="Which engine runs the policy: llamacpp (a GGUF model on the CPU) or synthetic (the synthetic "
        "world's arithmetic policy with known mistakes: a measuring instrument for labellers, not a model).",
    )
    model: str = Field(
        default="smollm2-135m",
        description="smollm2-135m, qwen2.5-coder-1.5b (packaged GGUFs) or a path to a local .gguf file.",
    )
    n_ctx: int = Field(default=4096, ge=256, description="Context window in tokens (prompt + generation).")
    n_threads: int | None = Field(default=None, description="CPU threads for llama.cpp; default all cores.")
    max_in_flight: int = Field(
        default=64, ge=1, description="Samples handed to the engine at once; llama.cpp orders them to reuse its KV cache."
    )
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="Error rates of the synthetic world's policy (kind: synthetic only)."
    )

    @property
    def model_label(self) -> str:
        """What to call the policy in logs and summaries."""
        return "synthetic-world" if self.kind == "synthetic" else self.model


_LOADED: dict[BackendConfig, Backend] = {}


def load_backend(config: BackendConfig) -> Backend:
    """The backend for ``config``, loaded once per process (weights are large; stages share them)."""
    if config not in _LOADED and config.kind == "synthetic":
        from stepforge.stages.llm.synthetic import SyntheticBackend

        _LOADED[config] = SyntheticBackend(config.world)
        _LOADED[config].max_in_flight = config.max_in_flight
    if config not in _LOADED:
        from stepforge.stages.llm.llamacpp import LlamaCppBackend

        _LOADED[config] = LlamaCppBackend(
            config.model, n_ctx=config.n_ctx, n_threads=config.n_threads, max_in_flight=config.max_in_flight
        )
    return _LOADED[config]


def unload_backends() -> None:
    while _LOADED:
        _, backend = _LOADED.popitem()
        backend.close()


__all__ = [
    "Backend", "BackendConfig", "Generation", "GenerationCache", "GenerationClient", "GenerationError",
    "GenerationRequest", "WorldConfig", "load_backend", "unload_backends",
]
