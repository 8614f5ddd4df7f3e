"""Secrets come from the environment or a secrets file, never from a config value or a command line.

Configs name *where* a secret is (an environment variable, a file), so a token never reaches a
config dump, a Prefect parameter, a shard, a log line or a cache key. A secrets file is either
the bare secret or ``KEY=VALUE`` lines (a docker-compose ``.env`` works); it must not be readable
by other users.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretError(RuntimeError):
    """A secret is missing or its file is unsafe; the message names where it was looked for, never the value."""


def _from_file(path: Path, key: str) -> str | None:
    path = path.expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise SecretError(f"cannot read secrets file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
        raise SecretError(f"secrets file {path} is readable or writable by other users: chmod 600 {path}")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    pairs = dict(line.split("=", 1) for line in lines if "=" in line)
    if pairs:
        value = pairs.get(key)
        return value.strip().strip("'\"") if value is not None else None
    return lines[0] if len(lines) == 1 else None


def read_secret(env: str, file: str | os.PathLike | None = None, *, required: bool = True) -> str | None:
    """The secret named ``env``: from ``file`` when given (its ``env=`` line, or its only line), else the
    environment. Missing and ``required`` → SecretError naming the variable and file, not a value."""
    value = _from_file(Path(file), env) if file is not None else os.environ.get(env)
    if value:
        return value
    if required:
        where = f"secrets file {file} (a line {env}=...)" if file is not None else f"environment variable {env}"
        raise SecretError(f"{env} is not set: put it in the {where}")
    return None
