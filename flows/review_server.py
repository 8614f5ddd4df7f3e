"""A real Label Studio server for human review, run from a virtual environment of its own.

Label Studio pins Django-side packages that conflict with Prefect's, so it can never live in the
project's venv: :mod:`stepforge.flows.label_studio_venv` builds a separate venv (pinned by the shipped
``data/label-studio.lock``), and the server runs as a child process of that venv's interpreter.

Secrets (admin password, API token) reach the child only through its environment, never its command
line (``ps`` shows argv to every user). The server binds to loopback unless the caller opts into a
remote bind, signing up requires the organisation's invite link, and the telemetry Label Studio
enables by default (Sentry, analytics, version check) is switched off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from stepforge.flows.label_studio_venv import LABEL_STUDIO_VERSION, LabelStudioError, ensure_label_studio, log_tail

USERNAME_ENV = "LABEL_STUDIO_USERNAME"
PASSWORD_ENV = "LABEL_STUDIO_PASSWORD"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"
_SERVER_LOG = "stepforge-label-studio.log"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.\-]{6,40}$")  # DRF keeps a token in 40 chars; Label Studio ignores <= 5


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server off the network (names other than localhost count as remote)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_host(host: str, allow_remote: bool) -> None:
    if not is_loopback(host) and not allow_remote:
        raise ValueError(
            f"refusing to bind Label Studio to non-loopback host {host!r}: it would be reachable from the network. "
            "Pass allow_remote=True (CLI: --allow-remote) if that is intended, and put TLS in front of it."
        )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may still take it before the server does)."""
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(_family(host)) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class LabelStudioServer:
    """A running (or stopped) Label Studio child process and how to reach it.

    ``restart()`` relaunches on the same data dir and port with the same secrets, so a fault test can
    ``kill()`` it mid-request and bring it back as a real crash-and-restart would.
    """

    url: str
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    token: str | None = field(repr=False)
    data_dir: Path
    log_file: Path
    executable: Path
    process: subprocess.Popen | None  # None until started
    allow_loopback_webhooks: bool
    startup_timeout: float
    startup_seconds: float = 0.0  # how long the last start took until ready (migrations make the first one slow)
    _log_handle: IO[bytes] | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """The legacy-token header Label Studio's API accepts (``Authorization: Token <token>``)."""
        if not self.token:
            raise LabelStudioError("this server has no API token")
        return {"Authorization": f"Token {self.token}"}

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (Label Studio shuts down cleanly on it), then SIGKILL if it is still up after ``timeout``."""
        if self.running:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, no shutdown: what a crash or an OOM kill looks like to clients."""
        if self.running:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def restart(self) -> LabelStudioServer:
        """Stop if running, start again on the same data dir and port, wait until ready; returns ``self``."""
        self.stop()
        return self._start()

    def _start(self) -> LabelStudioServer:
        started = time.monotonic()
        self.process, self._log_handle = _launch(
            self.executable, self.host, self.port, self.data_dir, self.log_file,
            _child_env(self.data_dir, self.host, self.username, self.password, self.token, self.allow_loopback_webhooks),
        )
        try:
            _wait_ready(self)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    # The child leads its own process group (start_new_session), so this reaches anything it forked.
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _child_env(
    data_dir: Path, host: str, username: str, password: str, token: str | None, allow_loopback_webhooks: bool
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", TOKEN_ENV}}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        USERNAME_ENV: username,
        PASSWORD_ENV: password,
        # A preset token is a legacy token: the organisation accepts it only if this is on at its first start.
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # Without it anyone who can reach the port signs up into the (only) organisation and sees every task.
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_SENTRY_DSN": "",  # the open-source build reports errors to Label Studio's Sentry by default
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        # Label Studio reads LABEL_STUDIO_X before the bare X, so these also mask an unrelated HOST or DEBUG=1.
        "LABEL_STUDIO_HOST": "",
        "LABEL_STUDIO_DEBUG": "false",
    })
    if token:
        env["LABEL_STUDIO_USER_TOKEN"] = token
    else:
        env.pop("LABEL_STUDIO_USER_TOKEN", None)
    if is_loopback(host):
        # Reject other Host headers: a web page cannot DNS-rebind its way to the loopback server.
        env["LABEL_STUDIO_ALLOWED_HOSTS"] = ",".join(dict.fromkeys([host, "localhost", "127.0.0.1", "[::1]"]))
    # Webhooks (and storages) to 127.0.0.1 or private addresses are refused as SSRF unless this is off.
    env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] = "false" if allow_loopback_webhooks else "true"
    return env


