"""The asyncio side of an engine loop, shared by both transports: streams, scoring, ensemble sessions.

A transport implements ``_open`` (start a stream), ``_ask`` (a command with a result) and ``_tell``
(one without); the client turns them into ``generate``, ``score``, ``stats_dict`` and the
``open_session`` / ``session_logprobs`` / ``session_feed`` / ``close_session`` calls that
ensemble decoding uses. Sessions whose caller vanished are freed after ``SESSION_TTL_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np

from experts.sampling import SamplingParams

log = logging.getLogger(__name__)


SESSION_TTL_S = 120.0

class EngineClient:
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

    async def score(self, ids: Sequence[int], top: int, dists: bool = False) -> dict[str, Any]:
        """Per-token log-probs of ``ids`` and the ``top`` most likely ids at each position (``dists``:
        the whole log-distributions instead; see ``EngineLoop.cmd_score``)."""
        return await self._ask("score", list(ids), top, dists)

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

def fill_queues(batch: list[tuple[asyncio.Queue, list[Any]]]) -> None:
    for queue, items in batch:
        queue.put_nowait(items)


def settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)

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

def ends_stream(items: list[Any]) -> bool:
    """Whether a delivered list ends its stream (an error, or the finished step with timings)."""
    last = items[-1]
    return isinstance(last, BaseException) or last[-1] is not None
