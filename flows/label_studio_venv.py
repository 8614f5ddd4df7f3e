"""The virtual environment Label Studio runs from, built once and shared by every checkout.

Label Studio pins Django-side packages that conflict with Prefect's, so it can never live in the
project's venv: :func:`ensure_label_studio` builds a separate venv (pinned by the shipped
``data/label-studio.lock``), and :mod:`stepforge.flows.review_server` runs the server as a child
process of that venv's interpreter.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

LABEL_STUDIO_VERSION = "1.23.2"
VENV_ENV = "STEPFORGE_LABEL_STUDIO_VENV"
_MARKER = ".stepforge-label-studio-version"
_INSTALL_LOG = "stepforge-install.log"


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started or reached; the message says what to look at."""


def default_venv() -> Path:
    """Where Label Studio's venv lives: ``$STEPFORGE_LABEL_STUDIO_VENV`` (the Makefile points it into
    the checkout), else a per-user cache shared by every checkout, since it takes minutes to build."""
    configured = os.environ.get(VENV_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    return Path.home() / ".cache" / "stepforge" / f"label-studio-{LABEL_STUDIO_VERSION}"


def lock_file() -> Path:
    """The constraints file, found as package data so an installed stepforge has it too."""
    return Path(str(resources.files("stepforge.flows") / "data" / "label-studio.lock"))


def _base_python() -> str:
    # Never the project venv's own python: a venv made from it would still be a sibling, but
    # python3.11 is the interpreter the lock was frozen with.
    return shutil.which("python3.11") or getattr(sys, "_base_executable", None) or sys.executable


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, for an error message (a note instead if it cannot be read)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _installed_version(venv: Path) -> str | None:
    marker = venv / _MARKER
    try:
        return marker.read_text().strip() or None
    except OSError:
        return None


def ensure_label_studio(venv: Path | None = None, python: str | None = None) -> Path:
    """The ``label-studio`` executable of a venv holding exactly :data:`LABEL_STUDIO_VERSION`.

    Builds the venv when it is missing or holds another version (a marker file, written only after a
    successful install, records the version), so an interrupted install is redone, not trusted.
    An exclusive file lock lets concurrent callers (two test sessions, a CLI) wait for one build.
    """
    venv = Path(venv).expanduser().absolute() if venv is not None else default_venv()
    exe = venv / "bin" / "label-studio"
    if exe.exists() and _installed_version(venv) == LABEL_STUDIO_VERSION:
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock_handle:
        fcntl.flock(lock_handle, fcntl.LOCK_EX)
        if exe.exists() and _installed_version(venv) == LABEL_STUDIO_VERSION:
            return exe  # another process built it while we waited
        _build_venv(venv, python or _base_python())
    return exe


def _build_venv(venv: Path, python: str) -> None:
    if venv.exists():
        if not (venv / "pyvenv.cfg").exists() and any(venv.iterdir()):
            raise LabelStudioError(
                f"{venv} exists and is not a virtual environment: refusing to replace it. "
                f"Point {VENV_ENV} at an empty or new directory."
            )
        shutil.rmtree(venv)  # a stale or half-built venv: rebuild from scratch rather than patch it
    constraints = lock_file()
    if not constraints.exists():
        raise LabelStudioError(f"the Label Studio constraints file is missing: {constraints}")
    print(
        f"stepforge: installing Label Studio {LABEL_STUDIO_VERSION} into {venv} (once; takes a few minutes)",
        file=sys.stderr,
        flush=True,
    )
    venv.mkdir(parents=True)
    log_path = venv / _INSTALL_LOG
    steps = [
        [python, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "-c", str(constraints), f"label-studio=={LABEL_STUDIO_VERSION}",
        ],
    ]
    with open(log_path, "a") as log:
        for cmd in steps:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            try:
                result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
            except OSError as exc:
                raise LabelStudioError(f"cannot run {cmd[0]}: {exc.strerror}") from None
            if result.returncode != 0:
                raise LabelStudioError(
                    f"installing Label Studio {LABEL_STUDIO_VERSION} into {venv} failed ({cmd[2]} exited "
                    f"{result.returncode}); it needs network access to PyPI. Full log: {log_path}\n"
                    f"{log_tail(log_path, 25)}"
                )
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True, text=True, check=False,
    )
    found = probe.stdout.strip()
    if probe.returncode != 0 or found != LABEL_STUDIO_VERSION:
        raise LabelStudioError(f"{venv} holds label-studio {found or '(none)'} after install, not {LABEL_STUDIO_VERSION}")
    (venv / _MARKER).write_text(LABEL_STUDIO_VERSION + "\n")