def _launch(
    exe: Path, host: str, port: int, data_dir: Path, log_file: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, IO[bytes]]:
    if port_in_use(host, port):
        # Label Studio would silently move to the next free port, and we would talk to whatever holds this one.
        raise LabelStudioError(f"port {port} on {host} is already in use: pick another port")
    log = open(log_file, "ab")  # noqa: SIM115 (the server object owns it until stop())
    cmd = [str(exe), "start", "--no-browser", "--internal-host", host, "--port", str(port)]
    try:
        process = subprocess.Popen(
            cmd, env=env, cwd=data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        log.close()
        raise LabelStudioError(f"cannot run {exe}: {exc.strerror}") from None
    return process, log


def _wait_ready(server: LabelStudioServer) -> None:
    import httpx

    deadline = time.monotonic() + server.startup_timeout
    with httpx.Client(base_url=server.url, timeout=5, trust_env=False) as client:
        while True:
            code = server.process.poll()
            if code is not None:
                raise LabelStudioError(
                    f"Label Studio exited with status {code} while starting (log {server.log_file}):\n"
                    f"{log_tail(server.log_file)}"
                )
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    f"Label Studio did not answer {server.url}/health within {server.startup_timeout:.0f} s "
                    f"(log {server.log_file}):\n{log_tail(server.log_file)}"
                )
            try:
                healthy = client.get("/health").status_code == 200
            except httpx.HTTPError:
                healthy = False
            if not healthy:
                time.sleep(0.25)
                continue
            if server.token is None:
                try:
                    server.token = session_token(server.url, server.username, server.password)
                except LabelStudioError as exc:
                    raise LabelStudioError(
                        f"{exc}. The data dir {server.data_dir} keeps the admin and password set at its first start."
                    ) from None
            response = client.get("/api/projects", params={"page_size": 1}, headers=server.headers)
            if response.status_code == 200:
                return
            raise LabelStudioError(
                f"Label Studio at {server.url} is up but rejects the API token ({response.status_code}). "
                f"Its data dir {server.data_dir} keeps the token (and admin) set at its first start: "
                "use that token, or a new data dir."
            )


def session_token(url: str, email: str, password: str) -> str:
    """Log in through the web form (as a browser would) and read the user's legacy API token.

    Label Studio has no password grant on its API; the login form plus ``/api/current-user/token``
    is how a user who knows only their password gets a token for scripts.
    """
    import httpx

    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        login_session(client, email, password)
        response = client.get("/api/current-user/token")
        if response.status_code != 200:
            raise LabelStudioError(f"{url}/api/current-user/token answered {response.status_code} for {email}")
        return response.json()["token"]


def login_session(client, email: str, password: str) -> None:
    """Log ``client`` (an ``httpx.Client`` on the server's URL) in through ``/user/login/``; the form wants
    Django's CSRF cookie and field, which the login page's GET sets."""
    client.get("/user/login/")
    csrf = client.cookies.get("csrftoken")
    if not csrf:
        raise LabelStudioError("Label Studio's login page set no csrftoken cookie")
    response = client.post(
        "/user/login/", data={"csrfmiddlewaretoken": csrf, "email": email, "password": password},
        headers={"Referer": str(client.base_url) + "/user/login/"},
    )
    # Success redirects; a failed login re-renders the form with 200.
    if response.status_code != 302:
        raise LabelStudioError(
            f"logging in to Label Studio as {email} failed (HTTP {response.status_code}): wrong e-mail or password"
        )


