"""Which experts are down: after a replica dies, its requests fail fast (503) until it is back.

Serve restarts a dead replica on its own, but requests sent meanwhile wait in the handle until
the new one is up (about 10 s here), or forever if it never comes back. The ingress marks an
expert down when a call to it fails with a replica-death error; while it is down, requests for it
get 503 + Retry-After at once, and a background probe clears the mark when the expert answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from serving.errors import NotReady

log = logging.getLogger(__name__)


def is_replica_death(exc: BaseException) -> bool:
    """True for the errors that mean a replica is gone (not for errors raised by its code)."""
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    return isinstance(exc, (ray_exc.RayActorError, serve_exc.ReplicaUnavailableError,
                            serve_exc.DeploymentUnavailableError))


class ExpertHealth:
    """Down-marks per expert, cleared by a probe (``handle.info``) that answers within a deadline."""

    def __init__(self, handles: Mapping[str, Any], *, probe_interval_s: float = 0.5,
                 probe_timeout_s: float = 2.0) -> None:
        self.handles = dict(handles)
        self.down: dict[str, float] = {}  # expert -> time it was marked down
        self.recoveries: list[float] = []  # seconds each outage lasted, as seen by the ingress
        self.probe_interval_s, self.probe_timeout_s = probe_interval_s, probe_timeout_s
        self._probe: asyncio.Task | None = None

    def check(self, names: list[str]) -> None:
        """Raise a 503 if any of ``names`` is down."""
        down = [n for n in names if n in self.down]
        if down:
            since = time.monotonic() - min(self.down[n] for n in down)
            raise NotReady(f"expert {', '.join(down)} is restarting (down for {since:.1f} s); retry shortly",
                           retry_after_s=1)

    def mark_down(self, name: str, exc: BaseException) -> None:
        if name not in self.down:
            log.warning("expert %s is down (%s); failing its requests fast until it answers", name,
                        type(exc).__name__)
            self.down[name] = time.monotonic()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while self.down:
            await asyncio.sleep(self.probe_interval_s)
            for name in list(self.down):
                try:
                    await asyncio.wait_for(self.handles[name].info.remote(), self.probe_timeout_s)
                except Exception:  # still restarting
                    continue
                self.recoveries.append(round(time.monotonic() - self.down.pop(name), 3))
                log.warning("expert %s is back after %.1f s", name, self.recoveries[-1])

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"down": {n: round(now - t, 3) for n, t in self.down.items()}, "recoveries_s": self.recoveries}
