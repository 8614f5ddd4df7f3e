"""What one exported dataset is, declared in one place: the export registry's entry type.

An entry is a dataset's whole identity: its name, the ``stepforge.schemas.formats`` format its
rows are in (so the validator that checks them), its Hugging Face features, the function that
builds its rows, the trainer that consumes it, and what the dataset card says about it.
``datasets.DATASETS`` lists the entries (the agent ones come from ``agent_datasets``); everything
else that names a dataset (the config's choices and their description, the dispatch in
``datasets.run``, the card's table and its section per dataset) is derived from that list, so
adding a dataset is adding one entry.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pyarrow as pa
from datasets import Features

from stepforge.schemas.formats import CONFLICTING_KEYS, FORMAT_KEYS, VALIDATORS, Rows

if TYPE_CHECKING:  # only for annotations: datasets.py imports this module
    from stepforge.stages.export.datasets import ExportConfig

Built = tuple[list[dict[str, Any]], Counter[str]]
"""What a builder returns: the rows, in their export order, and the skipped candidates by reason."""

T = TypeVar("T")


@dataclass
class ExportInputs:
    """What a builder reads: the run's tables and the export config.

    Some datasets are views of another's rows (``kto`` unpairs the ``dpo`` rows, ``math_shepherd``
    re-lays the ``prm_stepwise`` rows), so ``built`` runs a builder at most once per export.
    """

    config: ExportConfig
    problems: pa.Table
    rollouts: pa.Table
    nodes: pa.Table
    labels: pa.Table
    pairs: pa.Table
    step_filter: pa.Table
    augmentations: pa.Table
    agent_pairs: pa.Table
    _built: dict[Callable[[ExportInputs], Any], Any] = field(default_factory=dict, repr=False)

    def built(self, build: Callable[[ExportInputs], T]) -> T:
        """``build(self)``, computed on the first call only."""
        if build not in self._built:
            self._built[build] = build(self)
        return self._built[build]


def _no_options(config: ExportConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class ExportedDataset:
    """One dataset the export can write. Checked when declared, so a bad entry fails at import."""

    name: str
    format: str
    """A format of ``stepforge.schemas.formats``: its validator checks every row before it is written."""
    features: Features
    """Every column and its type, explicit so an empty dataset or an all-None column keeps its type."""
    build: Callable[[ExportInputs], Built]
    consumer: str
    """Which trainer reads the dataset (the card's table)."""
    card: str
    """What a row is, for the dataset card's section on this dataset (markdown, one paragraph)."""
    applies_to: Literal["math", "agent"] = "math"
    """The problems it is made from; a run without such problems does not export it."""
    format_options: Callable[[ExportConfig], dict[str, Any]] = _no_options
    """Keyword arguments of the validator that come from the config (math_shepherd's step tag)."""

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            problems.append("the name must be snake_case (it is a file name and a config value)")
        if self.format not in FORMAT_KEYS:
            problems.append(f"unknown format {self.format!r}; known: {sorted(FORMAT_KEYS)}")
        else:
            # A trainer picks its code path from the columns it sees (see schemas.formats).
            missing = [key for key in FORMAT_KEYS[self.format] if key not in self.features]
            conflicting = sorted(set(self.features) & CONFLICTING_KEYS[self.format])
            if missing:
                problems.append(f"features lack the {self.format} keys {missing}")
            if conflicting:
                problems.append(f"features {conflicting} define another format than {self.format}")
        if not (self.consumer.strip() and self.card.strip()):
            problems.append("consumer and card must say something")
        if problems:
            raise ValueError(f"export dataset {self.name!r}: " + "; ".join(problems))

    def validate(self, rows: Rows, config: ExportConfig) -> None:
        """Raise ``FormatError`` unless every row is in the dataset's format."""
        VALIDATORS[self.format](rows, **self.format_options(config))


def by_name(entries: Iterable[ExportedDataset]) -> dict[str, ExportedDataset]:
    """The registry: entries by name, in declaration order (the default export order)."""
    registry: dict[str, ExportedDataset] = {}
    for entry in entries:
        if entry.name in registry:
            raise ValueError(f"export dataset {entry.name!r} is declared twice")
        registry[entry.name] = entry
    return registry


def describe(registry: dict[str, ExportedDataset]) -> str:
    """The config's description of its dataset choices: written from the entries, so it names each one."""
    # Sentences, not a ';'-list: consumer texts contain semicolons.
    choices = " ".join(
        f"{entry.name}: {entry.format} {{{', '.join(FORMAT_KEYS[entry.format])}}}, for {entry.consumer}."
        for entry in registry.values()
    )
    return (
        "Datasets to export, written in the order given; one that does not apply to the run's problems is left "
        f"out (the agent datasets need agent tasks, the others math problems). {choices}"
    )
