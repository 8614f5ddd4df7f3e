"""The processes a test (or the whole session) started, found through /proc by an environment mark.

A process's initial environment is inherited by everything it starts, down to the servers its
children start, and stays readable in /proc/<pid>/environ after the parent is gone. So processes
carrying a mark are found wherever they ended up in the process tree, orphans reparented to init
included, which a walk down from the parent cannot find once the parent is dead. Linux only: where
/proc is missing nothing is found.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    pid: int
    cmdline: str

    def __str__(self) -> str:
        return f"{self.pid}: {self.cmdline[:300]}"


def _alive(pid: int) -> bool:
    """Running or sleeping: neither gone nor a zombie (dead, waiting for its parent to reap it)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def marked(name: str, value: str) -> list[Proc]:
    """Live processes other than this one whose initial environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in PROC.glob("[0-9]*") if PROC.is_dir() else ():
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if _alive(pid):
            found.append(Proc(pid, cmdline))
    return found


def listening_inodes() -> set[str]:
    """Socket inodes of every TCP socket in LISTEN state (IPv4 and IPv6) in this network namespace."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # st: 0A is TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def is_listening(pid: int, inodes: set[str]) -> bool:
    """Whether ``pid`` holds one of these listening sockets: whether it is a server."""
    try:
        fds = list((PROC / str(pid) / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def marked_servers(name: str, value: str) -> list[Proc]:
    inodes = listening_inodes()
    return [p for p in marked(name, value) if is_listening(p.pid, inodes)]


def wait_until_gone(find, deadline_seconds: float) -> list[Proc]:
    """Poll ``find()`` until it returns nothing or the deadline passes; what it returned last."""
    deadline = time.monotonic() + deadline_seconds
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_all(procs: list[Proc]) -> None:
    for proc in procs:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except OSError:
            pass
