"""A real Label Studio server for the review tests, started once per session from its own venv.

Import the fixture into a test module with ``from label_studio import label_studio_fixture  # noqa: F401``
(tests/ is on sys.path, as for ``asgi_server``) and ask for it as ``label_studio``: the function has
another name so the test parameters do not shadow an import (ruff F811). The venv is ``$STEPFORGE_LABEL_STUDIO_VENV``
(``make test`` builds it at .venv-label-studio) or the per-user cache; building it needs PyPI, and
without it the tests fail rather than skip, since a skipped review test proves nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest
from stepforge.flows.label_studio_venv import default_venv
from stepforge.flows.review_server import (
    LabelStudioError,
    LabelStudioServer,
    ensure_label_studio,
    start_label_studio,
)


@pytest.fixture(scope="session", name="label_studio")
def label_studio_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """Label Studio on a free loopback port with a random admin, password and (legacy) API token.

    Webhooks to loopback are allowed, so tests can receive them on an ASGI server. The yielded
    object has ``url``, ``token``, ``headers`` (``Authorization: Token ...``), ``username``,
    ``password``, ``port``, ``data_dir``, ``log_file``, ``process``, ``startup_seconds`` and
    ``stop()``, ``kill()``, ``restart()`` (same data dir, port and token). A test that kills or
    stops it must ``restart()`` it before it ends: the server is shared by the whole session.
    """
    try:
        ensure_label_studio()
    except LabelStudioError as exc:
        pytest.fail(
            f"cannot build Label Studio's venv at {default_venv()} (it needs network access to PyPI once; "
            f"or point STEPFORGE_LABEL_STUDIO_VENV at a built one): {exc}",
            pytrace=False,
        )
    server = start_label_studio(
        tmp_path_factory.mktemp("label-studio"),
        username=f"admin-{os.urandom(4).hex()}@example.com",
        password=os.urandom(16).hex(),
        token=os.urandom(20).hex(),
        allow_loopback_webhooks=True,
    )
    try:
        yield server
    finally:
        server.stop()


def create_annotator(server: LabelStudioServer, email: str, password: str) -> dict:
    """A second user of the server's organisation, signed up through the admin's invite link.

    The open-source build has one organisation whose members can all annotate, and its users API
    cannot set a password, so this does what a person would: sign up at ``/user/signup/?token=<invite>``
    (signup without the link is disabled on our servers), which logs the new user in; the session
    then reads the user's id and legacy API token. Returns ``id``, ``email``, ``password``, ``token``.
    """
    invite = httpx.get(f"{server.url}/api/invite", headers=server.headers, timeout=30, trust_env=False)
    if invite.status_code != 200:
        raise LabelStudioError(f"GET /api/invite answered {invite.status_code}: {invite.text[:200]}")
    invite_token = invite.json()["token"]
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
        client.get("/user/signup/", params={"token": invite_token})
        csrf = client.cookies.get("csrftoken")
        if not csrf:
            raise LabelStudioError("Label Studio's signup page set no csrftoken cookie")
        response = client.post(
            "/user/signup/", params={"token": invite_token},
            data={"csrfmiddlewaretoken": csrf, "email": email, "password": password},
        )
        if response.status_code != 302:  # an invalid form (taken e-mail, short password) re-renders with 200
            raise LabelStudioError(f"signing up {email} failed (HTTP {response.status_code})")
        whoami = client.get("/api/current-user/whoami")
        token = client.get("/api/current-user/token")
        if whoami.status_code != 200 or token.status_code != 200:
            raise LabelStudioError(
                f"the new user {email} cannot read its profile/token ({whoami.status_code}/{token.status_code})"
            )
    return {"id": whoami.json()["id"], "email": email, "password": password, "token": token.json()["token"]}


def wait_port_closed(host: str, port: int, timeout: float = 30) -> bool:
    """Whether nothing listens on ``port`` within ``timeout`` (a stopped server's socket closes promptly)."""
    from stepforge.flows.review_server import port_in_use

    deadline = time.monotonic() + timeout
    while port_in_use(host, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
