"""docker-compose.yml, read as compose reads it (no Docker here): the team stack's wiring and hygiene.

Pinned images, existing depends_on targets, declared volumes, the worker on the shared data
volume and on prefect.yaml's work pool, Label Studio on its own Postgres database, loopback-only
ports by default, secrets only as required `${VAR:?...}` references, and .env.example listing
every variable the file reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; `$$` escapes a `$` for the container.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
BARE = re.compile(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)")
REQUIRED = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}$")
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_KEY|CREDENTIAL", re.I)
NOT_SECRETS = {"LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"}  # a switch named after what it switches on


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def resolve(value: str) -> str:
    """What compose makes of ``value`` with no variable set: defaults applied, required ones as <VAR>."""

    def one(match: re.Match) -> str:
        name, op, arg = match.groups()
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return f"<{name}>"
        return ""

    return INTERPOLATION.sub(one, value)


def referenced_variables(text: str) -> set[str]:
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return {m.group(1) for m in INTERPOLATION.finditer(code)} | {m.group(1) for m in BARE.finditer(code)}


def url_credentials(value: str) -> list[tuple[str, str]]:
    """(user, password) of every ``scheme://user:password@host`` in ``value``, variable references kept whole."""
    refs: list[str] = []

    def hide(match: re.Match) -> str:
        refs.append(match.group(0))
        return f"\0{len(refs) - 1}\0"

    def show(text: str) -> str:
        return re.sub(r"\0(\d+)\0", lambda m: refs[int(m.group(1))], text)

    flat = INTERPOLATION.sub(hide, value)
    return [(show(user), show(password)) for user, password in re.findall(r"://([^/@:\s]+):([^/@\s]+)@", flat)]


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def prefect_work_pool() -> str:
    definitions = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]
    return definitions["work_pools"]["stepforge_local"]["name"]


def command_args(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else list(command)


# -- shape ----------------------------------------------------------------------------------------
def test_the_stack_has_its_services() -> None:
    assert {"postgres", "prefect-server", "worker", "label-studio"} <= set(services())


def test_every_image_is_pinned_or_built_here() -> None:
    for name, service in services().items():
        if "build" in service:
            build = service["build"]
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} is missing"
            continue
        image = service.get("image", "")
        assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{name}: {image!r} has no tag"
        tag = image.rsplit(":", 1)[-1]
        assert tag != "latest" and re.match(r"^\d+\.\d+", tag), f"{name}: {image!r} is not pinned to a release"
    assert services()["prefect-server"]["image"].startswith("prefecthq/prefect:3.8.8-")


def test_depends_on_names_services_of_the_file() -> None:
    names = set(services())
    for name, service in services().items():
        depends = service.get("depends_on") or []
        for target in depends:
            assert target in names, f"{name} depends on an unknown service {target!r}"
            if isinstance(depends, dict):
                condition = depends[target].get("condition", "service_started")
                assert condition in {"service_started", "service_healthy", "service_completed_successfully"}
                if condition == "service_healthy":
                    assert "healthcheck" in services()[target], f"{name} waits for {target}'s health, which has no check"


def test_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    used = set()
    for name, service in services().items():
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} mounts an undeclared volume {source!r}"
                used.add(source)
            elif source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
    assert used == declared, f"declared but unused: {declared - used}"


