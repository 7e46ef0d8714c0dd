"""Which experts are down: after a replica dies, its requests fail fast (503) until it is back.

Serve restarts a dead replica on its own, but requests sent meanwhile wait in the handle until
the new one is up (about 10 s here), or forever if it never comes back: only a call the replica
had already accepted fails with a replica-death error; Serve's router retries any later one and
holds it until a replica is there. So the ingress replica that happens to have no call in flight
would learn of the death only from its first-answer deadline. An ingress replica marks an expert
down when a call to it fails with a replica-death error or misses that deadline, and tells the
other ingress replicas (``share``); requests still waiting for the expert's first answer stop
waiting (:meth:`ExpertHealth.first_answer`). While it is down, requests for it get 503 +
Retry-After at once, and a background probe clears the mark when the expert answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from serving.errors import NotReady

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_replica_death(exc: BaseException) -> bool:
    """True for the errors that mean a replica is gone (not for errors raised by its code)."""
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    return isinstance(exc, (ray_exc.RayActorError, serve_exc.ReplicaUnavailableError,
                            serve_exc.DeploymentUnavailableError))


class ExpertHealth:
    """Down-marks per expert, cleared by a probe (``handle.info``) that answers within a deadline;
    ``share(name)`` tells the other ingress replicas of a new mark."""

    def __init__(self, handles: Mapping[str, Any], *, share: Callable[[str], Awaitable[Any]] | None = None,
                 probe_interval_s: float = 0.5, probe_timeout_s: float = 2.0) -> None:
        self.handles = dict(handles)
        self.share = share
        self.down: dict[str, float] = {}  # expert -> time it was marked down
        self.recoveries: list[float] = []  # seconds each outage lasted, as seen by the ingress
        self.probe_interval_s, self.probe_timeout_s = probe_interval_s, probe_timeout_s
        self._probe: asyncio.Task | None = None
        self._marked: dict[str, asyncio.Event] = {}  # expert -> set when it is next marked down
        self._telling: set[asyncio.Task] = set()

    def check(self, names: list[str]) -> None:
        """Raise a 503 if any of ``names`` is down."""
        down = [n for n in names if n in self.down]
        if down:
            since = time.monotonic() - min(self.down[n] for n in down)
            raise NotReady(f"expert {', '.join(down)} is restarting (down for {since:.1f} s); retry shortly",
                           retry_after_s=1)

    def mark_down(self, name: str, exc: BaseException, *, share: bool = True) -> None:
        """Fail ``name``'s requests fast until it answers a probe; ``share``: tell the other replicas."""
        loop = asyncio.get_running_loop()
        if name not in self.down:
            log.warning("expert %s is down (%s); failing its requests fast until it answers", name,
                        type(exc).__name__)
            self.down[name] = time.monotonic()
            if name in self._marked:
                self._marked.pop(name).set()  # its requests waiting for a first answer stop waiting
            if share and self.share is not None:
                task = loop.create_task(self._tell(name))
                self._telling.add(task)
                task.add_done_callback(self._telling.discard)
        if self._probe is None or self._probe.done():
            self._probe = loop.create_task(self._probe_until_up())

    async def first_answer(self, names: list[str], answer: Awaitable[T], timeout_s: float) -> T:
        """``answer``'s result; ``asyncio.TimeoutError`` after ``timeout_s``, or the 503 of :meth:`check`
        as soon as one of ``names`` is marked down meanwhile (by this ingress replica or another): a
        request Serve holds for a dead replica does not wait out the deadline."""
        task = asyncio.ensure_future(answer)
        marks = [asyncio.ensure_future(self._marked.setdefault(n, asyncio.Event()).wait()) for n in names]
        done: set[asyncio.Future] = set()
        try:
            done, _ = await asyncio.wait([task, *marks], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, *marks):
                t.cancel()
            await asyncio.wait([task])  # ``answer`` has unwound before the caller closes its generator
        if task in done:
            return task.result()
        self.check(names)  # marked down while waiting
        raise asyncio.TimeoutError

    async def _tell(self, name: str) -> None:
        try:
            await self.share(name)
        except Exception as e:  # the others still find out by themselves (a death error or the deadline)
            log.warning("could not tell the other ingress replicas that expert %s is down (%r)", name, e)

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
