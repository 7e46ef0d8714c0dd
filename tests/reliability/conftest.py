"""The reliability suite: one real Serve app on loopback for the package, a summary JSON at the end.

Every test module here sets ``pytestmark = pytest.mark.reliability``, so ``make reliability`` (``pytest -m
reliability tests``) runs them all at full size. ``make test`` runs them too, CI-sized where a test
has a size (the load and fault tests read :func:`full_enabled`: a short concurrent load, one killed
replica, one killed training task); tests marked ``reliability_full`` (the long fuzz run) only run
when ``-m reliability`` is given or ``HMOE_RELIABILITY=1`` is set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

API_KEY = "reliability-key-0123456789"
EXPERTS = ("math", "code", "conversation")
MAX_TOKENS_CAP = 16
ROOT = Path(__file__).resolve().parents[2]

SUMMARY: dict[str, Any] = {"suite": "fast", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "inputs_tried": {}, "requests_served": 0, "errors_by_class": {},
                           "latency_ms": {}, "recovery_s": {}, "memory_growth": {}, "checks": {}}


def full_enabled(config: pytest.Config) -> bool:
    expr = config.getoption("-m") or ""
    return os.environ.get("HMOE_RELIABILITY") == "1" or ("reliability" in expr and "not reliability" not in expr)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability_full: long reliability test (make reliability only)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if full_enabled(config):
        SUMMARY["suite"] = "full"
        return
    skip = pytest.mark.skip(reason="full reliability suite: make reliability (or HMOE_RELIABILITY=1)")
    for item in items:
        if "reliability_full" in item.keywords:
            item.add_marker(skip)


def count_errors(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


def record(section: str, key: str, value: Any) -> None:
    SUMMARY[section][key] = value


def _artifact_path() -> Path:
    base = os.environ.get("HMOE_TEST_ARTIFACTS")
    return Path(base) / "reliability.json" if base else ROOT / "bench" / "results" / "reliability.json"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not any(SUMMARY[k] for k in ("inputs_tried", "checks", "latency_ms")):
        return  # the suite did not run (another directory was selected)
    SUMMARY["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = _artifact_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(SUMMARY, indent=2, sort_keys=True)
    path.write_text(text + "\n")
    terminalreporter.write_sep("=", f"reliability summary -> {path}")
    terminalreporter.write_line(text)




@pytest.fixture(scope="package")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serving.testing import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("rel-run"), experts=EXPERTS)


@pytest.fixture(scope="package")
def server(tiny_run: Path):
    """Base URL of a running app (three tiny experts, an API key); torn down with the package."""
    import ray
    from serving.config import AppArgs
    from serving.testing import running_app

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    args = AppArgs(run_dir=str(tiny_run), experts=list(EXPERTS), api_key=API_KEY,
                   max_tokens_cap=MAX_TOKENS_CAP, max_batch=16, max_queued_requests=64)
    # 3 logical CPUs on a 2-core machine: the replicas take 1.1 and a training task 0.5
    with running_app(args, num_cpus=3, wait_ready_s=240) as url:
        yield url


@pytest.fixture()
def client(server: str):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c
