"""The stage contract: what every stage of the chain declares, and the one hook the runtime calls.

A stage module declares one ``SPEC = Stage(...)``: its name and version, the chain slot it
fills, the tables it reads (by the slot whose shard wrote them) and writes, what of the run's
config enters its shard key, and ``run(inputs, ctx) -> Iterator[Record]``. The runtime
(``stepforge.flows.runtime``) finds the declarations, orders the slots, computes keys, reads the
declared inputs of one problem shard, calls ``run`` and writes the shard; a stage never touches
the store, Prefect or the run record. Like datatrove's pipeline steps, each kind has one narrow
hook: the stage's code is the ``run`` generator, and everything around it is the executor's.

Several stages may fill one slot (the labellers: ``mc_label``, ``binary_search``, ``mcts``,
``no_label``); ``chosen(config)`` says which one a run uses. A stage's shard key is
``content_hash(name, version, <key of the slot it follows>, *key(ctx, problem_shard))``: the
upstream key chains every shard to what it was computed from, and ``key`` names exactly the
settings that shape the rows (never worker counts or run order), so changing anything else
reuses the stored shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from stepforge.schemas.records import RECORD_TYPES, Problem, Record

if TYPE_CHECKING:
    from stepforge.stages.llm import GenerationClient
    from stepforge.stages.rollout.answers import AnswerChecker

Kind = Literal["generate", "label", "verify", "derive", "curate"]
"""What a stage does, for people and for planning: ``generate`` samples from the policy, ``label``
values steps by completions, ``verify`` adds evidence, ``derive`` is pure (no model: re-running it
costs no tokens, so a backfill may do it freely), ``curate`` selects training data and is pure
unless its opt-in parts call a model (agent curation: reasoning writer, alternative actions)."""


class Inputs(Protocol):
    """What a stage reads of one problem shard: only the tables it declared, from the declared slots."""

    shard: str  # the problem shard's key (progress labels, nothing else)

    def problems(self) -> list[Problem]: ...

    def rows(self, table: str) -> list[dict]: ...

    def arrow(self, table: str): ...


class Context(Protocol):
    """What a stage may use of the process it runs in (``flows.runtime.RunContext``)."""

    config: Any  # the run's RunConfig
    checker: "AnswerChecker"

    def client(self) -> "GenerationClient": ...

    def judge_client(self) -> "GenerationClient": ...

    def writer_client(self) -> "GenerationClient": ...

    def engine(self, backend=None) -> tuple[str, int]: ...

    def human_evidence(self, problem_shard: str) -> list[dict]: ...

    def track(self, label: str, total: int) -> AbstractContextManager[Callable[[int], None]]: ...


def _always(config: Any) -> bool:
    return True


def _nothing(ctx: Context, problem_shard: str) -> Sequence:
    return ()


@dataclass(frozen=True)
class Stage:
    """One stage of the chain. See the module docstring for what each field means to the runtime."""

    name: str
    """The shard directory (``stage=<name>``), the Prefect task and the catalog's ``shards.stage``.
    Stored shards are found by it: renaming a stage orphans its shards."""
    version: int
    """Bump when the rows the stage writes for the same inputs change: every shard is recomputed."""
    slot: str
    """The chain slot this stage fills, named for what it holds (``rollouts``, ``labels``, …)."""
    after: str
    """The slot whose shard key enters this one's: the stage's place in the chain."""
    kind: Kind
    writes: tuple[str, ...]
    reads: Mapping[str, tuple[str, ...]]
    """table → the slots whose shards it is read from (``problems`` always comes from ``problems``)."""
    run: Callable[[Inputs, Context], Iterable[Record]]
    key: Callable[[Context, str], Sequence] = _nothing
    """What of the run's config enters the key, beyond the upstream key (JSON-able values)."""
    chosen: Callable[[Any], bool] = _always
    """Among the stages of one slot, whether the run's config selects this one."""
    config_field: str | None = None
    """The RunConfig section that configures the stage (docs and the generated stage table)."""
    doc: str = ""

    def __post_init__(self) -> None:
        unknown = [t for t in (*self.writes, *self.reads) if t not in RECORD_TYPES]
        if unknown:
            raise ValueError(f"stage {self.name!r} names unknown table(s) {unknown}; tables are {sorted(RECORD_TYPES)}")
        if "rejects" not in self.writes:
            raise ValueError(f"stage {self.name!r} must write 'rejects': a row it cannot handle is a reject with a reason")

    @property
    def needs(self) -> tuple[str, ...]:
        """Every slot this stage reads or follows, in first-seen order."""
        slots = [self.after, *(s for slots in self.reads.values() for s in slots)]
        return tuple(dict.fromkeys(slots))


def key_settings(config) -> dict:
    """A stage's config section as it enters a key: all of it, except a setting added later while it
    holds the value that reproduces what earlier stores hold (the config class's ``LEGACY``), so
    those stores keep their keys (labellers, consensus, evaluations)."""
    settings = config.model_dump()
    for name, legacy in getattr(config, "LEGACY", {}).items():
        if settings.get(name) == legacy:
            del settings[name]
    return settings


def records_of(stage: Stage, records: Iterable[Record]) -> Iterator[Record]:
    """The records as they go to the store, refusing a table the stage did not declare (a stage's
    declaration is what the catalog, backfills and the docs trust)."""
    for record in records:
        if record.TABLE not in stage.writes:
            raise TypeError(f"stage {stage.name!r} produced a {record.TABLE!r} row but declares writes={stage.writes}")
        yield record
