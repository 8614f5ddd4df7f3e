"""Label Studio as the review server: its own venv, loopback-only, secrets only in its environment.

The server tests run a real Label Studio 1.23.2 (the session fixture); the refusal tests check that
nothing is installed or started when a secret is missing or the bind address is public.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest
from label_studio import create_annotator, label_studio_fixture, wait_port_closed  # noqa: F401
from stepforge.flows import label_studio_venv, review_server
from stepforge.flows.review_server import (
    LABEL_STUDIO_VERSION,
    LabelStudioServer,
    ensure_label_studio,
    serve_command,
    start_label_studio,
)
from stepforge.flows.secrets import SecretError
from typer.testing import CliRunner

slow = pytest.mark.slow  # a fresh data dir migrates for ~30-60 s


def _client(server: LabelStudioServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30, trust_env=False)


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if anything tries to build the venv or launch a process."""

    def refuse(*args, **kwargs):
        raise AssertionError("Label Studio must not be installed or started here")

    monkeypatch.setattr(review_server, "ensure_label_studio", refuse)
    monkeypatch.setattr(review_server, "_launch", refuse)


@slow
def test_server_starts_and_preset_token_lists_projects(label_studio):
    with _client(label_studio) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "UP"}
        projects = client.get("/api/projects", headers=label_studio.headers)
        assert projects.status_code == 200, projects.text
        assert "results" in projects.json()
        version = client.get("/api/version", headers=label_studio.headers)
        assert version.status_code == 200 and LABEL_STUDIO_VERSION in version.text


@slow
def test_wrong_or_missing_token_is_rejected(label_studio):
    with _client(label_studio) as client:
        assert client.get("/api/projects", headers={"Authorization": "Token " + os.urandom(20).hex()}).status_code == 401
        assert client.get("/api/projects").status_code == 401


@slow
def test_secrets_never_in_argv_or_log(label_studio):
    with _client(label_studio) as client:  # some traffic, so the log has request lines to scan
        client.get("/api/projects", headers=label_studio.headers)
        client.get("/api/projects", headers={"Authorization": "Token wrong-token-x"})
    cmdline = Path(f"/proc/{label_studio.process.pid}/cmdline").read_bytes().decode()
    assert "label-studio" in cmdline and "start" in cmdline
    log = label_studio.log_file.read_text()
    assert "Starting development server" in log
    for secret in (label_studio.password, label_studio.token):
        assert secret not in cmdline
        assert secret not in log
        assert secret not in repr(label_studio)


