"""A dead or unavailable replica maps to 503 with Retry-After (never a 500), in the one mapping module."""

from __future__ import annotations

import pytest

from serving.errors import to_serving_error

pytestmark = pytest.mark.reliability


def _unavailable_errors() -> list[BaseException]:
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    return [ray_exc.ActorDiedError(), ray_exc.ActorUnavailableError("gone", None), ray_exc.RayActorError(),
            serve_exc.DeploymentUnavailableError("Expert-math"), serve_exc.ReplicaUnavailableError("r1"),
            serve_exc.BackPressureError(num_queued_requests=10, max_queued_requests=8)]


@pytest.mark.parametrize("exc", _unavailable_errors(), ids=lambda e: type(e).__name__)
def test_replica_failures_are_503_with_retry_after(exc):
    err = to_serving_error(exc)
    assert err.status == 503, (type(exc).__name__, err.status, err.message)
    assert int(err.headers["Retry-After"]) >= 1
    assert "retry" in err.message
    r = err.response()
    assert r.status_code == 503 and r.headers["retry-after"]