# -- wiring ---------------------------------------------------------------------------------------
def test_the_worker_runs_prefect_yamls_pool_on_the_shared_data_volume() -> None:
    worker = services()["worker"]
    args = command_args(worker)
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == prefect_work_pool()
    assert args[args.index("--type") + 1] == "process"
    dockerfile = (REPO / worker["build"]["dockerfile"]).read_text()
    assert f'"--pool", "{prefect_work_pool()}"' in dockerfile, "the image's default command polls the same pool"
    assert re.search(r"pip install .*'\.\[[^\]]*\breview\b[^\]]*\]'", dockerfile), "the worker has the review extra"

    assert "stepforge-data:/data" in worker["volumes"]
    # prefect.yaml's paths are on that volume: the store, the incoming problems, the model cache.
    prefect = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]
    nightly = prefect["configs"]["nightly"]
    assert nightly["store"].startswith("/data/") and nightly["ingest"]["source"].startswith("/data/")
    assert prefect["job_variables"]["env"]["STEPFORGE_MODEL_CACHE"].startswith("/data/")
    assert prefect["parameters"]["team_run"]["store"].startswith("/data/")

    env = environment(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    # The review flows reach Label Studio by its service name, as the nightly config says.
    assert nightly["review"]["url"] == "http://label-studio:8080" and "label-studio" in services()
    assert "8080" in str(services()["label-studio"].get("ports")) or "8080" in str(services()["label-studio"].get("command"))
    assert REQUIRED.match(env["LABEL_STUDIO_API_KEY"])
    # The worker's token is the one Label Studio presets for its first account.
    token = REQUIRED.match(environment(services()["label-studio"])["LABEL_STUDIO_USER_TOKEN"]).group(1)
    assert REQUIRED.match(env["LABEL_STUDIO_API_KEY"]).group(1) == token
    server_db = environment(services()["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert resolve(server_db).startswith("postgresql+asyncpg://") and "@postgres:5432/" in server_db


def test_label_studio_uses_its_own_postgres_database() -> None:
    ls, pg = environment(services()["label-studio"]), environment(services()["postgres"])
    assert ls["DJANGO_DB"] == "default"
    assert ls["POSTGRE_HOST"] == "postgres" and services()["postgres"]["image"].startswith("postgres:")
    assert ls["POSTGRE_PORT"] == "5432"
    # The names Label Studio connects with are the ones the init script creates ...
    for ls_key, pg_key in [("POSTGRE_NAME", "LABEL_STUDIO_DB_NAME"), ("POSTGRE_USER", "LABEL_STUDIO_DB_USER"),
                           ("POSTGRE_PASSWORD", "LABEL_STUDIO_DB_PASSWORD")]:
        assert ls[ls_key] == pg[pg_key], f"{ls_key} and the postgres service's {pg_key} differ"
    # ... a database other than Prefect's, by another role.
    assert resolve(ls["POSTGRE_NAME"]) != resolve(pg["POSTGRES_DB"])
    assert resolve(ls["POSTGRE_USER"]) != resolve(pg["POSTGRES_USER"])
    assert "./docker/postgres-init:/docker-entrypoint-initdb.d:ro" in services()["postgres"]["volumes"]
    script = REPO / "docker" / "postgres-init" / "10-labelstudio.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    text = script.read_text()
    for name in ("LABEL_STUDIO_DB_NAME", "LABEL_STUDIO_DB_USER", "LABEL_STUDIO_DB_PASSWORD"):
        assert f"${{{name}" in text or f"${name}" in text
    assert "CREATE DATABASE" in text and "CREATE ROLE" in text
    # pg_isready over TCP: not ready while the init scripts run on the socket-only temporary server.
    assert "-h 127.0.0.1" in " ".join(services()["postgres"]["healthcheck"]["test"])

    assert ls["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert ls["LATEST_VERSION_CHECK"] == "false"
    assert "SSRF_PROTECTION_ENABLED" not in ls, "no webhooks from Label Studio to the worker: keep SSRF protection on"
    assert "Nothing in stepforge talks to it yet" not in COMPOSE.read_text()


def test_published_ports_bind_to_loopback_by_default() -> None:
    published = 0
    for name, service in services().items():
        for port in service.get("ports") or []:
            published += 1
            if isinstance(port, dict):
                host_ip = resolve(str(port.get("host_ip", "")))
            else:
                parts = resolve(str(port)).split(":")
                assert len(parts) == 3, f"{name}: {port!r} publishes on every interface"
                host_ip = parts[0]
            assert host_ip == "127.0.0.1", f"{name}: {port!r} binds to {host_ip!r}"
    assert published >= 2


# -- secrets and variables ------------------------------------------------------------------------
def test_every_secret_is_a_required_variable() -> None:
    for name, service in services().items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and key not in NOT_SECRETS:
                assert REQUIRED.match(value), f"{name}.{key} must be a ${{VAR:?...}} reference, not {value!r}"
            # Credentials inside URLs are variables too.
            for user, password in url_credentials(value):
                assert REQUIRED.match(password), f"{name}.{key}: the password in the URL must be ${{VAR:?...}}"
                assert INTERPOLATION.fullmatch(user), f"{name}.{key}: the user in the URL is a literal"
    # Wherever a secret variable is read, it is required: no silent empty or default password.
    for match in INTERPOLATION.finditer(COMPOSE.read_text()):
        name, op, _ = match.groups()
        if SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}}} is read with {op!r}, not ':?'"


def test_env_example_lists_every_variable_compose_reads() -> None:
    listed = env_example()
    used = referenced_variables(COMPOSE.read_text())
    assert used, "compose reads no variables?"
    assert used <= set(listed), f"missing from .env.example: {sorted(used - set(listed))}"
    assert not set(listed) - used, f".env.example lists variables compose never reads: {sorted(set(listed) - used)}"
    for name, value in listed.items():
        if SECRET_NAME.search(name):
            assert "change-me" in value, f".env.example: {name} must be a placeholder, not a value"
    # The defaults in .env.example are the defaults compose applies (one source of truth for a reader).
    defaults = {m.group(1): m.group(3) for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m.group(2) == ":-"}
    for name, default in defaults.items():
        assert listed[name] == default, f"{name}: .env.example says {listed[name]!r}, compose defaults to {default!r}"


def test_resolve_and_references() -> None:
    # The helpers above, on the forms compose supports.
    assert resolve("${A:-127.0.0.1}:80:80") == "127.0.0.1:80:80"
    assert resolve("x${B:?set B}y") == "x<B>y"
    assert resolve("$${NOT_A_VAR}") == "$${NOT_A_VAR}"
    assert referenced_variables("a: ${A:-1}\nb: $B\n# ${C}\nc: $$D") == {"A", "B"}
    assert url_credentials("pg://${U:-u}:${P:?set P in .env}@db:5432/x") == [("${U:-u}", "${P:?set P in .env}")]
    assert url_credentials("pg://admin:hunter2@db/x") == [("admin", "hunter2")]
    assert url_credentials("http://prefect-server:4200/api") == []
    server_db = environment(services()["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert len(url_credentials(server_db)) == 1, "the check above sees the server's database URL"
