"""The processes a server started, from ``/proc``: listed once it is up, watched, and stopped at the end.

A local Ray instance is a tree of processes under the ``hmoe serve`` driver (GCS, raylet, workers,
Serve's proxy and its HAProxy). Some outlive their parents when Ray is stopped from outside (an
orphaned HAProxy kept the API port), so the tree is listed while it is whole and every process in it
is stopped by identity (pid and start time, so a reused pid is never signalled). On a system without
``/proc`` the list is empty and nothing is watched or signalled.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")


class Proc(NamedTuple):
    pid: int
    start: int  # clock ticks after boot (field 22 of /proc/<pid>/stat)
    name: str


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of a live process, or None."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int | None = None) -> list[Proc]:
    """Every live process under ``root`` (default: this one)."""
    root = os.getpid() if root is None else root
    if not PROC.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for d in PROC.iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            children.setdefault(st[0], []).append(int(d.name))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        st = _stat(pid)
        if st is None:
            continue
        try:
            name = (PROC / str(pid) / "comm").read_text().strip()
        except OSError:
            continue
        out.append(Proc(pid, st[1], name))
        todo += children.get(pid, [])
    return out


def alive(p: Proc) -> bool:
    st = _stat(p.pid)
    return st is not None and st[1] == p.start and st[2] != "Z"


def stop(procs: list[Proc], *, grace_s: float = 5.0) -> list[Proc]:
    """SIGTERM the live ``procs``, SIGKILL those still there after ``grace_s``; return any left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        live = [p for p in procs if alive(p)]
        for p in live:
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            time.sleep(0.05)
            live = [p for p in live if alive(p)]
        if not live:
            return []
    return [p for p in procs if alive(p)]
