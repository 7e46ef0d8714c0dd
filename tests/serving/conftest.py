"""One real Serve app on loopback per test session, with tiny random-weight checkpoints."""

from __future__ import annotations


import httpx
import pytest

from serving.config import AppArgs
from serving.testing import make_tiny_run, running_app

API_KEY = "test-key-0123456789"
MAX_BODY = 8_192
MAX_TOKENS_CAP = 64



@pytest.fixture(scope="package")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    # an instruction-tuned expert, and the five merged into one MoE (served by default, by name only)
    return make_tiny_run(tmp_path_factory.mktemp("run"), instruct=("reasoning",), merged=True)


@pytest.fixture(scope="package")
def server(tiny_run):
    """Base URL of a running hmoe app (five tiny experts, their merged MoE, the tiny router, an API key).

    Package-scoped: Serve and Ray are shut down after tests/serving, so the replicas' CPUs are
    free again for the Ray training tasks of other packages.
    """
    import ray  # noqa: F401 - the fixture needs Ray
    # six models at 0.25 CPU each and two ingress replicas at 0.1 leave 0.3 of Ray's 2 CPUs for the
    # second app of test_router_deployment_placement_routes_like_the_ingress
    args = AppArgs(run_dir=str(tiny_run), api_key=API_KEY, max_body_bytes=MAX_BODY,
                   max_tokens_cap=MAX_TOKENS_CAP, max_batch=16, ensemble_top_k=2, expert={"num_cpus": 0.25})
    with running_app(args, num_cpus=2, wait_ready_s=180) as url:
        yield url


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c
