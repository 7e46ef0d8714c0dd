"""Drive an ``experts.generate.Engine`` from asyncio (no Ray here; the Expert deployment wraps it).

One dedicated thread owns the engine and steps it while any request is active, so the decode
steps of all concurrent requests run as ONE batched forward. Every engine call runs on that
thread (the engine is not thread-safe, and the blocking torch work must not stall the event
loop); each request receives its tokens through its own ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
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
    """One generation request inside the worker.

    The engine thread appends ``(StepOut, batch)`` items to ``pending`` and hands them over in
    lists (``_deliver``): after every step, or only once at the end when ``collect`` is set (a
    non-streaming caller reads nothing before then, so its tokens cost no wake-ups).
    """

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    collect: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: list[Any] = field(default_factory=list)  # engine thread only
    t_arrival: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    prefill_ms: float = 0.0
    slot: int | None = None
    error: BaseException | None = None
    cancelled: bool = False
    max_batch: int = 0

    def put(self, item: Any) -> None:
        """(engine thread) hand an exception (or a last item) to the consumer now."""
        self.pending.append(item)
        _deliver([self])


def _deliver(streams: list[_Stream]) -> None:
    """(engine thread) hand each stream's pending items to its event loop: one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, list[Any]]]] = {}
    for st in streams:
        if st.pending:
            by_loop.setdefault(st.loop, []).append((st, st.pending))
            st.pending = []
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_fill, batch)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            for st, _ in batch:
                st.cancelled = True


def _fill(batch: list[tuple[_Stream, list[Any]]]) -> None:
    for st, items in batch:
        st.queue.put_nowait(items)


@dataclass
class _Command:
    """A call to run on the engine thread between steps, with a future for its result."""

    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(*self.args))
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting caller
            self.future.set_exception(e)


