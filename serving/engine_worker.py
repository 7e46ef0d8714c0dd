"""Drive an ``experts.generate.Engine`` from asyncio (no Ray here; the Expert deployment wraps it).

One loop (``EngineLoop``) owns the engine and steps it while any request is active, so the
decode steps of all concurrent requests run as ONE batched forward. Every engine call runs in
that loop, between steps (the engine is not thread-safe, and the blocking torch work must not
stall the event loop); each request receives its tokens through its own ``asyncio.Queue``.

Two transports carry requests to the loop and tokens back: ``EngineWorker`` runs it on a thread
of the caller's process; ``ProcessEngineWorker`` in a child process with its own GIL (what the
Expert deployment uses). Both offer the same asyncio API (``_Client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experts.checkpoint import CheckpointError
from experts.config import ModelConfig
from experts.generate import Engine, StepOut
from experts.sampling import SamplingParams
from experts.scoring import token_logprobs

log = logging.getLogger(__name__)

SESSION_TTL_S = 120.0


class EngineFull(RuntimeError):
    """Every decode slot is taken (by ensemble sessions); the caller should retry later."""


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000.0, 3)


@dataclass
class _Stream:
    """One generation request on the engine side.

    The loop appends ``(StepOut, batch, timings | None)`` items to ``pending`` and hands them over
    in lists (``_deliver``): after every step, or only once at the end when ``collect`` is set (a
    non-streaming caller reads nothing before then, so its tokens cost no wake-ups). ``reply`` says
    where they go: ``(loop, queue)`` on a thread, the stream's id in an engine process.
    """

    prompt: list[int]
    params: SamplingParams
    reply: Any
    collect: bool = False
    pending: list[Any] = field(default_factory=list)
    t_arrival: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    prefill_ms: float = 0.0
    slot: int | None = None
    cancelled: bool = False
    max_batch: int = 0

    def timings(self) -> dict[str, float]:
        now = time.perf_counter()
        return {"queue_ms": _ms(self.t_arrival, self.t_admit), "prefill_ms": self.prefill_ms,
                "decode_ms": _ms(self.t_admit, now) - self.prefill_ms, "max_batch": self.max_batch}


@dataclass
class _Command:
    """A call to run on the engine side between steps; ``done(ok, value)`` receives its outcome."""

    fn: Callable[..., Any]
    args: tuple
    done: Callable[[bool, Any], None]

    def run(self) -> None:
        try:
            value, ok = self.fn(*self.args), True
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting caller
            value, ok = e, False
        try:
            self.done(ok, value)
        except Exception:  # noqa: BLE001 - the caller is gone (its loop closed): the engine goes on
            log.exception("could not deliver the result of %s", getattr(self.fn, "__name__", self.fn))


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


class EngineLoop:
    """The engine side of a worker: continuous batching over an ``Engine``.

    ``run()`` steps back to back while any request is active, so the decode steps of all
    concurrent requests are ONE batched forward. New requests and commands arrive through
    ``_take``; tokens leave through ``_deliver``. Those two are the transport: a thread of the
    caller's process (``EngineWorker``) or a process of its own (``ProcessEngineWorker``).
    The public methods below are the commands callers may run between steps.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = BatchStats()
        self._running: dict[int, _Stream] = {}
        self._waiting: deque[_Stream] = deque()

    # ---- transport hooks ------------------------------------------------------------------------
    def _take(self, idle: bool) -> Sequence[_Stream | _Command] | None:
        """New items (waiting for one while ``idle``), or None when the worker is closed."""
        raise NotImplementedError

    def _nap(self) -> None:
        """Wait a little for new items (every slot is held by a session)."""
        raise NotImplementedError

    def _deliver(self, streams: list[_Stream]) -> None:
        """Hand each stream's pending items to its consumer (and clear them)."""
        raise NotImplementedError

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        waiting = self._waiting
        while True:
            inbox = self._take(idle=not (waiting or self._running))
            if inbox is None:
                return
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
                self._nap()

    def _fail(self, st: _Stream, e: BaseException) -> None:
        st.pending.append(e)
        self._deliver([st])

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
                self._fail(st, e if isinstance(e, ValueError) else ValueError(f"invalid prompt ids: {e}"))
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
                    self._fail(st, RuntimeError(f"generation failed: {type(e).__name__}: {e}"))
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
            if out.finished:
                self.engine.release(slot)
                del self._running[slot]
            st.pending.append((out, len(outs), st.timings() if out.finished else None))
            if out.finished or not st.collect:
                ready.append(st)
        self._deliver(ready)

    def _fail_all(self, e: Exception, waiting: deque[_Stream]) -> None:
        err = RuntimeError(f"generation failed: {type(e).__name__}: {e}")
        for st in [*self._running.values(), *waiting]:
            self._fail(st, err)
            if st.slot is not None:
                self.engine.release(st.slot)
        self._running.clear()
        waiting.clear()

    # ---- commands (run between steps; ``_Client._ask(name)`` runs ``cmd_<name>``) ----------------
    def _command_fn(self, name: str) -> Callable[..., Any]:
        return getattr(self, f"cmd_{name}") if name in COMMANDS else functools.partial(_refuse, name)

    @torch.inference_mode()
    def cmd_score(self, ids: list[int], top: int) -> dict[str, list]:
        """Per-token log-probs of ``ids`` and the ``top`` most likely ids at each position."""
        s = token_logprobs(self.engine.model, [ids], top=max(0, top))[0]
        token_lp = [None, *s.logprobs.tolist()]
        if top <= 0:
            return {"token_logprobs": token_lp, "top": [None] * len(ids)}
        tops = [[[t, lp] for t, lp in zip(i, v)] for i, v in zip(s.top_ids.tolist(), s.top_logprobs.tolist())]
        return {"token_logprobs": token_lp, "top": [None, *tops]}

    def cmd_add_external(self, prompt: list[int], params: SamplingParams) -> int:
        if self.engine.free_slots == 0:
            raise EngineFull("every decode slot is busy")
        return self.engine.add(prompt, params, external=True)

    def cmd_logprobs_next(self, slot: int) -> np.ndarray:
        """The full next-token log-distribution ``(V,)`` of a slot, as float32."""
        return self.engine.logprobs_next(slot).float().cpu().numpy()

    def cmd_feed(self, slot: int, token: int) -> dict[str, Any]:
        out = self.engine.feed(slot, int(token))
        return {"finished": out.finished, "finish_reason": out.finish_reason, "logprob": out.logprob}

    def cmd_release(self, slot: int) -> None:
        self.engine.release(slot)

    def cmd_stats_dict(self) -> dict[str, Any]:
        return self.stats.to_dict()

    def cmd_busy(self) -> bool:
        """Whether any request waits or runs (a cancelled one until the loop has freed its slot)."""
        return bool(self._waiting or self._running)


