"""prefect.yaml's deployments, served without a worker: ``stepforge serve``.

``prefect deploy --all`` registers prefect.yaml's deployments on a work pool, and a worker
(docker-compose.yml) runs them. :func:`serve_deployments` registers the same deployments from the
same file and runs their scheduled and triggered runs in one process, Prefect's ``serve``: the
team's schedules without a worker or Docker, e.g. next to a ``prefect server start`` on one
machine.

What is read from each entry of ``deployments:`` (anchors under ``definitions:`` are resolved by
the YAML loader): name, entrypoint, parameters, schedules (cron / interval / rrule with their
timezone, anchor_date, active, parameters, slug, day_or), concurrency_limit (a number, or
limit + collision_strategy + grace_period_seconds), tags, description, paused and
enforce_parameter_schema (default true). The work pool, its job variables and the pull steps
are what a worker needs and are not used here: a served run is a subprocess of the serving
process and inherits its environment and working directory.
"""

from __future__ import annotations

import datetime
import importlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

# Top-level folders of this repository and the packages they install as (pyproject.toml).
PACKAGE_DIRS = {"flows": "stepforge.flows", "stages": "stepforge.stages"}

SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "anchor_date", "active", "parameters", "slug", "day_or"}


def load_prefect_yaml(path: str | Path = "prefect.yaml") -> dict[str, Any]:
    """The file as plain data, anchors and merge keys resolved."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise ValueError(f"{path}: no `deployments:` list")
    return data


def entrypoint_module(entrypoint: str) -> tuple[str, str]:
    """``flows/synthesize.py:synthesize`` → (``stepforge.flows.synthesize``, ``synthesize``).

    prefect.yaml names flows by file path (what a worker resolves in the source tree); the
    installed package has them under ``stepforge.*``, importable from any working directory.
    """
    file, sep, name = entrypoint.partition(":")
    path = PurePosixPath(file)
    if not sep or not name or path.suffix != ".py" or not path.parts or path.parts[0] not in PACKAGE_DIRS:
        raise ValueError(
            f"entrypoint {entrypoint!r}: expected <{'|'.join(PACKAGE_DIRS)}>/<module>.py:<flow function>"
        )
    module = ".".join([PACKAGE_DIRS[path.parts[0]], *path.with_suffix("").parts[1:]])
    return module, name


def flow_from_entrypoint(entrypoint: str) -> "Flow":
    """Import the Prefect flow an entrypoint names."""
    from prefect import Flow

    module, name = entrypoint_module(entrypoint)
    obj = getattr(importlib.import_module(module), name, None)
    if not isinstance(obj, Flow):
        raise TypeError(f"entrypoint {entrypoint!r}: {module}.{name} is not a Prefect flow")
    return obj


def schedule_from_yaml(entry: dict[str, Any]) -> "Schedule":
    """One item of a deployment's ``schedules:``, in the shape ``prefect deploy`` accepts."""
    from prefect.schedules import Schedule
    from pydantic import TypeAdapter

    unknown = set(entry) - SCHEDULE_KEYS
    if unknown:
        raise ValueError(f"schedule {entry!r}: unknown key(s) {sorted(unknown)}")
    kinds = [k for k in ("cron", "interval", "rrule") if entry.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError(f"schedule {entry!r}: exactly one of cron, interval, rrule")
    options: dict[str, Any] = {k: entry[k] for k in ("timezone", "active", "slug", "day_or") if entry.get(k) is not None}
    options["parameters"] = dict(entry.get("parameters") or {})
    if entry.get("interval") is not None:
        # Seconds as a number, or anything pydantic reads as a timedelta ("PT5M", "00:05:00").
        options["interval"] = TypeAdapter(datetime.timedelta).validate_python(entry["interval"])
        if entry.get("anchor_date") is not None:
            options["anchor_date"] = TypeAdapter(datetime.datetime).validate_python(entry["anchor_date"])
    elif entry.get("anchor_date") is not None:
        raise ValueError(f"schedule {entry!r}: anchor_date applies to interval schedules only")
    else:
        options[kinds[0]] = entry[kinds[0]]
    return Schedule(**options)


def concurrency_from_yaml(value: Any):
    """``concurrency_limit: 1`` or ``{limit: 1, collision_strategy: CANCEL_NEW}``."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dict):
        return ConcurrencyLimitConfig(**value)
    raise ValueError(f"concurrency_limit {value!r}: a number or a mapping with `limit`")


def deployments_from_yaml(path: str | Path = "prefect.yaml") -> list["RunnerDeployment"]:
    """Every deployment of prefect.yaml as a RunnerDeployment of its flow, ready for ``prefect.serve``."""
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for entry in load_prefect_yaml(path)["deployments"]:
        if not entry.get("name") or not entry.get("entrypoint"):
            raise ValueError(f"{path}: every deployment needs a name and an entrypoint ({entry!r})")
        flow = flow_from_entrypoint(entry["entrypoint"])
        schedules = [schedule_from_yaml(s) for s in entry.get("schedules") or []]
        deployments.append(
            flow.to_deployment(
                name=entry["name"],
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                concurrency_limit=concurrency_from_yaml(entry.get("concurrency_limit")),
                paused=entry.get("paused"),
                tags=list(entry.get("tags") or []),
                description=entry.get("description"),
                enforce_parameter_schema=entry.get("enforce_parameter_schema", True),
                # `stepforge.flows.synthesize.synthesize` rather than a path relative to the
                # serving process's working directory: runs import the installed package.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def serve_deployments(path: str | Path = "prefect.yaml", limit: int | None = None) -> None:
    """Register prefect.yaml's deployments and run their runs in this process until interrupted.

    ``limit`` caps the flow runs executing at once (default: none beyond each deployment's own
    concurrency_limit). On shutdown Prefect pauses the served deployments' schedules, so no runs
    pile up for a process that is gone; serving again resumes them.
    """
    from prefect import serve

    deployments = deployments_from_yaml(path)
    serve(*deployments, limit=limit)