@dataclass
class BatchStats:
    """Decode batch sizes seen by this worker (the evidence that requests are batched)."""

    steps: int = 0
    tokens: int = 0
    max_batch: int = 0
    sizes: Counter = field(default_factory=Counter)
    prefills: int = 0  # prefill forwards
    prefilled: int = 0  # requests they admitted
    step_s: float = 0.0  # wall time of the decode steps
    step_cpu_s: float = 0.0  # the engine thread's CPU time in them (1 torch thread: the rest is waiting)

    def record(self, batch: int, wall_s: float = 0.0, cpu_s: float = 0.0) -> None:
        self.steps += 1
        self.tokens += batch
        self.max_batch = max(self.max_batch, batch)
        self.sizes[batch] += 1
        self.step_s += wall_s
        self.step_cpu_s += cpu_s

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "max_batch": self.max_batch,
                "mean_batch": round(self.tokens / self.steps, 3) if self.steps else 0.0,
                "prefills": self.prefills, "prefilled": self.prefilled,
                "step_s": round(self.step_s, 6), "step_cpu_s": round(self.step_cpu_s, 6),
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class EngineWorker:
    """Continuous batching over an Engine for many concurrent asyncio callers.

    The engine lives on one dedicated thread that steps back to back while any request runs:
    a decode step never waits for the event loop, and the loop never waits for a step. Requests
    and commands (scoring, ensemble sessions, releases) reach the thread through ``_inbox``; tokens
    go back with ``loop.call_soon_threadsafe`` into each request's ``asyncio.Queue``. (Handing every
    step to a thread pool instead cost ~1.7 ms per token on a busy 2-core machine.)
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_len = engine.cache.max_len
        self._cv = threading.Condition()
        self._inbox: deque[_Stream | _Command] = deque()  # guarded by _cv
        self._running: dict[int, _Stream] = {}  # engine thread only
        self._sessions: dict[str, tuple[int, float]] = {}  # event loop only: id -> (slot, last use)
        self._closed = False
        self._busy = False  # the engine thread holds work (read by ``idle``)
        self._thread: threading.Thread | None = None
        self.stats = BatchStats()

    # ---- the engine thread --------------------------------------------------------------------
    def _post(self, item: _Stream | _Command) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine worker is closed")
            self._inbox.append(item)
            self._busy = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
                self._thread.start()
            self._cv.notify()

    async def _call(self, fn, *args):
        """Run ``fn(*args)`` on the engine thread (between decode steps) and await its result."""
        cmd = _Command(fn, args)
        self._post(cmd)
        return await asyncio.wrap_future(cmd.future)

    def _main(self) -> None:
        waiting: deque[_Stream] = deque()
        while True:
            with self._cv:
                while not (self._inbox or waiting or self._running or self._closed):
                    self._busy = False
                    self._cv.wait()
                if self._closed:
                    return
                inbox, self._inbox = self._inbox, deque()
            for item in inbox:
                if isinstance(item, _Command):
                    item.run()
                else:
                    waiting.append(item)
            for slot, st in list(self._running.items()):
                if st.cancelled:  # the consumer left: free its slot
                    self.engine.release(self._running.pop(slot).slot)
            try:
                admitted = self._admit(waiting)
                t0, c0 = time.perf_counter(), time.thread_time()
                outs = self.engine.step() if self.engine.has_work else {}
            except Exception as e:  # an engine bug must not kill the replica: fail the requests
                log.exception("engine step failed")
                self._fail_all(e, waiting)
                continue
            if outs:
                self.stats.record(len(outs), time.perf_counter() - t0, time.thread_time() - c0)
                self._dispatch(outs)
            if not outs and not admitted and waiting:  # every slot held by a session: wait for a change
                with self._cv:
                    if not self._inbox:
                        self._cv.wait(timeout=0.05)

    def _admit(self, waiting: deque[_Stream]) -> list[_Stream]:
        """Prefill waiting requests into free slots (in arrival order), several per forward."""
        batch = []
        while waiting and len(batch) < self.engine.free_slots:
            st = waiting.popleft()
            if st.cancelled:
                continue
            try:
                st.prompt = self.engine.check(st.prompt)
            except Exception as e:  # ValueError, or TypeError for ids that are not ints
                st.put(e if isinstance(e, ValueError) else ValueError(f"invalid prompt ids: {e}"))
                continue
            batch.append(st)
        groups = prefill_groups([len(st.prompt) for st in batch])
        for n, group in enumerate(groups):
            sts = [batch[i] for i in group]
            t0 = time.perf_counter()
            try:
                slots = self.engine.add_checked([st.prompt for st in sts], [st.params for st in sts])
            except Exception as e:  # add_checked holds no slots after a failure: only the newcomers fail
                log.exception("prefill failed")
                for st in [batch[i] for g in groups[n:] for i in g]:
                    st.put(RuntimeError(f"generation failed: {type(e).__name__}: {e}"))
                return batch
            prefill_ms = _ms(t0, time.perf_counter())
            self.stats.prefills += 1
            self.stats.prefilled += len(sts)
            for st, slot in zip(sts, slots):
                st.t_admit, st.prefill_ms, st.slot = t0, prefill_ms, slot
                self._running[slot] = st
        return batch

    def _dispatch(self, outs: dict) -> None:
        ready = []
        for slot, out in outs.items():
            st = self._running.get(slot)
            if st is None:
                continue
            st.max_batch = max(st.max_batch, len(outs))
            st.pending.append((out, len(outs)))
            if out.finished:
                self.engine.release(slot)
                del self._running[slot]
            if out.finished or not st.collect:
                ready.append(st)
        _deliver(ready)

    def _fail_all(self, e: Exception, waiting: deque[_Stream]) -> None:
        err = RuntimeError(f"generation failed: {type(e).__name__}: {e}")
        for st in [*self._running.values(), *waiting]:
            st.put(err)
            if st.slot is not None:
                self.engine.release(st.slot)
        self._running.clear()
        waiting.clear()

    # ---- streaming generation -----------------------------------------------------------------
    async def generate(self, prompt: Sequence[int], params: SamplingParams, *,
                       collect: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Yield chunks ``{"tokens", "finish_reason", "batch"[, "timings"]}`` as decoded.

        Chunks coalesce the tokens that arrived since the consumer last read, so a slow reader
        costs fewer messages, not extra latency. ``collect=True`` yields the whole generation
        as one chunk at the end.
        """
        s = _Stream(list(prompt), params, asyncio.get_running_loop(), collect)
        self._post(s)
        try:
            while True:
                items = list(await s.queue.get())
                while not s.queue.empty():
                    items += s.queue.get_nowait()
                if isinstance(items[-1], BaseException):
                    raise items[-1]
                chunk = _merge(items)
                if chunk["finish_reason"] is not None:
                    chunk["timings"] = self._timings(s)
                    yield chunk
                    return
                yield chunk
        finally:
            s.cancelled = True  # the engine thread frees its slot (consumer gone, or finished)

    def _timings(self, s: _Stream) -> dict[str, float]:
        now = time.perf_counter()
        return {"queue_ms": _ms(s.t_arrival, s.t_admit), "prefill_ms": s.prefill_ms,
                "decode_ms": _ms(s.t_admit, now) - s.prefill_ms, "max_batch": s.max_batch}

    async def idle(self) -> None:
        """Wait until the engine thread has run out of work (finished slots are released)."""
        while self._busy:
            await asyncio.sleep(0.005)

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
                self._post(_Command(self.engine.release, (slot,)))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


def prefill_groups(lengths: list[int], max_waste: float = 2.0) -> list[list[int]]:
    """Indices grouped for padded prefills, shortest first: a group's padded tokens (count x its
    longest) stay within ``max_waste`` x its real tokens, so one long prompt is not padded 8-fold."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_waste * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def _merge(items: list[tuple[Any, int]]) -> dict[str, Any]:
    """Coalesce queued StepOuts into one chunk (a token of None means "no token")."""
    tokens, reason, batch = [], None, 0
    for out, b in items:
        if out.token is not None:
            tokens.append(out.token)
        reason = out.finish_reason if out.finished else reason
        batch = max(batch, b)
    return {"tokens": tokens, "finish_reason": reason, "batch": batch}