COMMANDS = frozenset({"score", "add_external", "logprobs_next", "feed", "release", "stats_dict", "busy"})


class _Client:
    """The asyncio side shared by both transports: streams, scoring, ensemble sessions."""

    def __init__(self) -> None:
        self._sessions: dict[str, tuple[int, float]] = {}  # event loop only: id -> (slot, last use)

    def _open(self, prompt: list[int], params: SamplingParams, collect: bool) -> tuple[asyncio.Queue, Callable[[], None]]:
        """Start a stream; return the queue its item lists arrive in and a function that cancels it."""
        raise NotImplementedError

    async def _ask(self, name: str, *args: Any) -> Any:
        """Run the command ``name`` on the engine side and return its result."""
        raise NotImplementedError

    def _tell(self, name: str, *args: Any) -> None:
        """Run the command ``name`` on the engine side; nobody waits for it."""
        raise NotImplementedError

    # ---- streaming generation -----------------------------------------------------------------
    async def generate(self, prompt: Sequence[int], params: SamplingParams, *,
                       collect: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Yield chunks ``{"tokens", "finish_reason", "batch"[, "timings"]}`` as decoded.

        Chunks coalesce the tokens that arrived since the consumer last read, so a slow reader
        costs fewer messages, not extra latency. ``collect=True`` yields the whole generation
        as one chunk at the end.
        """
        queue, cancel = self._open(list(prompt), params, collect)
        finished = False
        try:
            while True:
                items = list(await queue.get())
                while not queue.empty():
                    items += queue.get_nowait()
                if isinstance(items[-1], BaseException):
                    finished = True  # the engine side has dropped the stream already
                    raise items[-1]
                chunk = _merge(items)
                finished = chunk["finish_reason"] is not None
                yield chunk
                if finished:
                    return
        finally:
            if not finished:
                cancel()  # the consumer left early: the engine side frees its slot

    async def score(self, ids: Sequence[int], top: int) -> dict[str, list]:
        """Per-token log-probs of ``ids`` and the ``top`` most likely ids at each position."""
        return await self._ask("score", list(ids), top)

    async def stats_dict(self) -> dict[str, Any]:
        return await self._ask("stats_dict")

    async def idle(self) -> None:
        """Wait until the engine has run out of work (finished and cancelled slots are released)."""
        while await self._ask("busy"):
            await asyncio.sleep(0.005)

    # ---- ensemble sessions: the caller chooses every token ------------------------------------
    async def open_session(self, prompt: Sequence[int], params: SamplingParams) -> str:
        self._expire_sessions()
        opening = asyncio.ensure_future(self._ask("add_external", list(prompt), params))
        try:
            slot = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the caller left: the slot the engine takes is given back
            opening.add_done_callback(self._release_opened)
            raise
        sid = f"session-{uuid.uuid4().hex}"
        self._sessions[sid] = (slot, time.monotonic())
        return sid

    def _release_opened(self, opening: asyncio.Future) -> None:
        if not opening.cancelled() and opening.exception() is None:
            with contextlib.suppress(RuntimeError):  # the worker is gone: so is the slot
                self._tell("release", opening.result())

    async def session_logprobs(self, sid: str) -> np.ndarray:
        """The full next-token log-distribution ``(V,)`` of a session, as float32."""
        return await self._ask("logprobs_next", self._slot(sid))

    async def session_feed(self, sid: str, token: int) -> dict[str, Any]:
        return await self._ask("feed", self._slot(sid), int(token))

    async def close_session(self, sid: str) -> None:
        slot, _ = self._sessions.pop(sid, (None, 0.0))
        if slot is not None:
            await self._ask("release", slot)

    def _slot(self, sid: str) -> int:
        sessions = self._sessions
        if sid not in sessions:
            raise KeyError(f"session {sid!r} is not open on this replica")
        slot, _ = sessions[sid]
        sessions[sid] = (slot, time.monotonic())
        return slot

    def _expire_sessions(self) -> None:
        """Free slots of sessions whose caller vanished (no call for SESSION_TTL_S)."""
        now, sessions = time.monotonic(), self._sessions
        for sid, (slot, used) in list(sessions.items()):
            if now - used > SESSION_TTL_S:
                log.warning("closing idle ensemble session %s", sid)
                del sessions[sid]
                self._tell("release", slot)


class EngineWorker(EngineLoop, _Client):
    """Continuous batching for asyncio callers, on a dedicated thread of this process.

    The thread steps back to back while any request runs: a decode step never waits for the
    event loop, and the loop never waits for a step. Requests and commands reach it through
    ``_inbox``; tokens go back with ``loop.call_soon_threadsafe`` into each request's
    ``asyncio.Queue``. (Handing every step to a thread pool instead cost ~1.7 ms per token on a
    busy 2-core machine.) The thread shares the GIL with the caller's event loop; a server runs
    the loop in a process of its own instead (``ProcessEngineWorker``).
    """

    def __init__(self, engine: Engine) -> None:
        EngineLoop.__init__(self, engine)
        _Client.__init__(self)
        self.config = engine.cfg  # the loaded model's config
        self._cv = threading.Condition()
        self._inbox: deque[_Stream | _Command] = deque()  # guarded by _cv
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---- transport ------------------------------------------------------------------------------
    def _post(self, item: _Stream | _Command) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine worker is closed")
            self._inbox.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _take(self, idle: bool) -> Sequence[_Stream | _Command] | None:
        with self._cv:
            while idle and not (self._inbox or self._closed):
                self._cv.wait()
            if self._closed:
                return None
            inbox, self._inbox = self._inbox, deque()
            return inbox

    def _nap(self) -> None:
        with self._cv:
            if not self._inbox:
                self._cv.wait(timeout=0.05)

    def _deliver(self, streams: list[_Stream]) -> None:
        """Hand each stream's pending items to its event loop: one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[Any]]]] = {}
        for st in streams:
            if st.pending:
                loop, queue = st.reply
                by_loop.setdefault(loop, []).append((queue, st.pending))
                st.pending = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_fill, batch)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                for st in streams:
                    if st.reply[0] is loop:
                        st.cancelled = True

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread (between decode steps) and await its result."""
        loop, fut = asyncio.get_running_loop(), None
        fut = loop.create_future()
        self._post(_Command(fn, args, lambda ok, value: loop.call_soon_threadsafe(_settle, fut, ok, value)))
        return await fut

    # ---- the client side ------------------------------------------------------------------------
    def _open(self, prompt, params, collect):
        queue: asyncio.Queue = asyncio.Queue()
        st = _Stream(prompt, params, (asyncio.get_running_loop(), queue), collect)
        self._post(st)
        return queue, lambda: setattr(st, "cancelled", True)

    async def _ask(self, name: str, *args: Any) -> Any:
        return await self._call(self._command_fn(name), *args)

    def _tell(self, name: str, *args: Any) -> None:
        self._post(_Command(self._command_fn(name), args, lambda ok, value: None))

    def check(self) -> None:
        """Raise if the worker is closed or its engine thread died."""
        if self._closed or (self._thread is not None and not self._thread.is_alive()):
            raise RuntimeError("the engine worker is closed" if self._closed else "the engine thread died")

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


def _fill(batch: list[tuple[asyncio.Queue, list[Any]]]) -> None:
    for queue, items in batch:
        queue.put_nowait(items)


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


# ---- the engine loop in a process of its own ----------------------------------------------------
def load_engine(ckpt_dir: str, *, max_batch: int, torch_threads: int = 1, device: str = "cpu",
                decode_weights: str = "fp32") -> Engine:
    """An expert checkpoint as a serving engine (no decode log-probs: the API scores prompts instead)."""
    from experts.checkpoint import load_lm
    from experts.device import resolve_device, set_threads
    from experts.quant import prepare_decode

    threads = set_threads(torch_threads)
    model, cfg, _ = load_lm(ckpt_dir, device=resolve_device(device))
    prepare_decode(model, decode_weights)  # fp32: transposed projections (exact, faster GEMMs)
    log.info("engine for %s: %d params, %s weights, %d threads, %d slots", ckpt_dir, cfg.num_params(),
             decode_weights, threads, max_batch)
    return Engine(model, max_batch=max_batch, max_len=cfg.max_seq_len, logprobs=False)


class ProcessEngineWorker(_Client):
    """Continuous batching for asyncio callers, with the engine loop in a child process.

    A thread of a Serve replica shares the GIL with the replica's event loop, and every torch op
    of a decode step hands the GIL over: with the loop ~10-25% busy, a batch-8 step took 25-55%
    longer (measured on 2 cores). The child has a GIL of its own. Messages go over a socket pair as
    JSON (``_encode`` / ``_recv``; never pickle): ``["gen", id, prompt, params, collect]``, ``["cancel", id]``,
    ``["call", id, name, args]`` in; ``["out", [[id, items], ...]]`` (one per step for all streams)
    and ``["ret", id, ok, value]`` out. The child exits when the socket closes, so it never
    outlives its replica.
    """

    def __init__(self, spec: dict[str, Any], *, start_timeout_s: float = 300.0) -> None:
        super().__init__()
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # the child imports serving/ from here
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "serving.engine_proc", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()  # sends come from the event loop, and from close()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._dead: str | None = None
        self._send(["start", spec])
        self.config = ModelConfig.from_dict(self._wait_ready(start_timeout_s)["config"])  # the child's model
        self._reader = threading.Thread(target=self._receive, name="engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        try:
            if not self._conn.poll(timeout_s):
                raise TimeoutError(f"the engine process did not load its model within {timeout_s:.0f} s")
            kind, value = _recv(self._conn)
        except EOFError:
            self.close()
            raise RuntimeError(f"the engine process exited with code {self._proc.returncode} before it was "
                               "ready (its error is in this replica's log)") from None
        except BaseException:
            self.close()
            raise
        if kind == "failed":
            self.close()
            raise value
        return value

    # ---- transport ------------------------------------------------------------------------------
    def _send(self, msg: list) -> None:
        if self._dead:
            raise RuntimeError(self._dead)
        data = _encode(msg)  # TypeError / ValueError: something the wire cannot carry
        try:
            with self._lock:
                self._conn.send_bytes(data)
        except OSError as e:
            raise RuntimeError(f"the engine process is gone ({e})") from None

    def _receive(self) -> None:
        """(reader thread) route each message to the event loop of its stream or call."""
        try:
            while True:
                try:
                    kind, *rest = _recv(self._conn)
                except (EOFError, OSError, TypeError):  # the child is gone, or close() closed the socket
                    return
                try:
                    self._route(kind, rest)
                except (EOFError, OSError):  # gone between the two frames of an array
                    return
                except Exception:  # noqa: BLE001 - a bad message must not stop the reader
                    log.exception("bad message from the engine process")
        finally:
            self._gone()

    def _route(self, kind: str, rest: list) -> None:
        if kind == "out":
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[Any]]]] = {}
            for sid, items in rest[0]:
                items = [_item(x) for x in items]
                target = self._streams.pop(sid, None) if _final(items) else self._streams.get(sid)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], items))
            for loop, batch in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens
                    loop.call_soon_threadsafe(_fill, batch)
        elif kind == "ret":
            cid, ok, value = rest
            if isinstance(value, dict) and "__ndarray__" in value:
                dtype, shape = value["__ndarray__"]
                value = np.frombuffer(self._conn.recv_bytes(), dtype=np.dtype(dtype)).reshape(shape).copy()
            target = self._calls.pop(cid, None)
            if target is not None:
                with contextlib.suppress(RuntimeError):
                    target[0].call_soon_threadsafe(_settle, target[1], ok, value)

    def _gone(self) -> None:
        """(reader thread) the child exited: fail everything still waiting for it."""
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._dead = f"the engine process exited (code {code})" if not self._dead else self._dead
        if code not in (0, None) or self._streams or self._calls:
            log.error("%s with %d streams and %d calls pending", self._dead, len(self._streams), len(self._calls))
        err = RuntimeError(f"generation failed: {self._dead}")
        for loop, queue in list(self._streams.values()):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, [err])
        for loop, fut in list(self._calls.values()):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, fut, False, err)
        self._streams.clear()
        self._calls.clear()

    # ---- the client side ------------------------------------------------------------------------
    def _open(self, prompt, params, collect):
        sid, queue = next(self._ids), asyncio.Queue()
        self._streams[sid] = (asyncio.get_running_loop(), queue)
        try:
            self._send(["gen", sid, prompt, params, collect])
        except (TypeError, ValueError) as e:  # not JSON: ids that are not numbers, say
            self._streams.pop(sid, None)
            raise ValueError(f"invalid prompt ids: {e}") from None
        except BaseException:
            self._streams.pop(sid, None)
            raise
        return queue, lambda: self._cancel(sid)

    def _cancel(self, sid: int) -> None:
        if self._streams.pop(sid, None) is not None and not self._dead:
            with contextlib.suppress(RuntimeError):
                self._send(["cancel", sid])

    async def _ask(self, name: str, *args: Any) -> Any:
        cid, fut = next(self._ids), asyncio.get_running_loop().create_future()
        self._calls[cid] = (fut.get_loop(), fut)
        try:
            self._send(["call", cid, name, list(args)])
            return await fut
        finally:
            self._calls.pop(cid, None)

    def _tell(self, name: str, *args: Any) -> None:
        self._send(["call", None, name, list(args)])

    def check(self) -> None:
        """Raise if the engine process is gone (a Serve health check then replaces the replica)."""
        if self._dead or self._proc.poll() is not None:
            raise RuntimeError(self._dead or f"the engine process exited (code {self._proc.returncode})")

    def close(self) -> None:
        """Stop the child: it finishes its current step, then exits; killed after 5 s."""
        if self._proc.poll() is None and self._lock.acquire(timeout=1.0):  # else: killed below
            try:
                with contextlib.suppress(OSError):
                    self._conn.send_bytes(_encode(["close"]))
            finally:
                self._lock.release()
        with contextlib.suppress(OSError):
            self._conn.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._dead = self._dead or "the engine worker is closed"


def _final(items: list[Any]) -> bool:
    """Whether a delivered list ends its stream (an error, or the finished step with timings)."""
    last = items[-1]
    return isinstance(last, BaseException) or last[-1] is not None


# ---- the wire: JSON, and raw bytes for arrays (a socket never carries pickles) ------------------
WIRE_ERRORS: dict[str, type[BaseException]] = {
    c.__name__: c for c in (ValueError, TypeError, KeyError, RuntimeError, TimeoutError, EngineFull, CheckpointError)}


def _encode(msg: list) -> bytes:
    return json.dumps(msg, default=_to_wire, separators=(",", ":")).encode()


def _recv(conn: Connection) -> list:
    return json.loads(conn.recv_bytes(), object_hook=_from_wire)


def _to_wire(obj: Any) -> Any:
    if isinstance(obj, SamplingParams):
        return {"__params__": asdict(obj)}
    if isinstance(obj, StepOut):  # the triple (StepOut, batch, timings) becomes a flat list
        return [obj.token, obj.logprob, obj.finished, obj.finish_reason]
    if isinstance(obj, BaseException):  # the nearest class the other side knows, and a JSON message
        name = next((c.__name__ for c in type(obj).__mro__ if c.__name__ in WIRE_ERRORS), type(obj).__name__)
        arg = obj.args[0] if len(obj.args) == 1 and isinstance(obj.args[0], str | int | float) else str(obj)
        return {"__error__": [name, arg]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} cannot cross to the engine process")


def _from_wire(d: dict) -> Any:
    if "__params__" in d:
        return SamplingParams(**d["__params__"])
    if "__error__" in d:
        name, message = d["__error__"]
        cls = WIRE_ERRORS.get(name)
        return cls(message) if cls is not None else RuntimeError(f"{name}: {message}")
    return d


def _item(x: Any) -> Any:
    """A decoded stream item: an error, or ``[[token, logprob, finished, reason], batch, timings]``."""
    if isinstance(x, BaseException):
        return x
    (token, logprob, finished, reason), batch, timings = x
    return StepOut(token, logprob, finished, reason), batch, timings


class _ChildLoop(EngineLoop):
    """(child process) the engine loop reading its socket between steps: one thread, one GIL."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        super().__init__(engine)
        self.conn = conn
        self._by_sid: dict[int, _Stream] = {}

    def _take(self, idle: bool) -> list[_Stream | _Command] | None:
        items: list[_Stream | _Command] = []
        try:
            if idle:
                self.conn.poll(None)
            while self.conn.poll(0):
                kind, *rest = _recv(self.conn)
                if kind == "gen":
                    sid, prompt, params, collect = rest
                    st = self._by_sid[sid] = _Stream(prompt, params, sid, collect)
                    items.append(st)
                elif kind == "cancel":
                    st = self._by_sid.pop(rest[0], None)
                    if st is not None:
                        st.cancelled = True
                elif kind == "call":
                    items.append(self._command(*rest))
                else:  # "close"
                    return None
        except (EOFError, OSError):  # the replica is gone
            return None
        return items

    def _command(self, cid: int | None, name: str, args: tuple) -> _Command:
        def done(ok: bool, value: Any) -> None:
            if cid is None:
                return
            if isinstance(value, np.ndarray):  # raw bytes in a frame of their own
                self.conn.send_bytes(_encode(["ret", cid, ok, {"__ndarray__": [value.dtype.str, list(value.shape)]}]))
                self.conn.send_bytes(np.ascontiguousarray(value).tobytes())
                return
            try:
                data = _encode(["ret", cid, ok, value])
            except (TypeError, ValueError) as e:  # the caller gets an error, never silence
                data = _encode(["ret", cid, False, RuntimeError(f"the result of {name!r} cannot cross to the replica: {e}")])
            self.conn.send_bytes(data)

        return _Command(self._command_fn(name), tuple(args), done)

    def _nap(self) -> None:
        self.conn.poll(0.05)

    def _deliver(self, streams: list[_Stream]) -> None:
        batch = []
        for st in streams:
            if st.pending:
                batch.append([st.reply, st.pending])
                if _final(st.pending):
                    self._by_sid.pop(st.reply, None)
                st.pending = []
        if batch:
            self.conn.send_bytes(_encode(["out", batch]))


def _refuse(name: str) -> None:
    raise ValueError(f"{name!r} is not an engine command (one of {', '.join(sorted(COMMANDS))})")


def child_main(fd: int) -> int:
    """(child process) load the engine that the parent's ``("start", spec)`` names, then run it."""
    conn = Connection(fd)
    try:
        kind, spec = _recv(conn)
        engine = load_engine(**spec)
    except EOFError:
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        log.exception("the engine did not load")
        conn.send_bytes(_encode(["failed", e]))
        return 1
    conn.send_bytes(_encode(["ready", {"config": engine.cfg.to_dict()}]))
    try:
        _ChildLoop(engine, conn).run()
    except (BrokenPipeError, ConnectionResetError):  # the replica went away while we answered
        pass
    return 0


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
    tokens, reason, batch, timings = [], None, 0, None
    for out, b, t in items:
        if out.token is not None:
            tokens.append(out.token)
        reason = out.finish_reason if out.finished else reason
        batch = max(batch, b)
        timings = t or timings
    chunk = {"tokens": tokens, "finish_reason": reason, "batch": batch}
    if timings is not None:
        chunk["timings"] = timings
    return chunk