def start_label_studio(
    data_dir: Path,
    *,
    username: str,
    password: str,
    token: str | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    allow_loopback_webhooks: bool = False,
    allow_remote: bool = False,
    venv: Path | None = None,
    startup_timeout: float = 180,
    log_file: Path | None = None,
) -> LabelStudioServer:
    """Start Label Studio on ``data_dir`` and return once ``/health`` answers and the token lists projects.

    The admin (``username``, an e-mail) and ``token`` are created at the data dir's first start and kept
    after it: a later start with other values fails the token check with a clear error. ``token=None``
    lets Label Studio generate one, which is then read back by logging in. The caller owns the server:
    ``stop()`` it (or use :func:`label_studio_server`).
    """
    _check_host(host, allow_remote)
    if "@" not in username:
        raise ValueError(f"the Label Studio admin username must be an e-mail address, got {username!r}")
    if not password:
        raise ValueError("the Label Studio admin password is empty")
    if token is not None and not _TOKEN_RE.match(token):
        raise ValueError("the Label Studio API token must be 6 to 40 characters from [A-Za-z0-9_.-]")
    exe = ensure_label_studio(venv)
    data_dir = Path(data_dir).expanduser().absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # its SQLite database holds API tokens in clear
    log_file = Path(log_file).expanduser().absolute() if log_file else data_dir / _SERVER_LOG
    port = port or free_port(host)
    server = LabelStudioServer(
        url=_url(host, port), host=host, port=port, username=username, password=password, token=token,
        data_dir=data_dir, log_file=log_file, executable=exe, process=None,
        allow_loopback_webhooks=allow_loopback_webhooks, startup_timeout=startup_timeout,
    )
    return server._start()


@contextlib.contextmanager
def label_studio_server(data_dir: Path, **options) -> Iterator[LabelStudioServer]:
    """:func:`start_label_studio` (same keyword arguments) for the length of a ``with`` block; stopped
    however the block ends."""
    server = start_label_studio(data_dir, **options)
    try:
        yield server
    finally:
        server.stop()


def serve_command(
    host: str = "127.0.0.1",
    port: int = 8080,
    data_dir: Path = Path("stepforge-data/label-studio"),
    secrets_file: Path | None = None,
    allow_loopback_webhooks: bool = False,
    *,
    allow_remote: bool = False,
) -> int:
    """``stepforge review server``: Label Studio in the foreground until Ctrl-C or SIGTERM.

    The admin e-mail, password and API token come from ``secrets_file`` or the environment
    (:func:`stepforge.flows.secrets.read_secret`), all three required so the push/pull commands can
    use the same token; only where each came from is printed, never a value. Raises ``SecretError``
    before anything starts if one is missing. Returns the exit status for the CLI.
    """
    from stepforge.flows.secrets import read_secret

    _check_host(host, allow_remote)
    username = read_secret(USERNAME_ENV, secrets_file)
    password = read_secret(PASSWORD_ENV, secrets_file)
    token = read_secret(TOKEN_ENV, secrets_file)
    assert username and password and token  # read_secret raises when a required one is missing
    source = f"secrets file {secrets_file}" if secrets_file is not None else "the environment"

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        data_dir = Path(data_dir).expanduser().absolute()
        first = not (data_dir / "label_studio.sqlite3").exists()
        print(
            f"starting Label Studio {LABEL_STUDIO_VERSION} on {_url(host, port)} (data {data_dir}"
            + ("; first start migrates a new database, ~30 s" if first else "") + ")",
            flush=True,
        )
        with label_studio_server(
            data_dir, username=username, password=password, token=token, port=port, host=host,
            allow_loopback_webhooks=allow_loopback_webhooks, allow_remote=allow_remote,
        ) as server:
            print(
                f"Label Studio is up at {server.url}\n"
                f"  admin login: {username} ({USERNAME_ENV} and {PASSWORD_ENV} from {source})\n"
                f"  API token: {TOKEN_ENV} from {source}\n"
                f"  log: {server.log_file}\n"
                "Ctrl-C stops it.",
                flush=True,
            )
            code = server.process.wait()
            print(f"Label Studio exited with status {code}; log {server.log_file}:\n{log_tail(server.log_file)}",
                  file=sys.stderr)
            return code or 1
    except KeyboardInterrupt:
        print("stopped Label Studio", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
