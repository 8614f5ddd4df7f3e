"""What the stages of one run share in one process: the config, the store, the model clients, the checker.

A ``RunContext`` is the ``Context`` of the stage contract (``stages.base``): stages ask it for
clients (loaded on first use, so a stage that needs no model never loads one), for the engine
identity that enters keys (named, never loaded), for the run's human review evidence, and for a
progress bar. It is opened once per process and run config, and closed at the end.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stepforge.flows.config import RunConfig
from stepforge.flows.progress import reporter
from stepforge.flows.runtime.registry import INGEST, Chain, chain_for
from stepforge.stages.llm import BackendConfig, GenerationCache, GenerationClient, backend_model_id, load_backend
from stepforge.stages.review import annotations as review
from stepforge.stages.rollout.answers import AnswerChecker
from stepforge.storage.runs import load_run_record
from stepforge.storage.shards import ShardStore


def upgrade_recorded(data: dict) -> dict:
    """A recorded config from before a setting existed: the setting gets the value that reproduces
    what the run made (a config section's ``LEGACY``), not today's default, so the run's keys hold."""
    for name, field_info in RunConfig.model_fields.items():
        legacy = getattr(field_info.annotation, "LEGACY", None)
        if legacy and isinstance(data.get(name), dict):
            data[name] = {**{k: v for k, v in legacy.items() if k not in data[name]}, **data[name]}
    return data


def load_run_config(store: str | Path, run: str, record: dict | None = None) -> RunConfig:
    """The config a run was last made with (its record under ``<store>/runs``), with ``store`` as given:
    a store copied or moved elsewhere is read where it is now, never where it was made, and an export
    directory that lay inside the old store moves with it."""
    data = upgrade_recorded(dict((record or load_run_record(store, run))["config"]))
    made_in, export = Path(data.get("store") or "."), dict(data.get("export") or {})
    if export.get("out_dir") and Path(export["out_dir"]).is_relative_to(made_in):
        export["out_dir"] = str(Path(store) / Path(export["out_dir"]).relative_to(made_in))
        data["export"] = export
    return RunConfig.model_validate({**data, "store": str(store)})


@contextlib.contextmanager
def open_run(store: str | Path, run: str) -> Iterator["RunContext"]:
    """The RunContext of a stored run (its recorded config), closed when the block ends."""
    ctx = RunContext(load_run_config(Path(store), run))
    try:
        yield ctx
    finally:
        ctx.close()


@dataclass
class RunContext:
    config: RunConfig
    store: ShardStore = field(init=False)
    checker: AnswerChecker = field(default_factory=AnswerChecker)
    clients: dict[str, GenerationClient] = field(default_factory=dict)
    """Loaded clients by role: ``generation`` (policy), ``judge_generation``, ``writer_generation``."""
    _review: tuple[tuple[str, ...], dict[str, list[dict]]] | None = None
    # Shards run on threads of their own: a model must load once, whichever shard asks first.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The saturation window (``open_window``): when it opened and each client's in-flight integral then.
    _window: tuple[float, float, dict[str, float]] | None = None

    CLIENT_ROLES = ("generation", "judge_generation", "writer_generation")

    def __post_init__(self) -> None:
        self.store = ShardStore(self.config.store)

    @functools.cached_property
    def chain(self) -> Chain:
        """The run's chain: its slots in order and the stage the config chooses for each."""
        return chain_for(self.config)

    @property
    def run(self) -> str:
        return self.config.run

    @property
    def model_id(self) -> str:
        return backend_model_id(self.config.backend)

    def engine(self, backend: BackendConfig | None = None) -> tuple[str, int]:
        """What of an engine shapes a shard's rows: the weights and the context size (what fits)."""
        backend = backend or self.config.backend
        return backend_model_id(backend), backend.n_ctx

    # -- clients: one per distinct backend; one cache file (keys include the model id) --------
    def _client(self, role: str, backend: BackendConfig) -> GenerationClient:
        # A backend serves under the first role that uses it: a judge on the policy's model is the
        # policy's client (one model in memory), and its traffic counts as the policy's, as before.
        role = next(r for r in self.CLIENT_ROLES if self._backend_of(r) == backend)
        with self._lock:
            if role not in self.clients:
                self.clients[role] = GenerationClient(load_backend(backend), self._cache())
            return self.clients[role]

    def _backend_of(self, role: str) -> BackendConfig:
        return {"generation": self.config.backend, "judge_generation": self.judge_backend(),
                "writer_generation": self.writer_backend()}[role]

    def client(self) -> GenerationClient:
        return self._client("generation", self.config.backend)

    def judge_backend(self) -> BackendConfig:
        return self.config.verify.judge_backend or self.config.backend

    def judge_client(self) -> GenerationClient:
        """The judge's client: the policy's, unless ``verify.judge_backend`` names another model."""
        return self._client("judge_generation", self.judge_backend())

    def writer_backend(self) -> BackendConfig:
        """The reasoning writer's backend config: augment_backend, else the judge's, else the policy's."""
        return self.config.augment_backend or self.config.verify.judge_backend or self.config.backend

    def writer_client(self) -> GenerationClient:
        return self._client("writer_generation", self.writer_backend())

    def counters(self) -> dict[str, dict]:
        """Each loaded client's counters, by the role it serves under."""
        return {role: client.counters() for role, client in self.clients.items()}

    # -- saturation: samples in flight over a run's whole wall time ------------------------
    def open_window(self) -> None:
        """Start measuring saturation (a run's start): clients loaded later count from zero."""
        areas = {role: c.stats.area_now() for role, c in self.clients.items()}
        self._window = (time.perf_counter(), time.time(), areas)

    @property
    def window_opened_at(self) -> float | None:
        """Wall-clock time (epoch seconds) the saturation window opened."""
        return self._window[1] if self._window else None

    def saturation(self) -> dict[str, dict]:
        """Per client role: mean samples in flight over the window's whole wall time — idle gaps
        between stages and shards included, unlike a mean taken only while something is in flight —
        beside the client's bound. Empty before ``open_window``."""
        if self._window is None:
            return {}
        started, _, areas = self._window
        wall = time.perf_counter() - started
        figures = {}
        for role, client in self.clients.items():
            area = client.stats.area_now() - areas.get(role, 0.0)
            mean = area / wall if wall > 0 else 0.0
            figures[role] = {
                "wall_seconds": round(wall, 3), "in_flight_seconds": round(area, 3), "mean_in_flight": round(mean, 3),
                "limit": client.max_in_flight, "ratio": round(mean / client.max_in_flight, 4),
            }
        return figures

    def _cache(self) -> GenerationCache:
        return GenerationCache(self.store.root / "cache" / "generations.sqlite")

    # -- progress --------------------------------------------------------------------------
    def track(self, label: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        return reporter().track(label, total)

    # -- human review evidence -------------------------------------------------------------
    def human_review(self) -> dict[str, list[dict]]:
        """problem_id → the run's human review evidence as it stands (each annotation's latest version),
        re-read whenever a pull has written a review shard since the last call."""
        manifests = self.store.manifests(self.run, review.STAGE)
        version = tuple(m.shard for m in manifests)
        if self._review is None or self._review[0] != version:
            by_problem: dict[str, list[dict]] = {}
            for row in review.latest(self.store.read_rows("evaluations", manifests)):
                by_problem.setdefault(row["problem_id"], []).append(row)
            self._review = (version, by_problem)
        return self._review[1]

    def human_review_rows(self) -> list[dict]:
        return [row for rows in self.human_review().values() for row in rows]

    def human_evidence(self, problem_shard: str) -> list[dict]:
        """The human review evidence on the problems of one problem shard."""
        evidence = self.human_review()
        if not evidence:
            return []
        manifest = self.store.manifest(self.run, INGEST, problem_shard)
        if manifest is None:
            return []
        problem_ids = self.store.read("problems", [manifest]).column("problem_id").to_pylist()
        return [row for pid in sorted(set(problem_ids)) for row in evidence.get(pid, [])]

    def review_items(self) -> list[dict]:
        """Every trajectory pushed to review (first push wins for an item recorded twice)."""
        rows = self.store.read_rows("review_items", self.store.manifests(self.run, review.STAGE))
        first: dict[str, dict] = {}
        for row in sorted(rows, key=lambda r: r["pushed_at"]):
            first.setdefault(row["item_id"], row)
        return list(first.values())

    def close(self) -> None:
        self.checker.close()
