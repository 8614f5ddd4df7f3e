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


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llamacpp"] = Field(default="llamacpp", description="Which engine runs the policy.")
    model: str = Field(
        default="smollm2-135m",
        description="smollm2-135m, qwen2.5-coder-1.5b (packaged GGUFs) or a path to a local .gguf file.",
    )
    n_ctx: int = Field(default=4096, ge=256, description="Context window in tokens (prompt + generation).")
    n_threads: int | None = Field(default=None, description="CPU threads for llama.cpp; default all cores.")
    max_in_flight: int = Field(
        default=64, ge=1, description="Samples handed to the engine at once; llama.cpp orders them to reuse its KV cache."
    )


_LOADED: dict[BackendConfig, Backend] = {}


def load_backend(config: BackendConfig) -> Backend:
    """The backend for ``config``, loaded once per process (weights are large; stages share them)."""
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
    "GenerationRequest", "load_backend", "unload_backends",
]