def _listeners(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on ``port``, from /proc/net/tcp{,6} (hex as the kernel writes it)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def _non_loopback_ipv4() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent; this only picks the outgoing interface
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@slow
def test_listens_on_loopback_only(label_studio):
    assert _listeners(label_studio.port) == ["0100007F"]  # 127.0.0.1, and no IPv6 or wildcard socket
    with _client(label_studio) as client:  # and a DNS-rebound name is not served
        assert client.get("/health", headers={"Host": f"attacker.example:{label_studio.port}"}).status_code == 400
        assert client.get("/health", headers={"Host": f"localhost:{label_studio.port}"}).status_code == 200
    other = _non_loopback_ipv4()
    if other is not None:
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((other, label_studio.port)) != 0


@slow
def test_stop_closes_port_and_restart_keeps_token(label_studio):
    first_start = label_studio.startup_seconds
    label_studio.stop()
    try:
        assert not label_studio.running
        assert wait_port_closed(label_studio.host, label_studio.port)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{label_studio.url}/health", timeout=5, trust_env=False)
    finally:
        label_studio.restart()  # the server is shared by the session: bring it back whatever happened
    print(f"first start {first_start:.1f} s, restart on the same data dir {label_studio.startup_seconds:.1f} s")
    assert label_studio.startup_seconds < 60  # no migrations the second time
    with _client(label_studio) as client:
        assert client.get("/api/projects", headers=label_studio.headers).status_code == 200


@slow
def test_restart_after_kill_on_same_port(label_studio):
    port = label_studio.port
    label_studio.kill()
    try:
        assert label_studio.process.returncode is not None
    finally:
        label_studio.restart()
    assert label_studio.port == port
    with _client(label_studio) as client:
        assert client.get("/api/projects", headers=label_studio.headers).status_code == 200


@slow
def test_annotator_can_log_in_and_use_its_token(label_studio):
    email = f"annotator-{os.urandom(4).hex()}@example.com"
    password = os.urandom(12).hex()
    annotator = create_annotator(label_studio, email, password)
    assert annotator["email"] == email and isinstance(annotator["id"], int) and annotator["token"]
    assert annotator["token"] != label_studio.token
    with _client(label_studio) as client:
        me = client.get("/api/current-user/whoami", headers={"Authorization": f"Token {annotator['token']}"})
        assert me.status_code == 200 and me.json()["email"] == email
        members = client.get("/api/users", headers=label_studio.headers).json()
        assert email in {user["email"] for user in members}
    with _client(label_studio) as browser:  # the login form, as a person would use it
        review_server.login_session(browser, email, password)
        assert browser.get("/api/current-user/whoami").json()["id"] == annotator["id"]
    with _client(label_studio) as browser, pytest.raises(review_server.LabelStudioError, match="failed"):
        review_server.login_session(browser, email, "not-the-password")


@slow
def test_loopback_webhook_accepted(label_studio):
    """The session server is started with allow_loopback_webhooks: Label Studio's SSRF guard would refuse this URL."""
    config = '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="ok"/></Choices></View>'
    with _client(label_studio) as client:
        project = client.post("/api/projects", headers=label_studio.headers,
                              json={"title": "webhook check", "label_config": config})
        assert project.status_code == 201, project.text
        try:
            created = client.post("/api/webhooks/", headers=label_studio.headers, json={
                "project": project.json()["id"], "url": "http://127.0.0.1:9/hook",
                "send_payload": True, "send_for_all_actions": True,
            })
            assert created.status_code == 201, created.text
        finally:
            client.delete(f"/api/projects/{project.json()['id']}/", headers=label_studio.headers)


@slow
def test_signup_without_invite_is_refused(label_studio):
    with _client(label_studio) as client:
        client.get("/user/signup/")
        response = client.post("/user/signup/", data={
            "csrfmiddlewaretoken": client.cookies.get("csrftoken"),
            "email": f"stranger-{os.urandom(4).hex()}@example.com", "password": os.urandom(12).hex(),
        })
        assert response.status_code == 403


def _secret_env(monkeypatch, **values: str | None) -> None:
    for name in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_API_KEY"):
        value = values.get(name)
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_serve_refuses_missing_password_from_env(monkeypatch, nothing_starts, tmp_path):
    _secret_env(monkeypatch, LABEL_STUDIO_USERNAME="admin@example.com", LABEL_STUDIO_API_KEY="tok-" + "a" * 20)
    with pytest.raises(SecretError, match="environment variable LABEL_STUDIO_PASSWORD"):
        serve_command(data_dir=tmp_path / "ls")
    assert not (tmp_path / "ls").exists()


def test_serve_refuses_missing_password_from_file(monkeypatch, nothing_starts, tmp_path):
    _secret_env(monkeypatch, LABEL_STUDIO_PASSWORD="in-env-but-file-given")  # the file wins, not the env
    secrets = tmp_path / "ls.env"
    secrets.write_text("LABEL_STUDIO_USERNAME=admin@example.com\nLABEL_STUDIO_API_KEY=abcdefabcdef\n")
    secrets.chmod(0o600)
    with pytest.raises(SecretError, match=f"LABEL_STUDIO_PASSWORD.*{secrets}"):
        serve_command(data_dir=tmp_path / "ls", secrets_file=secrets)


def test_cli_review_server_reports_missing_secret(monkeypatch, nothing_starts, tmp_path):
    from stepforge.flows.cli import app

    password = "pw-" + os.urandom(8).hex()
    _secret_env(monkeypatch, LABEL_STUDIO_USERNAME="admin@example.com", LABEL_STUDIO_PASSWORD=password)
    result = CliRunner().invoke(app, ["review", "server", "--data-dir", str(tmp_path / "ls")])
    assert result.exit_code == 2, result.output
    assert "LABEL_STUDIO_API_KEY" in result.output and password not in result.output


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])
def test_non_loopback_host_refused_without_allow_remote(nothing_starts, tmp_path, host):
    with pytest.raises(ValueError, match="allow_remote=True"):
        start_label_studio(tmp_path / "ls", host=host, username="admin@example.com", password="pw", token="abcdefgh")
    assert not (tmp_path / "ls").exists()


def test_serve_refuses_non_loopback_host(monkeypatch, nothing_starts, tmp_path):
    _secret_env(monkeypatch, LABEL_STUDIO_USERNAME="admin@example.com", LABEL_STUDIO_PASSWORD="pw-secret",
                LABEL_STUDIO_API_KEY="abcdefabcdef")
    assert review_server.is_loopback("127.0.0.1") and review_server.is_loopback("::1")
    assert review_server.is_loopback("localhost")
    from stepforge.flows.cli import app

    result = CliRunner().invoke(app, ["review", "server", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "ls")])
    assert result.exit_code == 2 and "--allow-remote" in result.output


def test_bad_credentials_refused_before_start(nothing_starts, tmp_path):
    with pytest.raises(ValueError, match="e-mail"):
        start_label_studio(tmp_path, username="admin", password="pw", token="abcdefgh")
    with pytest.raises(ValueError, match="6 to 40"):
        start_label_studio(tmp_path, username="admin@example.com", password="pw", token="abc")


def test_ensure_is_idempotent_and_rebuilds_other_versions(monkeypatch, tmp_path):
    builds = []
    monkeypatch.setattr(label_studio_venv, "_build_venv", lambda venv, python: builds.append(venv))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "label-studio").write_text("")
    (venv / ".stepforge-label-studio-version").write_text(LABEL_STUDIO_VERSION + "\n")
    assert ensure_label_studio(venv) == venv / "bin" / "label-studio" and builds == []
    (venv / ".stepforge-label-studio-version").write_text("1.0.0\n")
    ensure_label_studio(venv)
    assert builds == [venv]
    monkeypatch.setenv("STEPFORGE_LABEL_STUDIO_VENV", str(venv))
    assert label_studio_venv.default_venv() == venv


def test_build_refuses_to_replace_a_non_venv_directory(tmp_path):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(review_server.LabelStudioError, match="not a virtual environment"):
        label_studio_venv._build_venv(keep, "python3")
    assert (keep / "notes.txt").read_text() == "mine"


def test_lock_file_ships_and_pins_label_studio():
    lock = label_studio_venv.lock_file()
    assert f"label-studio=={LABEL_STUDIO_VERSION}\n" in lock.read_text()
