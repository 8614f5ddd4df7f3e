"""The stage registry and the chain it implies: which stages exist, which slot each fills, in what order.

Stages are found, not listed: every module of the phase packages under ``stepforge.stages`` that
declares a ``SPEC`` (a ``stages.base.Stage``) is a built-in stage, and ``RunConfig.plugins``
names further modules (importable, e.g. on ``PYTHONPATH``) whose ``SPEC`` joins the chain for
that run. The chain is the slots ordered by what each stage follows and reads (a topological
order, ties by name), rooted at ``problems``, which ingest fills. So adding a stage is one module
(and its settings): nothing here, in the executor, the flows or the CLI changes.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterable
from dataclasses import dataclass

from stepforge.stages.base import Stage
from stepforge.storage.runs import LEGACY_SLOTS

ROOT = "problems"
"""The slot ingest fills: one problem shard per ``shard_size`` problems (and its imported trajectories)."""
INGEST = "ingest"
"""Ingest's stage name: the problem shards live under ``stage=ingest``."""
INGEST_TABLES = ("problems", "rollouts", "nodes", "evaluations", "rejects")
LABELS = "labels"
"""The slot of the step labels: what review shows annotators, backfill compares, evaluate recomputes."""

PHASES = ("ingest", "rollout", "label", "verify", "consensus", "pairs", "agent", "export", "review")
"""The phase packages under ``stepforge.stages``, in pipeline order: where built-in stages are found,
and the order of slots that depend on nothing of each other (pairs before agent curation).
Engines (``llm``), measuring instruments and the sandbox (``tools``) live beside them and hold no stage."""



class RegistryError(ValueError):
    """The stage declarations do not form a chain (a slot nobody fills, a cycle, two stages of one name)."""


@functools.cache
def builtin_stages() -> tuple[Stage, ...]:
    found: list[Stage] = []
    for phase in PHASES:
        package = importlib.import_module(f"stepforge.stages.{phase}")
        for sub in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            spec = getattr(importlib.import_module(sub.name), "SPEC", None)
            if isinstance(spec, Stage):
                found.append(spec)
    return tuple(found)


def plugin_stage(module: str) -> Stage:
    """The stage a plugin module declares."""
    try:
        spec = getattr(importlib.import_module(module), "SPEC", None)
    except ImportError as exc:
        raise RegistryError(f"plugin {module!r} cannot be imported: {exc}") from exc
    if not isinstance(spec, Stage):
        raise RegistryError(f"plugin {module!r} declares no SPEC = Stage(...)")
    return spec


@dataclass(frozen=True)
class Chain:
    """The run's chain: every slot in order, the stages that may fill it, and which one this run uses."""

    slots: tuple[str, ...]  # ROOT first
    candidates: dict[str, tuple[Stage, ...]]
    chosen: dict[str, Stage]  # slot → the stage of this run (ROOT has none: ingest fills it)

    @property
    def stage_slots(self) -> tuple[str, ...]:
        """The slots a stage fills per problem shard, in order (all but the root)."""
        return self.slots[1:]

    def stage(self, slot: str) -> Stage:
        return self.chosen[slot]

    def slot_of(self, name: str) -> str:
        """A slot from a slot name, a stage name (``mc_label``), or a pre-rename slot name (``label``)."""
        if name in self.chosen:
            return name
        for slot, stages in self.candidates.items():
            if any(s.name == name for s in stages):
                return slot
        if LEGACY_SLOTS.get(name) in self.chosen:
            return LEGACY_SLOTS[name]
        raise RegistryError(f"unknown stage {name!r}; choose from {', '.join(self.names())}")

    def names(self) -> list[str]:
        """What a user may name: each slot's chosen stage (as stored) — e.g. for backfill's stages."""
        return [self.chosen[s].name for s in self.stage_slots]

    def downstream(self, slots: Iterable[str]) -> set[str]:
        """The given slots and every slot that reads or follows one of them."""
        out = set(slots)
        for slot in self.stage_slots:
            if set(self.chosen[slot].needs) & out:
                out.add(slot)
        return out


def chain_for(config) -> Chain:
    """The chain of a run config: built-in stages plus the config's plugins, ordered, one stage per slot."""
    stages = [*builtin_stages(), *(plugin_stage(m) for m in config.plugins)]
    names = [s.name for s in stages]
    if dupes := sorted({n for n in names if names.count(n) > 1} | ({INGEST} & set(names))):
        raise RegistryError(f"two stages are named {', '.join(dupes)}: a stage's name is where its shards live")
    candidates: dict[str, list[Stage]] = {}
    for stage in stages:
        candidates.setdefault(stage.slot, []).append(stage)
    chosen: dict[str, Stage] = {}
    for slot, options in candidates.items():
        picked = [s for s in options if s.chosen(config)]
        if len(picked) != 1:
            raise RegistryError(f"slot {slot!r}: the config selects {len(picked)} of {[s.name for s in options]}, not one")
        chosen[slot] = picked[0]
    return Chain(_order(chosen), {k: tuple(v) for k, v in candidates.items()}, chosen)  # chosen: declaration order


def _order(chosen: dict[str, Stage]) -> tuple[str, ...]:
    """Slots in dependency order (Kahn's algorithm; ties in declaration order: phases, then plugins)."""
    for slot, stage in chosen.items():
        if missing := [n for n in stage.needs if n != ROOT and n not in chosen]:
            raise RegistryError(f"stage {stage.name!r} needs slot(s) {missing} that no stage fills")
    order, done = [ROOT], {ROOT}
    while len(order) <= len(chosen):
        ready = [s for s, st in chosen.items() if s not in done and set(st.needs) <= done]
        if not ready:
            raise RegistryError(f"the stages of slots {sorted(set(chosen) - done)} depend on each other in a cycle")
        order.append(ready[0])
        done.add(ready[0])
    return tuple(order)
