"""prefect.yaml and `stepforge serve` (flows/deployments.py).

The file: it parses as `prefect deploy` reads it, every entrypoint is a flow of the package, the
parameters fit the flows' parameter schemas, the schedules are the ones we document, shared
pieces are declared once, and no secret is in it.

Serving (slow): a real Prefect server in a subprocess, `stepforge serve` in another; the
deployments land with their cron and interval schedules, a run with a parameter of the wrong
type is refused, and a triggered run of the synthesize deployment (a config that needs no model)
completes.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from stepforge.flows.deployments import (
    deployments_from_yaml,
    entrypoint_module,
    flow_from_entrypoint,
    schedule_from_yaml,
)

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"
PROCESSBENCH = REPO / "tests" / "fixtures" / "processbench_gsm8k_dev40.json"

# What the documentation (prefect.yaml's comments, README) promises.
CRON = {"synthesize-nightly": ("0 2 * * *", "UTC"), "review-push": ("0 6 * * *", "UTC")}
INTERVALS = {"review-pull": datetime.timedelta(seconds=300)}
FLOWS = {
    "synthesize-nightly": "synthesize",
    "synthesize-adhoc": "synthesize",
    "review-push": "review-push",
    "review-pull": "review-pull",
    "backfill": "backfill",
}


def raw() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def by_name() -> dict[str, dict]:
    return {d["name"]: d for d in raw()["deployments"]}


def no_model_config(store: Path, run: str = "served") -> dict:
    """Imported ProcessBench trajectories, tool verification only: nothing samples a model."""
    return {
        "run": run, "store": str(store), "shard_size": 4,
        "ingest": {"source": str(PROCESSBENCH), "format": "processbench", "limit": 4,
                   "gold_source": str(PROCESSBENCH.parent / "gsm8k_processbench40.jsonl")},
        "rollout": {"samples_per_problem": 0}, "labeller": "none",
        "verify": {"sources": ["tool"]},
        "consensus": {"policy": "tool"},
    }


# -- the file -------------------------------------------------------------------------------------
def test_prefect_deploy_reads_the_file() -> None:
    # The model `prefect deploy` validates prefect.yaml with (private, but it is the reader).
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(raw())
    assert [d.name for d in model.deployments] == list(FLOWS)
    for deployment in model.deployments:
        assert deployment.work_pool is not None and deployment.work_pool.name == "stepforge-local"


def test_every_entrypoint_is_a_flow_whose_schema_the_parameters_fit() -> None:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from stepforge.flows.config import RunConfig

    for name, deployment in by_name().items():
        assert deployment["enforce_parameter_schema"] is True, name
        file = deployment["entrypoint"].partition(":")[0]
        assert (REPO / file).is_file(), f"{name}: a worker resolves {file} in the source tree"
        flow = flow_from_entrypoint(deployment["entrypoint"])
        assert flow.name == FLOWS[name]
        schema = parameter_schema(flow).model_dump_for_openapi()
        validate(deployment["parameters"], schema, raise_on_error=True)  # what the API checks
        if flow.name == "synthesize":
            RunConfig.model_validate(deployment["parameters"]["config"])  # what the flow checks
        wrong = {key: 12345 for key in deployment["parameters"]}  # every declared parameter mistyped
        with pytest.raises(ValidationError):
            validate(wrong, schema, raise_on_error=True)


def test_the_schedules_are_the_documented_ones() -> None:
    for name, deployment in by_name().items():
        schedules = deployment.get("schedules") or []
        if name in CRON:
            assert [(s["cron"], s["timezone"]) for s in schedules] == [CRON[name]]
        elif name in INTERVALS:
            assert [schedule_from_yaml(s).interval for s in schedules] == [INTERVALS[name]]
        else:
            assert schedules == [], f"{name} is triggered by hand"
    built = {d.name: d for d in deployments_from_yaml(PREFECT_YAML)}
    cron = built["synthesize-nightly"].schedules[0].schedule
    assert (cron.cron, cron.timezone) == CRON["synthesize-nightly"]
    assert built["review-pull"].schedules[0].schedule.interval == INTERVALS["review-pull"]
    assert built["backfill"].schedules == [] and built["synthesize-adhoc"].schedules == []


def test_shared_pieces_are_declared_once_under_definitions() -> None:
    data = raw()
    definitions, deployments = data["definitions"], {d["name"]: d for d in data["deployments"]}
    pool = definitions["work_pools"]["stepforge_local"]
    # An alias loads as the very object of its anchor: identity means "referenced, not copied".
    assert all(d["work_pool"] is pool for d in deployments.values())
    assert deployments["synthesize-nightly"]["schedules"][0] is definitions["schedules"]["nightly"]
    assert deployments["review-pull"]["schedules"][0] is definitions["schedules"]["review_poll"]
    team = definitions["parameters"]["team_run"]
    assert deployments["review-pull"]["parameters"] is team
    assert {k: deployments["backfill"]["parameters"][k] for k in team} == team
    assert deployments["synthesize-nightly"]["parameters"]["config"] is definitions["configs"]["nightly"]
    nightly = definitions["configs"]["nightly"]
    assert (nightly["run"], nightly["store"]) == (team["run"], team["store"]), "review and backfill work on the nightly run"
    code = "\n".join(line.split("#", 1)[0] for line in PREFECT_YAML.read_text().splitlines())
    assert code.count("stepforge-local") == 1 and code.count("0 2 * * *") == 1
    assert len(re.findall(r"^\s*work_pool:\s*\*stepforge_local\s*$", code, re.M)) == len(deployments)


SECRET_KEY = re.compile(r"(?:^|[_-])(?:token|password|passwd|secret|api[_-]?key|credentials?)$", re.I)
SECRET_VALUE = re.compile(
    r"sk-[A-Za-z0-9]{8,}|\b[0-9a-f]{32,}\b|\b[A-Za-z0-9+/_-]{40,}={0,2}(?=\s|$)|://[^/\s:@]+:[^/\s@]+@", re.I
)


def walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def test_no_secret_is_in_the_file() -> None:
    for path, key, value in walk(raw()):
        assert not (SECRET_KEY.search(str(key)) and value), f"{path}: secrets come from the environment, not prefect.yaml"
        if isinstance(value, str):
            assert not SECRET_VALUE.search(value), f"{path} looks like a secret"
    assert not SECRET_VALUE.search(PREFECT_YAML.read_text())


def test_deployments_from_yaml_builds_what_serve_registers() -> None:
    built = {d.name: d for d in deployments_from_yaml(PREFECT_YAML)}
    assert list(built) == list(FLOWS)
    for name, deployment in by_name().items():
        runner = built[name]
        assert runner.flow_name == FLOWS[name]
        module, function = entrypoint_module(deployment["entrypoint"])
        assert runner.entrypoint == f"{module}.{function}"  # importable from any working directory
        assert runner.enforce_parameter_schema is True
        assert runner.parameters == deployment["parameters"]
        assert runner.tags == deployment["tags"]
        assert runner.description == deployment["description"]
        assert runner.work_pool_name is None, "served runs need no work pool"
    assert built["synthesize-nightly"].concurrency_limit == 1 and built["backfill"].concurrency_limit == 1
    assert built["review-pull"].concurrency_limit == 1
    assert built["review-pull"].concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert built["synthesize-adhoc"].concurrency_limit is None


def test_entrypoints_map_to_the_installed_package() -> None:
    assert entrypoint_module("flows/synthesize.py:synthesize") == ("stepforge.flows.synthesize", "synthesize")
    assert entrypoint_module("flows/review.py:review_pull") == ("stepforge.flows.review", "review_pull")
    for bad in ("flows/synthesize.py", "synthesize.py:synthesize", "tests/x.py:f", "flows/x.txt:f"):
        with pytest.raises(ValueError):
            entrypoint_module(bad)
    with pytest.raises(TypeError):
        flow_from_entrypoint("flows/config.py:demo_config")  # a function, not a flow
    with pytest.raises(ValueError):
        schedule_from_yaml({"cron": "0 2 * * *", "interval": 60})
    with pytest.raises(ValueError):
        schedule_from_yaml({"interval": 60, "every": "day"})


# -- serving against a real Prefect server ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the process group (the server's and the runner's children too), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def start(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        # A session of its own: stop() signals the whole group.
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_COLOR": "1", **extra}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port, SQLite in a temporary PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_UI_ENABLED="false",
        # Schedules are stored but make no runs here: the test triggers the one run it waits for.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    log = home / "server.log"
    proc = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 env, home, log)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240  # start-up takes 30-60 s on a busy 2-core machine
        while True:
            assert proc.poll() is None, f"the Prefect server exited:\n{tail(log)}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the Prefect server did not answer /api/health:\n{tail(log)}"
            time.sleep(1)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    """`stepforge serve --file prefect.yaml` against the server; yields the server's API URL."""
    work = tmp_path_factory.mktemp("serve")
    (work / "prefect-home").mkdir()
    env = clean_env(
        PREFECT_API_URL=prefect_server,
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_RUNNER_POLL_FREQUENCY="2",  # pick triggered runs up within seconds (default 10)
    )
    log = work / "serve.log"
    proc = start([sys.executable, "-m", "stepforge.flows.cli", "serve", "--file", str(PREFECT_YAML)], env, work, log)
    try:
        yield prefect_server, proc, log
    finally:
        stop(proc)


