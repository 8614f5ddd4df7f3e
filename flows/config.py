"""A run's whole configuration: one pydantic model, loadable from YAML, hashed into cache keys."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stepforge.flows.errors import ConfigError, read_yaml_mapping, validation_message
from stepforge.stages.agent.agent_pairs import AgentPairsConfig
from stepforge.stages.agent.augment import AugmentConfig
from stepforge.stages.agent.episodes import AgentConfig
from stepforge.stages.label.binary_search import BinarySearchConfig
from stepforge.stages.consensus.policy import ConsensusConfig
from stepforge.stages.export.datasets import ExportConfig
from stepforge.stages.ingest.sources import IngestConfig
from stepforge.stages.llm import BackendConfig
from stepforge.stages.label.mc_label import MCLabelConfig
from stepforge.stages.label.mcts import MCTSConfig
from stepforge.stages.pairs.step_pairs import PairsConfig
from stepforge.stages.rollout.prompting import PromptConfig
from stepforge.stages.review.annotations import ReviewConfig
from stepforge.stages.rollout.sampling import RolloutConfig
from stepforge.stages.rollout.split import SplitConfig
from stepforge.stages.agent.step_filter import FilterConfig
from stepforge.stages.verify.verifiers import VerifyConfig


class RayConfig(BaseModel):
    """Run shards as tasks on a Ray cluster (Prefect's Ray task runner). Never enters a shard key:
    where a shard ran does not change what is in it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(
        default=None,
        description="An existing cluster: 'auto' (this node belongs to one), ray://head:10001 (Ray client) or host:port; "
        "none starts a local cluster for this run.",
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of a local cluster (default all); each shard task takes one."
    )
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs of a local cluster (default all Ray finds).")
    task_gpus: float = Field(
        default=0, ge=0, description="GPUs each shard task reserves (1 for a vLLM engine per worker; 0 for HTTP backends)."
    )
    runtime_env: dict | None = Field(
        default=None, description="Ray runtime_env for the workers (e.g. pip packages, env_vars) on a remote cluster."
    )


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(default="demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name; partitions all outputs.")
    store: Path = Field(default=Path("stepforge-data"), description="Root directory of shards, catalog, caches and exports.")
    shard_size: int = Field(default=16, ge=1, description="Problems per shard: the unit of work, resume and caching.")
    concurrent_shards: int = Field(
        default=8, ge=1,
        description="Problem shards whose chains run at once in one process, sharing the engine's bound on samples in "
        "flight: while one shard waits at a stage boundary or in a stage's tail, the others keep the engine busy. "
        "Memory grows with it (each open shard holds its tables); tables do not depend on it.",
    )
    backend: BackendConfig = Field(default_factory=BackendConfig, description="The policy model and its engine.")
    ingest: IngestConfig = Field(description="Where the problems come from.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="How problems are put to the policy (all stages).")
    split: SplitConfig = Field(default_factory=SplitConfig, description="How solutions are cut into steps (all stages).")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling of solutions.")
    labeller: Literal["mc", "binary_search", "mcts", "none"] = Field(
        default="binary_search",
        description="How steps are valued: binary_search (the default: OmegaPRM first-error search with rollout "
        "reuse and adaptive sampling; section binary_search; measured in benchmarks/RESULTS.md to label the same "
        "steps as mc, more accurately, for about a third of the completions), "
        "mc (Math-Shepherd: K completions after every step; section mc_label), "
        "mcts (AlphaMath-style tree search; section mcts), none (no Monte Carlo evidence: verifiers, "
        "imported labels and humans only).",
    )
    mc_label: MCLabelConfig = Field(default_factory=MCLabelConfig, description="Monte Carlo step labelling (labeller: mc).")
    binary_search: BinarySearchConfig = Field(
        default_factory=BinarySearchConfig, description="Binary search / OmegaPRM labelling (labeller: binary_search)."
    )
    mcts: MCTSConfig = Field(default_factory=MCTSConfig, description="Tree-search labelling (labeller: mcts).")
    verify: VerifyConfig = Field(
        default_factory=VerifyConfig, description="Evidence beyond Monte Carlo: tool checks and the LLM judge."
    )
    consensus: ConsensusConfig = Field(default_factory=ConsensusConfig, description="How evaluations become labels.")
    pairs: PairsConfig = Field(
        default_factory=PairsConfig, description="Preference pairs from the tree: step_dpo, sibling, trajectory."
    )
    filter: FilterConfig = Field(
        default_factory=FilterConfig, description="Agent trajectories: which steps are kept for SFT (WebSTAR)."
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Agent trajectories: reasoning written for each kept step."
    )
    augment_backend: BackendConfig | None = Field(
        default=None, description="The reasoning writer's model and engine; None = the judge's, else the policy's."
    )
    agent: AgentConfig = Field(
        default_factory=AgentConfig,
        description="Live agent episodes (problems posed by ingest.environment): step limit, token budget, the tool.",
    )
    agent_pairs: AgentPairsConfig = Field(
        default_factory=AgentPairsConfig, description="Agent trajectories: wrong action vs a better sampled one."
    )
    export: ExportConfig | None = Field(default=None, description="Dataset export; default <store>/exports/<run>.")
    review: ReviewConfig = Field(
        default_factory=ReviewConfig, description="Human review in Label Studio: the server and what is sent to it."
    )
    ray: RayConfig | None = Field(
        default=None, description="Run shards on a Ray cluster; none runs them one after another in this process."
    )
    plugins: dict[str, dict] = Field(
        default_factory=dict,
        description="Extra stages: importable module → its settings. Each module declares SPEC = Stage(...) "
        "(stepforge.stages.base) and joins the chain in the slot it names; its settings are its own (see the "
        "module), and enter its shard key as its key function says.",
    )

    @model_validator(mode="after")
    def _share_prompt_and_split(self) -> "RunConfig":
        """Rollouts, completions and pairs must agree on the prompt and step format, so they are set once."""
        shared = {"prompt": self.prompt, "split": self.split}
        object.__setattr__(self, "rollout", self.rollout.model_copy(update=shared))
        for section in ("mc_label", "binary_search", "mcts"):
            object.__setattr__(self, section, getattr(self, section).model_copy(update=shared))
        object.__setattr__(self, "pairs", self.pairs.model_copy(update={"split": self.split}))
        if self.export is None:
            object.__setattr__(self, "export", ExportConfig(out_dir=str(self.store / "exports" / self.run)))
        object.__setattr__(self, "export", self.export.model_copy(update={"split": self.split}))
        return self

    @property
    def labeller_config(self) -> BaseModel | None:
        """The config section of the chosen labeller (the others are ignored and do not enter keys)."""
        return {"mc": self.mc_label, "binary_search": self.binary_search, "mcts": self.mcts, "none": None}[self.labeller]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "RunConfig":
        """The config in a YAML file, with top-level ``overrides``. A missing or unreadable file, a YAML
        syntax error or keys that do not validate raise a ConfigError naming the file and the key."""
        data = read_yaml_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_data(data, where=f"config {path}")

    @classmethod
    def from_data(cls, data: dict, where: str = "config") -> "RunConfig":
        """``model_validate`` whose failure is one ConfigError line: each wrong key's dotted path with
        pydantic's message, and for an unknown key the closest valid one."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {validation_message(exc, cls)}") from exc


def demo_config(**overrides) -> RunConfig:
    """The embedded demo: bundled GSM8K test problems, Qwen2.5-Coder-1.5B on the CPU, local storage."""
    path = resources.files("stepforge.flows") / "data" / "demo.yaml"
    data = yaml.safe_load(path.read_text())
    data["ingest"]["source"] = str(resources.files("stepforge.flows") / "data" / "gsm8k_demo.jsonl")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_data(data, where="invalid option")  # the overrides come from the command line


def _partial(model: type[BaseModel], seen: dict) -> type[BaseModel]:
    """``model`` with every field optional, recursively through nested sections, and no validators:
    the shape of a set of overrides (a section changes only the keys it names)."""
    import types
    import typing

    from pydantic import create_model

    if model in seen:
        return seen[model]

    def loosen(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return _partial(annotation, seen)
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
            return typing.Union[tuple(loosen(a) for a in args)]  # noqa: UP007 - built at runtime
        return annotation

    fields = {
        name: (loosen(info.annotation) | None, Field(default=None, description=info.description))
        for name, info in model.model_fields.items()
    }
    seen[model] = create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"), **fields)
    return seen[model]


RunConfigOverrides = _partial(RunConfig, {})
"""What a backfill may change of a recorded run config: any key of ``RunConfig``, nested sections
partially, nothing else — so a mistyped key is refused (by the Prefect API too) before any work."""
