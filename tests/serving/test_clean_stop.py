"""Stopping `hmoe serve` leaves nothing behind: after SIGTERM (even one followed at once by Ray's own
processes dying, as `ray stop` does) or when its Ray goes away, every process the server started is
gone and the port is free. Ray's processes are killed by pid here, never with `ray stop`, which would
also stop other tests' clusters."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from serving.procs import alive, descendants
from serving.testing import free_port, serve_subprocess

pytestmark = pytest.mark.ray
RAY_CORE = ("gcs_server", "raylet")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kill_ray(tree) -> None:
    for p in tree:
        if p.name.startswith(RAY_CORE) and alive(p):
            os.kill(p.pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["sigterm-then-ray-dies", "ray-dies"])
def test_nothing_outlives_the_server(tiny_run, how):
    port = free_port()
    with serve_subprocess(tiny_run, port, "--max-batch", "4") as proc:
        tree = descendants(proc.pid)
        assert set(RAY_CORE) <= {p.name for p in tree}, tree
        assert not _port_free(port)
        if how == "sigterm-then-ray-dies":
            proc.send_signal(signal.SIGTERM)
        _kill_ray(tree)
        code = proc.wait(timeout=90)
        out = proc.stdout.read()
    assert code == (0 if how.startswith("sigterm") else 1), out[-2000:]
    if how == "ray-dies":
        assert "Ray stopped under hmoe serve" in out
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in tree if alive(p)], "processes outlived the server"
    assert _port_free(port)
