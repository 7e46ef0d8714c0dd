"""Drive an ``experts.generate.Engine`` from asyncio (no Ray here; the Expert deployment wraps it).

One background task steps the engine while any request is active, so the decode steps of all
concurrent requests run as ONE batched forward. Every engine call runs on a single dedicated
thread (the engine is not thread-safe, and the blocking torch work must not stall the event
loop); each request receives its tokens through its own ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from experts.generate import Engine
from experts.sampling import SamplingParams

log = logging.getLogger(__name__)

SESSION_TTL_S = 120.0


class EngineFull(RuntimeError):
    """Every decode slot is taken (by ensemble sessions); the caller should retry later."""


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000.0, 3)


@dataclass
class _Stream:
    """One generation request inside the worker."""

    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    t_arrival: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    prefill_ms: float = 0.0
    slot: int | None = None
    error: BaseException | None = None
    cancelled: bool = False
    max_batch: int = 0


@dataclass
class BatchStats:
    """Decode batch sizes seen by this worker (the evidence that requests are batched)."""

    steps: int = 0
    tokens: int = 0
    max_batch: int = 0
    sizes: Counter = field(default_factory=Counter)

    def record(self, batch: int) -> None:
        self.steps += 1
        self.tokens += batch
        self.max_batch = max(self.max_batch, batch)
        self.sizes[batch] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "max_batch": self.max_batch,
                "mean_batch": round(self.tokens / self.steps, 3) if self.steps else 0.0,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class EngineWorker:
    """Continuous batching over an Engine for many concurrent asyncio callers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_len = engine.cache.max_len
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._waiting: deque[_Stream] = deque()
        self._running: dict[int, _Stream] = {}
        self._release: list[int] = []
        self._sessions: dict[str, tuple[int, float]] = {}  # id -> (slot, last use)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.stats = BatchStats()

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- streaming generation -----------------------------------------------------------------
    async def generate(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[dict[str, Any]]:
        """Yield chunks ``{"tokens", "logprobs", "finish_reason", "batch"[, "timings"]}`` as decoded.

        Chunks coalesce the tokens that arrived since the consumer last read, so a slow reader
        costs fewer messages, not extra latency.
        """
        s = _Stream(list(prompt), params)
        self._waiting.append(s)
        self._kick()
        try:
            while True:
                items = [await s.queue.get()]
                while not s.queue.empty():
                    items.append(s.queue.get_nowait())
                if isinstance(items[-1], BaseException):
                    raise items[-1]
                chunk = _merge(items)
                if chunk["finish_reason"] is not None:
                    chunk["timings"] = self._timings(s)
                    yield chunk
                    return
                yield chunk
        finally:
            s.cancelled = True  # the loop frees its slot (consumer gone, or finished)
            self._kick()

    def _timings(self, s: _Stream) -> dict[str, float]:
        now = time.perf_counter()
        return {"queue_ms": _ms(s.t_arrival, s.t_admit), "prefill_ms": s.prefill_ms,
                "decode_ms": _ms(s.t_admit, now) - s.prefill_ms, "max_batch": s.max_batch}

    async def idle(self) -> None:
        """Wait until the stepping loop has run out of work (finished slots are released)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def _kick(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Step the engine while work exists; exits when idle (restarted by the next request)."""
        while self._waiting or self._running or self._release:
            for slot, s in list(self._running.items()):
                if s.cancelled:
                    self._release.append(self._running.pop(slot).slot)
            cands = [s for s in self._waiting if not s.cancelled]
            self._waiting.clear()
            releases, self._release = self._release, []
            try:
                admitted, rest, outs = await self._call(self._tick, cands, releases)
            except Exception as e:  # an engine bug must not kill the replica: fail the requests
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self._waiting.extendleft(reversed(rest))
            for s in admitted:
                if s.error is not None:
                    s.queue.put_nowait(s.error)
                else:
                    self._running[s.slot] = s
            self._dispatch(outs)
            if not outs and not admitted:  # slots all held by sessions: wait for a change
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.05)
                except asyncio.TimeoutError:
                    pass

    def _tick(self, cands: list[_Stream], releases: list[int]) -> tuple[list, list, dict]:
        """(engine thread) free slots, prefill newcomers, and run one batched decode step."""
        for slot in releases:
            self.engine.release(slot)
        admitted, rest = [], []
        for s in cands:
            if self.engine.free_slots == 0:
                rest.append(s)
                continue
            s.t_admit = time.perf_counter()
            try:
                s.slot = self.engine.add(s.prompt, s.params)
            except ValueError as e:
                s.error = e
            s.prefill_ms = _ms(s.t_admit, time.perf_counter())
            admitted.append(s)
        outs = self.engine.step() if self.engine.has_work else {}
        if outs:
            self.stats.record(len(outs))
        return admitted, rest, outs

    def _dispatch(self, outs: dict) -> None:
        for slot, out in outs.items():
            s = self._running.get(slot)
            if s is None:
                continue
            s.max_batch = max(s.max_batch, len(outs))
            s.queue.put_nowait((out, len(outs)))
            if out.finished:
                self._release.append(slot)
                del self._running[slot]

    def _fail_all(self, e: Exception) -> None:
        err = RuntimeError(f"generation failed: {type(e).__name__}: {e}")
        for s in [*self._running.values(), *self._waiting]:
            s.queue.put_nowait(err)
            if s.slot is not None:
                self._release.append(s.slot)
        self._running.clear()
        self._waiting.clear()

    # ---- prompt scoring (echo + logprobs) -----------------------------------------------------
    async def score(self, ids: Sequence[int], top: int) -> dict[str, list]:
        """Per-token log-probs of ``ids`` and the ``top`` most likely ids at each position."""
        return await self._call(self._score, list(ids), top)

    @torch.inference_mode()
    def _score(self, ids: list[int], top: int) -> dict[str, list]:
        model = self.engine.model
        x = torch.tensor([ids], device=self.engine.device)
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        target = torch.tensor(ids[1:], device=logp.device)
        token_lp = [None, *logp.gather(-1, target[:, None])[:, 0].tolist()]
        if top <= 0:
            return {"token_logprobs": token_lp, "top": [None] * len(ids)}
        vals, idx = logp.topk(min(top, logp.shape[-1]), dim=-1)  # (T-1, k)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return {"token_logprobs": token_lp, "top": [None, *tops]}

    # ---- ensemble sessions: the caller chooses every token ------------------------------------
    async def open_session(self, prompt: Sequence[int], params: SamplingParams) -> str:
        self._expire_sessions()
        slot = await self._call(self._add_external, list(prompt), params)
        sid = f"session-{uuid.uuid4().hex}"
        self._sessions[sid] = (slot, time.monotonic())
        return sid

    def _add_external(self, prompt: list[int], params: SamplingParams) -> int:
        if self.engine.free_slots == 0:
            raise EngineFull("every decode slot is busy")
        return self.engine.add(prompt, params, external=True)

    async def session_logprobs(self, sid: str) -> torch.Tensor:
        """The full next-token log-distribution ``(V,)`` of a session."""
        return await self._call(self.engine.logprobs_next, self._slot(sid))

    async def session_feed(self, sid: str, token: int) -> dict[str, Any]:
        out = await self._call(self.engine.feed, self._slot(sid), int(token))
        return {"finished": out.finished, "finish_reason": out.finish_reason, "logprob": out.logprob}

    async def close_session(self, sid: str) -> None:
        slot, _ = self._sessions.pop(sid, (None, 0.0))
        if slot is not None:
            await self._call(self.engine.release, slot)
            self._wake.set()

    def _slot(self, sid: str) -> int:
        if sid not in self._sessions:
            raise KeyError(f"session {sid!r} is not open on this replica")
        slot, _ = self._sessions[sid]
        self._sessions[sid] = (slot, time.monotonic())
        return slot

    def _expire_sessions(self) -> None:
        """Free slots of sessions whose caller vanished (no call for SESSION_TTL_S)."""
        now = time.monotonic()
        for sid, (slot, used) in list(self._sessions.items()):
            if now - used > SESSION_TTL_S:
                log.warning("closing idle ensemble session %s", sid)
                del self._sessions[sid]
                self._release.append(slot)
        if self._release:
            self._kick()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _merge(items: list[tuple[Any, int]]) -> dict[str, Any]:
    """Coalesce queued StepOuts into one chunk (a token of None means "no token")."""
    tokens, logprobs, reason, batch = [], [], None, 0
    for out, b in items:
        if out.token is not None:
            tokens.append(out.token)
            logprobs.append(out.logprob)
        reason = out.finish_reason if out.finished else reason
        batch = max(batch, b)
    return {"tokens": tokens, "logprobs": logprobs, "finish_reason": reason, "batch": batch}
