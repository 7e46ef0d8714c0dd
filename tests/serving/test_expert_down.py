"""Fail-fast after an expert replica dies, on every ingress replica, with fakes: no Ray, no SIGKILL
timing.

What Serve does, as the fakes play it: a call the dead replica had already accepted fails with
``ActorDiedError``; a later call gets no error, Serve's router holds it until a replacement is up
(here: never). So an ingress replica with no call in flight at the kill learned of the death only
from its first-answer deadline, 5.0 s + 0.1 s x 8 tokens = 5.8 s: the 5.84 s 503s of
``test_sigkill_expert_replica_during_load``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from ray.exceptions import ActorDiedError

from experts.tokenizer import Tokenizer
from serving.errors import to_serving_error
from serving.ingress import Ingress, IngressSettings
from serving.orchestrate import Job
from serving.testing import TEXTS

FAST_S = 1.0  # a 503 for a down expert comes this fast (the reliability suite allows 2.0)
HANG_S = 15.0  # longer than any deadline here: a request still open then has hung


class FakeExpert:
    """One ingress replica's handle to one expert's replica: ``kill()`` fails the calls in flight with
    ``ActorDiedError``; calls after it are held, never answered, as Serve holds them."""

    def __init__(self) -> None:
        self.calls, self.dead, self.in_flight = 0, False, []
        self.info = _Held()

    @property
    def generate_all(self) -> "FakeExpert":
        return self

    def remote(self, *args: Any) -> asyncio.Future:
        self.calls += 1
        fut = asyncio.get_running_loop().create_future()
        if not self.dead:
            self.in_flight.append(fut)
        return fut

    def kill(self) -> None:
        self.dead = True
        for fut in self.in_flight:
            if not fut.done():
                fut.set_exception(ActorDiedError())


class _Held:
    """``handle.info``, the health probe: held like any call while the replica is down."""

    def remote(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()


class FakeIngressHandle:
    """The Ingress deployment's own handle: ``broadcast`` calls a method on every replica."""

    def __init__(self, replicas: list[Any]) -> None:
        self.replicas = replicas

    def broadcast(self, method: str, *args: Any) -> Any:
        calls = [getattr(r, method)(*args) for r in self.replicas]

        class Response:
            async def results_async(self, *, timeout_s: float | None = None, return_exceptions: bool = False):
                return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=return_exceptions), timeout_s)

        return Response()


def _replicas(tmp_path: Path, n: int, first_token_timeout_s: float = 5.0) -> list[Any]:
    """``n`` ingress replicas (the real class, built without Serve), each with its own expert handle."""
    tok_file = tmp_path / "tokenizer.json"
    if not tok_file.exists():
        Tokenizer.train(TEXTS, vocab_size=400, min_frequency=1).save(tok_file)
    settings = IngressSettings(tokenizer_path=str(tok_file), contexts={"math": 128},
                               vocab_size=Tokenizer.load(tok_file).vocab_size, max_tokens_cap=16,
                               max_body_bytes=1_000_000, first_token_timeout_s=first_token_timeout_s)
    cls = Ingress.func_or_class.__bases__[0]  # the class under @serve.ingress's ASGI wrapper
    assert cls.__name__ == "Ingress", cls
    replicas = [cls({"math": FakeExpert()}, object(), settings) for _ in range(n)]  # a router: none built
    for r in replicas:
        r._replicas = FakeIngressHandle(replicas)  # what Serve's handle to this deployment reaches
    return replicas


def _job() -> Job:
    """A non-streaming /generate for math with max_tokens=8, as the load test sends."""
    return Job(ids=[1, 5, 6, 7], echo_from=1, route_text="What is 12 + 30?", model="math", mode="top1",
               max_tokens=8, params={"max_new_tokens": 8, "temperature": 0.0}, stops=[])


async def _answer(ingress: Any) -> tuple[int, float]:
    """(the status the route answers with, seconds) of one request."""
    t = time.perf_counter()
    try:
        await asyncio.wait_for(ingress.orch.collect(_job()), HANG_S)
        status = 200
    except asyncio.TimeoutError:
        status = 599
    except Exception as e:  # what the exception handlers map it to
        status = to_serving_error(e).status
    return status, round(time.perf_counter() - t, 3)


async def _until(cond) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("the request never reached the expert's handle")


def test_a_death_one_ingress_replica_sees_fails_the_other_replicas_requests_fast(tmp_path):
    async def main():
        a, b = _replicas(tmp_path, 2)
        ea, eb = a.experts["math"], b.experts["math"]
        in_flight = asyncio.create_task(_answer(a))  # accepted by the math replica before the kill
        await _until(lambda: ea.calls == 1)
        ea.kill()  # SIGKILL: a's call fails; b has nothing in flight, so it gets no error of its own
        eb.kill()
        held = asyncio.create_task(_answer(b))  # sent after the kill: Serve holds it
        await _until(lambda: eb.calls == 1)
        first_fail = await in_flight  # a sees ActorDiedError: 503, math marked down on a
        after = await _answer(b)  # sent after a client got that 503 (the load test's "fast" set)
        return first_fail, await held, after, await _answer(b), dict(b.health.down)

    first_fail, held, after, next_one, b_down = asyncio.run(main())
    assert first_fail[0] == 503 and first_fail[1] < FAST_S, first_fail
    assert after[0] == 503 and after[1] < FAST_S, ("the other ingress replica waited out its deadline", after)
    assert held[0] == 503 and held[1] < FAST_S, ("a request Serve held was not released", held)
    assert next_one[0] == 503 and next_one[1] < FAST_S, next_one
    assert "math" in b_down, b_down


def test_a_request_held_for_the_dead_replica_is_released_when_its_own_replica_sees_the_death(tmp_path):
    async def main():
        (a,) = _replicas(tmp_path, 1)
        ea = a.experts["math"]
        in_flight = asyncio.create_task(_answer(a))
        await _until(lambda: ea.calls == 1)
        ea.kill()
        held = asyncio.create_task(_answer(a))  # passed health.check before the mark: Serve holds it
        await _until(lambda: ea.calls == 2)
        return await in_flight, await held

    first_fail, held = asyncio.run(main())
    assert first_fail[0] == 503, first_fail
    assert held[0] == 503 and held[1] < FAST_S, ("it waited out the first-answer deadline", held)


def test_a_missed_first_answer_deadline_marks_the_expert_down_on_every_replica(tmp_path):
    async def main():
        a, b = _replicas(tmp_path, 2, first_token_timeout_s=0.2)  # deadline 0.2 + 0.1 x 8 = 1.0 s
        for r in (a, b):
            r.experts["math"].kill()  # nothing was in flight anywhere: no one gets a death error
        timed_out = await _answer(a)  # 503 after the deadline; a marks math down and tells b
        await asyncio.sleep(0.05)  # (the fake broadcast takes a few loop turns)
        return timed_out, await _answer(b), dict(b.health.down)

    timed_out, on_b, b_down = asyncio.run(main())
    assert timed_out[0] == 503 and timed_out[1] >= 0.9, timed_out
    assert on_b[0] == 503 and on_b[1] < 0.5, ("b waited out its own deadline", on_b)
    assert "math" in b_down, b_down
