"""What the CLI's commands do, in one place: build a run's config (file or demo, overrides, checks),
backfill, export and report a stored run — with the user's mistakes as one-line ``UserError``s.

Commands stay thin: they parse arguments, call one function here, and print what it returns.
Every path comes from the store the caller names (``--store``), never from where the run was
made, so a store copied or moved elsewhere exports and reports what it did before.
"""

from __future__ import annotations

from pathlib import Path

from stepforge.flows import runtime
from stepforge.flows.errors import UserError


# -- a run's config, from a file or the demo, with the command line's overrides ---------------------
def run_config(config: Path | None, *, store=None, run=None, labeller=None, **sections):
    """The config of a new run: the YAML file (or the embedded demo) with the command line's overrides,
    checked for what would fail only later (a missing engine package, a missing input file)."""
    from stepforge.flows.config import RunConfig, demo_config

    top = {"store": store, "run": run, "labeller": labeller}
    cfg = RunConfig.from_yaml(config, **top) if config else demo_config(**top)
    cfg = with_overrides(cfg, **sections)
    require_engine(cfg)
    require_sources(cfg)
    try:
        runtime.chain_for(cfg)  # a plugin that does not import or does not fit the chain, before any work
    except runtime.RegistryError as exc:
        raise UserError(str(exc)) from exc
    return cfg


def require_engine(cfg) -> None:
    """Fail before any work when the chosen engine's package is missing, with what to install."""
    import importlib.util

    missing = []
    if cfg.backend.kind == "vllm" and importlib.util.find_spec("vllm") is None:
        missing.append("vLLM (a GPU machine): pip install 'stepforge[vllm]'")
    if cfg.ray is not None and importlib.util.find_spec("prefect_ray") is None:
        missing.append("Ray: pip install 'stepforge[ray]'")
    if missing:
        raise UserError("not installed: " + "; ".join(missing))


def require_sources(cfg) -> None:
    """Fail before any work (no orchestrator, no run record) when a local input file is missing."""
    from stepforge.stages.ingest.sources import check_sources

    try:
        check_sources(cfg.ingest)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc


def with_overrides(
    cfg, *, model=None, limit=None, verify=None, policy=None, backend=None, base_url=None, server=None,
    max_in_flight=None, ray=None, concurrent_shards=None,
):
    """The config with the command line's section-level overrides applied (and validated again)."""
    from stepforge.flows.config import RunConfig

    data = cfg.model_dump(mode="json")
    if backend or base_url:
        data["backend"]["kind"] = backend or "openai"
    if base_url:
        data["backend"]["http"]["base_url"] = base_url
    if server:
        data["backend"]["http"]["server"] = server
    if max_in_flight:
        data["backend"]["max_in_flight"] = max_in_flight
    if concurrent_shards is not None:
        data["concurrent_shards"] = concurrent_shards
    if ray:
        data["ray"] = {"address": None if ray == "local" else ray}
    if model:
        data["backend"]["model"] = model
    if limit is not None:
        data["ingest"]["limit"] = limit
    if verify is not None:
        data["verify"]["sources"] = [s.strip() for s in verify.split(",") if s.strip()]
    if policy:
        data["consensus"]["policy"] = policy
    return RunConfig.from_data(data, where="invalid option")


def parse_overrides(assignments: list[str], overrides_file: Path | None) -> dict:
    """Config overrides from a YAML file and ``dotted.key=value`` assignments (values parsed as YAML)."""
    import yaml

    from stepforge.flows.errors import read_yaml_mapping, yaml_error_message

    overrides: dict = read_yaml_mapping(overrides_file, what="overrides") if overrides_file else {}
    for item in assignments:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise UserError(f"--set {item!r}: expected dotted.key=value")
        node = overrides
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: the value is not YAML: {yaml_error_message(exc)}") from exc
    return overrides


def backfill_stored_run(store: Path, run: str, stages: list[str] | None, overrides: dict,
                        shards: list[str] | None, sql: str | None) -> dict:
    """``flows.backfill.backfill_run`` with its refusals as one-line errors."""
    from pydantic import ValidationError

    from stepforge.flows.backfill import BackfillError, backfill_run
    from stepforge.flows.config import RunConfig
    from stepforge.flows.errors import validation_message

    try:
        return backfill_run(store, run, stages, overrides, shards, sql)
    except runtime.UnknownRunError as exc:
        raise UserError(str(exc)) from exc
    except BackfillError as exc:  # what the selection or the settings would touch: exit 1, as before
        raise UserError(str(exc), exit_code=1) from exc
    except ValidationError as exc:  # the merged config does not validate
        raise UserError(f"the overrides do not make a valid config: {validation_message(exc, RunConfig)}") from exc
    except ValueError as exc:
        raise UserError(f"the overrides do not make a valid config: {exc}") from exc


# -- stored runs ---------------------------------------------------------------------------------------
class NothingToExport(UserError):
    """No complete shard chain: an export would write empty datasets."""


def open_stored_run(store: str | Path, run: str, out_dir: str | Path | None = None) -> tuple[runtime.RunContext, dict]:
    """The context of a stored run under its recorded config (export directory ``out_dir`` if given),
    and its record; ``UserError`` naming the run when the store has none."""
    try:
        record = runtime.load_run_record(store, run)
    except runtime.UnknownRunError as exc:
        raise UserError(str(exc)) from exc
    config = runtime.load_run_config(store, run, record)
    if out_dir is not None:
        config = config.model_copy(update={"export": config.export.model_copy(update={"out_dir": str(out_dir)})})
    return runtime.RunContext(config), record


def exportable_chains(ctx: runtime.RunContext, record: dict) -> tuple[list[dict], int, runtime.ShardManifest]:
    """The run's complete chains (as recorded if the record still holds, else from the source);
    ``NothingToExport`` when there is none."""
    chains, incomplete, reject_shard = runtime.run_chains(ctx, record)
    if not chains:
        raise NothingToExport(
            f"run {ctx.run!r} in {ctx.store.root} has no complete shard chain under its config "
            f"({incomplete} incomplete): run it to the end first (stepforge run), nothing was exported"
        )
    return chains, incomplete, reject_shard


def export_stored_run(store: str | Path, run: str, out_dir: str | Path | None = None) -> tuple[list[dict], int, str]:
    """Re-export a stored run's datasets (no generation); returns the summaries, how many problem
    shards were left out as incomplete, and the export directory."""
    ctx, record = open_stored_run(store, run, out_dir)
    try:
        chains, incomplete, reject_shard = exportable_chains(ctx, record)
        return runtime.export_run(ctx, chains, reject_shard), incomplete, ctx.config.export.out_dir
    finally:
        ctx.close()


def report_stored_run(store: str | Path, run: str, out: Path | None = None) -> tuple[Path, int]:
    """Write a stored run's HTML report; returns its path and how many problem shards were left out."""
    from stepforge.flows.report import write_report

    ctx, record = open_stored_run(store, run)
    try:
        chains, incomplete, reject_shard = exportable_chains(ctx, record)
        path = write_report(store, run, out, shards=runtime.figure_shard_keys(ctx, chains, reject_shard))
    finally:
        ctx.close()
    return path, incomplete
