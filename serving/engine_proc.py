"""The engine process of ``serving.engine_worker.ProcessEngineWorker``: ``python -m serving.engine_proc FD``,
and the wire both sides speak.

The classes whose instances cross the socket (exceptions, ``StepOut``, ``SamplingParams``) live
in other modules, so they keep their importable names on both sides. The child exits when the
socket closes, so it never outlives its replica.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from multiprocessing.connection import Connection
from collections.abc import Callable
from typing import Any

import numpy as np

from experts.checkpoint import CheckpointError
from experts.generate import Engine, StepOut
from experts.sampling import SamplingParams
from serving.engine_client import ends_stream
from serving.engine_loop import EngineFull, EngineLoop, _Command, _Stream, load_engine

log = logging.getLogger(__name__)


# ---- the wire: JSON, and raw bytes for arrays (a socket never carries pickles) ------------------
WIRE_ERRORS: dict[str, type[BaseException]] = {
    c.__name__: c for c in (ValueError, TypeError, KeyError, RuntimeError, TimeoutError, EngineFull, CheckpointError)}


def encode(msg: list) -> bytes:
    return json.dumps(msg, default=to_wire, separators=(",", ":")).encode()


def recv(conn: Connection) -> list:
    return json.loads(conn.recv_bytes(), object_hook=from_wire)


def to_wire(obj: Any) -> Any:
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


def from_wire(d: dict) -> Any:
    if "__params__" in d:
        return SamplingParams(**d["__params__"])
    if "__error__" in d:
        name, message = d["__error__"]
        cls = WIRE_ERRORS.get(name)
        return cls(message) if cls is not None else RuntimeError(f"{name}: {message}")
    return d


def item_of(x: Any) -> Any:
    """A decoded stream item: an error, or ``[[token, logprob, finished, reason], batch, timings]``."""
    if isinstance(x, BaseException):
        return x
    (token, logprob, finished, reason), batch, timings = x
    return StepOut(token, logprob, finished, reason), batch, timings


class SocketTransport:
    """(child process; ``serving.engine_loop.Transport``) the engine loop reads its socket between
    steps: one thread, one GIL. ``commands`` resolves a command's name (``EngineLoop.command_fn``)."""

    def __init__(self, conn: Connection, commands: Callable[[str], Callable[..., Any]]) -> None:
        self.conn, self.commands = conn, commands
        self._by_sid: dict[int, _Stream] = {}

    def take(self, idle: bool) -> list[_Stream | _Command] | None:
        items: list[_Stream | _Command] = []
        try:
            if idle:
                self.conn.poll(None)
            while self.conn.poll(0):
                kind, *rest = recv(self.conn)
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
                self.conn.send_bytes(encode(["ret", cid, ok, {"__ndarray__": [value.dtype.str, list(value.shape)]}]))
                self.conn.send_bytes(np.ascontiguousarray(value).tobytes())
                return
            try:
                data = encode(["ret", cid, ok, value])
            except (TypeError, ValueError) as e:  # the caller gets an error, never silence
                data = encode(["ret", cid, False, RuntimeError(f"the result of {name!r} cannot cross to the replica: {e}")])
            self.conn.send_bytes(data)

        return _Command(self.commands(name), tuple(args), done)

    def nap(self) -> None:
        self.conn.poll(0.05)

    def deliver(self, streams: list[_Stream]) -> None:
        batch = []
        for st in streams:
            if st.pending:
                batch.append([st.reply, st.pending])
                if ends_stream(st.pending):
                    self._by_sid.pop(st.reply, None)
                st.pending = []
        if batch:
            self.conn.send_bytes(encode(["out", batch]))


def child_main(fd: int) -> int:
    """(child process) load the engine that the parent's ``("start", spec)`` names, then run it."""
    conn = Connection(fd)
    try:
        kind, spec = recv(conn)
        engine = load_engine(**spec)
    except EOFError:
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        log.exception("the engine did not load")
        conn.send_bytes(encode(["failed", e]))
        return 1
    conn.send_bytes(encode(["ready", {"config": engine.cfg.to_dict()}]))
    try:
        loop = EngineLoop(engine)
        loop.transport = SocketTransport(conn, loop.command_fn)
        loop.run()
    except (BrokenPipeError, ConnectionResetError):  # the replica went away while we answered
        pass
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(name)s: %(message)s")
    sys.exit(child_main(int(sys.argv[1])))
