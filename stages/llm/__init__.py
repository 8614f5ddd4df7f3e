"""Generation: the request/response seam, its cache, and the backends behind it."""

from __future__ import annotations

import functools
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
from stepforge.stages.llm.openai_http import HttpConfig, http_model_id
from stepforge.stages.instruments.world import WorldConfig

DEFAULT_MAX_IN_FLIGHT = {"llamacpp": 64, "synthetic": 64, "openai": 256, "vllm": 4096}


class VLLMConfig(BaseModel):
    """The vLLM offline engine's settings (``backend.kind: vllm``; a GPU machine with vllm installed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one model replica is split across.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take (weights + KV cache)."
    )
    max_model_len: int | None = Field(default=None, ge=256, description="Context length; default the model's.")
    engine_seed: int = Field(default=0, description="vLLM's engine seed (each sample also carries its own).")
    batch_window_seconds: float = Field(
        default=0.05, ge=0, description="How long the engine thread waits for more samples before a generate() call."
    )
    model_revision: str = Field(
        default="", description="The Hugging Face revision (commit) to load; part of the model id that keys caches."
    )


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llamacpp", "openai", "vllm", "synthetic"] = Field(
        default="llamacpp",
        description="Which engine runs the policy: llamacpp (a GGUF model in this process, on the CPU), openai (an "
        "OpenAI-compatible server: vllm serve, SGLang, llama.cpp's server, TGI, a hosted API; section http), vllm "
        "(vLLM's offline engine on local GPUs; section vllm) or synthetic (the synthetic world's arithmetic policy "
        "with known mistakes: a measuring instrument for labellers, not a model).",
    )
    model: str = Field(
        default="smollm2-135m",
        description="llamacpp: smollm2-135m, qwen2.5-coder-1.5b (packaged GGUFs) or a path to a .gguf file; openai: "
        "the model name the server serves; vllm: a model directory or Hugging Face id.",
    )
    n_ctx: int = Field(default=4096, ge=256, description="Context window in tokens (prompt + generation).")
    n_threads: int | None = Field(
        default=None,
        description="CPU threads for llama.cpp; default the cores other processes are not keeping busy when the "
        "model loads (at least one): a thread sharing its core with a busy process slows all of them.",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Samples handed to the engine at once (llama.cpp orders them to reuse its KV cache; a server gets "
        "this many concurrent requests). Default: 64 llamacpp and synthetic, 256 openai, 4096 vllm.",
    )
    http: HttpConfig = Field(default_factory=HttpConfig, description="The server and client limits (kind: openai only).")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (kind: vllm only).")
    world: WorldConfig = Field(
        default_factory=WorldConfig, description="Error rates of the synthetic world's policy (kind: synthetic only)."
    )

    @property
    def model_label(self) -> str:
        """What to call the policy in logs and summaries."""
        return "synthetic-world" if self.kind == "synthetic" else self.model

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or DEFAULT_MAX_IN_FLIGHT[self.kind]


_LOADED: dict[BackendConfig, Backend] = {}


def load_backend(config: BackendConfig) -> Backend:
    """The backend for ``config``, loaded once per process (weights are large; stages share them)."""
    if config in _LOADED:
        return _LOADED[config]
    if config.kind == "synthetic":
        from stepforge.stages.instruments.synthetic import SyntheticBackend

        backend = SyntheticBackend(config.world)
        backend.max_in_flight = config.in_flight
    elif config.kind == "openai":
        from stepforge.stages.llm.openai_http import OpenAIBackend

        backend = OpenAIBackend(config.model, config.http, max_in_flight=config.in_flight)
    elif config.kind == "vllm":
        from stepforge.stages.llm.vllm_backend import VLLMBackend

        v = config.vllm
        backend = VLLMBackend(
            config.model, seed=v.engine_seed, tensor_parallel_size=v.tensor_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
            max_in_flight=config.in_flight, batch_window_seconds=v.batch_window_seconds,
            model_revision=v.model_revision,
        )
    else:
        from stepforge.stages.llm.llamacpp import LlamaCppBackend

        backend = LlamaCppBackend(config.model, n_ctx=config.n_ctx, n_threads=config.n_threads, max_in_flight=config.in_flight)
    _LOADED[config] = backend
    return backend


def backend_model_id(config: BackendConfig) -> str:
    """The id that keys a backend's shards and cache entries, without loading its weights."""
    if config.kind == "synthetic":
        return load_backend(config).model_id  # no weights: the world's rates are its identity
    if config.kind == "openai":
        return http_model_id(config.model, config.http)
    if config.kind == "vllm":
        from stepforge.stages.llm.vllm_backend import vllm_model_id

        return vllm_model_id(config.model, config.vllm.model_revision)
    return _gguf_model_id(config.model)


@functools.cache
def _gguf_model_id(model: str) -> str:
    from stepforge.stages.llm.models import resolve_model

    return resolve_model(model).model_id


def unload_backends() -> None:
    while _LOADED:
        _, backend = _LOADED.popitem()
        backend.close()


__all__ = [
    "Backend", "BackendConfig", "Generation", "GenerationCache", "GenerationClient", "GenerationError",
    "GenerationRequest", "HttpConfig", "VLLMConfig", "WorldConfig", "backend_model_id", "load_backend",
    "unload_backends",
]
