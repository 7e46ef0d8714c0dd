"""The engine loop: one owner of an ``experts.generate.Engine`` that steps it while any request is active.

The decode steps of all concurrent requests run as ONE batched forward. Every engine call runs in
this loop, between steps (the engine is not thread-safe, and blocking torch work must not stall an
event loop). The loop is transport-free: it is given a :class:`Transport` that says where
requests come from (``take``), how to wait (``nap``) and where tokens go (``deliver``): a thread of
the caller's process (``serving.engine_worker.ThreadTransport``) or a child process's socket
(``serving.engine_proc.SocketTransport``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from experts.generate import Engine
from experts.sampling import SamplingParams
from experts.scoring import token_logprobs

log = logging.getLogger(__name__)


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


class Transport(Protocol):
    """Where an :class:`EngineLoop`'s work comes from and where its tokens go."""

    def take(self, idle: bool) -> Sequence[_Stream | _Command] | None:
        """New items (waiting for one while ``idle``), or None when the worker is closed."""

    def nap(self) -> None:
        """Wait a little for new items (every slot is held by a session)."""

    def deliver(self, streams: list[_Stream]) -> None:
        """Hand each stream's pending items to its consumer (and clear them)."""


class EngineLoop:
    """The engine side of a worker: continuous batching over an ``Engine``.

    ``run()`` steps back to back while any request is active, so the decode steps of all
    concurrent requests are ONE batched forward. New requests and commands arrive through the
    transport's ``take``; tokens leave through its ``deliver``. The ``cmd_*`` methods below are the
    commands callers may run between steps (``command_fn``).
    """

    def __init__(self, engine: Engine, transport: Transport | None = None) -> None:
        self.engine = engine
        self.transport = transport  # set before run(); a transport may need command_fn first
        self.stats = BatchStats()
        self._running: dict[int, _Stream] = {}
        self._waiting: deque[_Stream] = deque()

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        waiting = self._waiting
        while True:
            inbox = self.transport.take(idle=not (waiting or self._running))
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
                self.transport.nap()

    def _fail(self, st: _Stream, e: BaseException) -> None:
        st.pending.append(e)
        self.transport.deliver([st])

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
        self.transport.deliver(ready)

    def _fail_all(self, e: Exception, waiting: deque[_Stream]) -> None:
        err = RuntimeError(f"generation failed: {type(e).__name__}: {e}")
        for st in [*self._running.values(), *waiting]:
            self._fail(st, err)
            if st.slot is not None:
                self.engine.release(st.slot)
        self._running.clear()
        waiting.clear()

    # ---- commands (run between steps; ``EngineClient._ask(name)`` runs ``cmd_<name>``) --------------
    def command_fn(self, name: str) -> Callable[..., Any]:
        return getattr(self, f"cmd_{name}") if name in COMMANDS else functools.partial(_refuse, name)

    @torch.inference_mode()
    def cmd_score(self, ids: list[int], top: int, dists: bool = False) -> dict[str, Any] | np.ndarray:
        """Per-token log-probs of ``ids`` and the ``top`` most likely ids at each position; ``dists``:
        instead, the whole log-distribution at each position, ``(len(ids) - 1, V)`` float32 (to mix)."""
        s = token_logprobs(self.engine.model, [ids], top=0 if dists else max(0, top), dists=dists)[0]
        if dists:
            return s.dists.float().numpy()
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

def _refuse(name: str) -> None:
    raise ValueError(f"{name!r} is not an engine command (one of {', '.join(sorted(COMMANDS))})")

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


def load_engine(ckpt_dir: str, *, max_batch: int, torch_threads: int = 1, device: str = "cpu",
                decode_weights: str = "fp32") -> Engine:
    """An expert checkpoint as a serving engine (no decode log-probs: the API scores prompts instead),
    with the calculator if the checkpoint's meta lists it (``experts.calculator.tool_for``), and the
    Python syntax guard for a code expert (``router.domains.guarded``)."""
    from experts.calculator import tool_for
    from experts.checkpoint import TOKENIZER, load_lm
    from experts.device import resolve_device, set_threads
    from experts.quant import prepare_decode
    from experts.syntax_guard import PythonGuard
    from experts.tokenizer import Tokenizer
    from router.domains import guarded

    threads = set_threads(torch_threads)
    model, cfg, meta = load_lm(ckpt_dir, device=resolve_device(device))
    tok_file = Path(ckpt_dir) / TOKENIZER
    tok = Tokenizer.load(tok_file) if tok_file.is_file() else None
    tool = tool_for(meta, tok) if tok else None
    guard = PythonGuard(tok) if tok and guarded(meta) else None
    prepare_decode(model, decode_weights)  # fp32: transposed projections (exact, faster GEMMs)
    extras = (", calculator" if tool else "") + (", syntax guard" if guard else "")
    log.info("engine for %s: %d params, %s weights, %d threads, %d slots%s", ckpt_dir, cfg.num_params(),
             decode_weights, threads, max_batch, extras)
    return Engine(model, max_batch=max_batch, max_len=cfg.max_seq_len, logprobs=False, tool=tool, guard=guard)