@pytest.fixture()
def client(served):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, proc, log = served
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def registered(client, served, timeout: float = 240) -> dict:
    """Every prefect.yaml deployment as the API stores it, once `stepforge serve` has registered them."""
    from prefect.exceptions import ObjectNotFound

    url, proc, log = served
    names = [f"{FLOWS[name]}/{name}" for name in FLOWS]
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"stepforge serve exited:\n{tail(log)}"
        try:
            return {name.split("/")[1]: client.read_deployment_by_name(name) for name in names}
        except ObjectNotFound:
            assert time.monotonic() < deadline, f"deployments not registered:\n{tail(log)}"
            time.sleep(2)


@pytest.mark.slow
def test_served_deployments_are_registered_with_their_schedules(client, served) -> None:
    deployments = registered(client, served)
    nightly = deployments["synthesize-nightly"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [("0 2 * * *", "UTC", True)]
    review = deployments["review-pull"]
    assert [(s.schedule.interval, s.active) for s in review.schedules] == [(datetime.timedelta(seconds=300), True)]
    assert deployments["backfill"].schedules == [] and deployments["synthesize-adhoc"].schedules == []
    for name, deployment in deployments.items():
        assert deployment.enforce_parameter_schema is True, name
        assert deployment.entrypoint == ".".join(entrypoint_module(by_name()[name]["entrypoint"]))
        assert deployment.parameters == json.loads(json.dumps(by_name()[name]["parameters"]))
        assert not deployment.paused, name
    # The deployment concurrency limit is a global concurrency limit on the server.
    assert nightly.global_concurrency_limit.limit == 1
    assert review.global_concurrency_limit.limit == 1
    assert review.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deployments["synthesize-adhoc"].global_concurrency_limit is None
    assert set(review.parameter_openapi_schema["properties"]) == {"run", "store", "rerun"}


@pytest.mark.slow
def test_the_api_refuses_a_run_with_a_mistyped_parameter(client, served) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    deployments = registered(client, served)
    before = len(client.read_flow_runs())
    for name, parameters in [
        ("synthesize-adhoc", {"config": "not a mapping"}),
        ("review-pull", {"run": 7}),
        ("backfill", {"stages": "consensus"}),  # a string where a list belongs
        # Typed all the way down: a key RunConfig does not have, a value of the wrong type.
        ("backfill", {"run": "bf", "overrides": {"consensus": {"polcy": "vote"}}}),
        ("synthesize-adhoc", {"config": {"ingest": {"source": "x.jsonl"}, "shard_size": "many"}}),
    ]:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployments[name].id, parameters=parameters)
        assert refused.value.response.status_code == 409, name
        assert "Validation failed" in refused.value.response.text
    assert len(client.read_flow_runs()) == before, "no run was created"


