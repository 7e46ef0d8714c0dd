"""Drive an engine loop from asyncio: on a thread of this process, or in a child process.

``EngineWorker`` runs the loop (``serving.engine_loop``) on a thread of the caller's process;
``ProcessEngineWorker`` in a child process with its own GIL (what the Expert deployment uses; the
child is ``serving.engine_proc``). Both offer the same asyncio API (``serving.engine_client``);
each request receives its tokens through its own ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from experts.config import ModelConfig
from experts.generate import Engine
from serving.engine_client import EngineClient, ends_stream, fill_queues, settle
from serving.engine_loop import BatchStats, EngineLoop, _Command, _Stream, load_engine
from serving.engine_proc import encode, item_of, recv

log = logging.getLogger(__name__)

__all__ = ["EngineWorker", "ProcessEngineWorker", "ThreadTransport", "load_engine"]


class ThreadTransport:
    """(``serving.engine_loop.Transport``) an inbox guarded by a condition variable: callers post
    requests and commands from any thread, the engine thread takes them; tokens go back with
    ``loop.call_soon_threadsafe`` into each request's ``asyncio.Queue``."""

    def __init__(self, start: Callable[[], None]) -> None:
        self._start = start  # starts the engine thread on the first post
        self._cv = threading.Condition()
        self._inbox: deque[_Stream | _Command] = deque()  # guarded by _cv
        self.closed = False
        self._started = False

    def post(self, item: _Stream | _Command) -> None:
        with self._cv:
            if self.closed:
                raise RuntimeError("the engine worker is closed")
            self._inbox.append(item)
            if not self._started:
                self._started = True
                self._start()
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify()

    def take(self, idle: bool) -> Sequence[_Stream | _Command] | None:
        with self._cv:
            while idle and not (self._inbox or self.closed):
                self._cv.wait()
            if self.closed:
                return None
            inbox, self._inbox = self._inbox, deque()
            return inbox

    def nap(self) -> None:
        with self._cv:
            if not self._inbox:
                self._cv.wait(timeout=0.05)

    def deliver(self, streams: list[_Stream]) -> None:
        """Hand each stream's pending items to its event loop: one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[Any]]]] = {}
        for st in streams:
            if st.pending:
                loop, queue = st.reply
                by_loop.setdefault(loop, []).append((queue, st.pending))
                st.pending = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(fill_queues, batch)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                for st in streams:
                    if st.reply[0] is loop:
                        st.cancelled = True


class EngineWorker(EngineClient):
    """Continuous batching for asyncio callers, on a dedicated thread of this process.

    The thread runs an ``EngineLoop`` that steps back to back while any request runs: a decode
    step never waits for the event loop, and the loop never waits for a step. Requests and
    commands reach it through a ``ThreadTransport``. (Handing every step to a thread pool instead
    cost ~1.7 ms per token on a busy 2-core machine.) The thread shares the GIL with the caller's
    event loop; a server runs the loop in a process of its own instead (``ProcessEngineWorker``).
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.config = engine.cfg  # the loaded model's config
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._transport = ThreadTransport(self._thread.start)
        self._loop = EngineLoop(engine, self._transport)

    @property
    def engine(self) -> Engine:
        """The engine (touch it only between steps: from a command, or while the worker is idle)."""
        return self._loop.engine

    @property
    def stats(self) -> BatchStats:
        return self._loop.stats

    def _run(self) -> None:
        self._loop.run()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread (between decode steps) and await its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._transport.post(_Command(fn, args, lambda ok, value: loop.call_soon_threadsafe(settle, fut, ok, value)))
        return await fut

    # ---- the client side ------------------------------------------------------------------------
    def _open(self, prompt, params, collect):
        queue: asyncio.Queue = asyncio.Queue()
        st = _Stream(prompt, params, (asyncio.get_running_loop(), queue), collect)
        self._transport.post(st)
        return queue, lambda: setattr(st, "cancelled", True)

    async def _ask(self, name: str, *args: Any) -> Any:
        return await self._call(self._loop.command_fn(name), *args)

    def _tell(self, name: str, *args: Any) -> None:
        self._transport.post(_Command(self._loop.command_fn(name), args, lambda ok, value: None))

    def check(self) -> None:
        """Raise if the worker is closed or its engine thread died."""
        if self._transport.closed:
            raise RuntimeError("the engine worker is closed")
        if self._thread.ident is not None and not self._thread.is_alive():
            raise RuntimeError("the engine thread died")

    def close(self) -> None:
        self._transport.close()


class ProcessEngineWorker(EngineClient):
    """Continuous batching for asyncio callers, with the engine loop in a child process.

    A thread of a Serve replica shares the GIL with the replica's event loop, and every torch op
    of a decode step hands the GIL over: with the loop ~10-25% busy, a batch-8 step took 25-55%
    longer (measured on 2 cores). The child has a GIL of its own. Messages go over a socket pair as
    JSON (``encode`` / ``recv``; never pickle): ``["gen", id, prompt, params, collect]``, ``["cancel", id]``,
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
            kind, value = recv(self._conn)
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
        data = encode(msg)  # TypeError / ValueError: something the wire cannot carry
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
                    kind, *rest = recv(self._conn)
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
                items = [item_of(x) for x in items]
                target = self._streams.pop(sid, None) if ends_stream(items) else self._streams.get(sid)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], items))
            for loop, batch in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens
                    loop.call_soon_threadsafe(fill_queues, batch)
        elif kind == "ret":
            cid, ok, value = rest
            if isinstance(value, dict) and "__ndarray__" in value:
                dtype, shape = value["__ndarray__"]
                value = np.frombuffer(self._conn.recv_bytes(), dtype=np.dtype(dtype)).reshape(shape).copy()
            target = self._calls.pop(cid, None)
            if target is not None:
                with contextlib.suppress(RuntimeError):
                    target[0].call_soon_threadsafe(settle, target[1], ok, value)

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
                loop.call_soon_threadsafe(settle, fut, False, err)
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
                    self._conn.send_bytes(encode(["close"]))
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