@pytest.mark.slow
def test_a_triggered_run_of_a_served_deployment_completes(client, served, tmp_path) -> None:
    from prefect.deployments import run_deployment

    registered(client, served)
    url, proc, log = served
    store = tmp_path / "store"
    flow_run = run_deployment(
        "synthesize/synthesize-adhoc", parameters={"config": no_model_config(store)},
        timeout=600, poll_interval=2, as_subflow=False,
    )
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"{flow_run.state!r}\n--- stepforge serve ---\n{tail(log)}"
    )
    assert (store / "exports" / "served").is_dir(), "the run wrote its exports where its config says"
    assert any((store / "exports" / "served").iterdir())
    record = json.loads((store / "runs" / "served.json").read_text())
    assert record["status"] == "completed" and len(record["chains"]) == 1, "the four problems were labelled"
    assert sum(e["rows"] for e in record["exports"]) > 0


def polling(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_stopping_serve_pauses_the_schedules_and_serving_again_resumes_them(client, served, tmp_path) -> None:
    """No runs pile up for a `stepforge serve` that is gone; starting it again picks the schedules up.

    Its own `stepforge serve` processes (the module's keeps serving): last in this file, as it
    leaves the deployments as a stopped serve leaves them, paused.
    """
    url, _, _ = served
    registered(client, served)
    env = clean_env(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "prefect-home"))
    (tmp_path / "prefect-home").mkdir()
    paused = lambda: {name: client.read_deployment_by_name(f"{FLOWS[name]}/{name}").paused for name in FLOWS}  # noqa: E731
    for round, log in enumerate([tmp_path / "first.log", tmp_path / "second.log"]):
        # The runner's own webserver answers /health once it polls, which is after it has installed
        # its SIGTERM handler (a SIGTERM before that kills the process without pausing anything).
        port = free_port()
        health = f"http://127.0.0.1:{port}/health"
        runner_env = {**env, "PREFECT_RUNNER_SERVER_ENABLE": "true", "PREFECT_RUNNER_SERVER_HOST": "127.0.0.1",
                      "PREFECT_RUNNER_SERVER_PORT": str(port)}
        proc = start([sys.executable, "-m", "stepforge.flows.cli", "serve", "--file", str(PREFECT_YAML)],
                     runner_env, tmp_path, log)
        try:
            deadline = time.monotonic() + 120
            while not polling(health) or any(paused().values()):
                assert proc.poll() is None and time.monotonic() < deadline, f"serve did not start:\n{tail(log)}"
                time.sleep(1)
        finally:
            stop(proc, grace=60)  # SIGTERM, what `docker stop` or systemd sends
        assert proc.returncode == 0, tail(log)
        assert all(paused().values()), f"round {round}: stopping serve left schedules running:\n{tail(log)}"



@pytest.mark.slow
def test_a_triggered_backfill_of_a_served_run_completes(client, served, tmp_path) -> None:
    from prefect.deployments import run_deployment

    registered(client, served)
    url, proc, log = served
    store = tmp_path / "store"
    first = run_deployment("synthesize/synthesize-adhoc", parameters={"config": no_model_config(store, "bf")},
                           timeout=600, poll_interval=2, as_subflow=False)
    assert first.state.is_completed(), tail(log)
    again = run_deployment(
        "backfill/backfill",
        parameters={"run": "bf", "store": str(store), "stages": ["consensus", "pairs", "filter", "export"],
                    "overrides": {"consensus": {"policy": "vote"}}},
        timeout=600, poll_interval=2, as_subflow=False,
    )
    assert again.state is not None and again.state.is_completed(), f"{again.state!r}\n{tail(log)}"
    record = json.loads((store / "runs" / "bf.json").read_text())
    assert record["config"]["consensus"]["policy"] == "vote", "the backfill ran and the run follows the new policy"
