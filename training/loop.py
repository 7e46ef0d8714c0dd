"""The one training loop: experts, dense and token-MoE generalists, and the router.

A :class:`Task` supplies the model, its batches and its loss; :func:`train` supplies everything
else: the optimizer (AdamW, or Muon + AdamW) with warmup + cosine or warmup-stable-decay
schedules, gradient accumulation and clipping, periodic validation
with early stopping, JSONL metrics, and resume checkpoints that restore the run *exactly*
(model, optimizer, schedule step, data position, torch/numpy/python RNG states).

Layout under ``run_dir`` for a task with ``out_dir="experts/math"`` and ``name="math"``::

    experts/math/           final checkpoint (written by ``task.save_model``)
    experts/math/ckpt/latest  resume checkpoint (one atomic directory; a crash keeps the last one)
    metrics/math.jsonl      one JSON object per line: train steps, evals, events
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import Field
from torch import nn

from experts.atomic import atomic_write_json, recover_dir
from experts.checkpoint import CheckpointError, load_state_into, load_tensors, read_meta, save_checkpoint
from experts.device import autocast_dtype, resolve_device, set_threads

from training import optim
from training.run_config import LoopSettings
from training.state import join_tensors, rng_state, set_rng_state, split_tensors

log = logging.getLogger(__name__)

FAIL_ENV = "HMOE_FAIL_AT_STEP"  # "name:step[:exit]" (comma-separated); fails once per run dir


@runtime_checkable
class StatefulIterator(Protocol):
    """A batch iterator whose position can be saved and restored (e.g. ``TokenBatches``)."""

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Task(Protocol):
    """What the loop needs to know about one model. ``out_dir`` is relative to the run dir."""

    name: str
    out_dir: str

    def build_model(self) -> nn.Module: ...
    def train_batches(self) -> StatefulIterator: ...
    def val_batches(self) -> Iterable[Any]: ...
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def batch_tokens(self, batch: Any) -> int: ...
    def model_config(self) -> dict[str, Any]: ...
    def flops_per_token(self) -> float: ...
    def save_model(self, model: nn.Module, path: Path, meta: dict[str, Any]) -> None: ...


class LoopConfig(LoopSettings):
    """Everything one :func:`train` call needs: the shared ``LoopSettings`` (the run config's
    ``train`` section gives them; ``training.pipeline.loop_config``) and what belongs to one call."""

    max_steps: int = Field(ge=1)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None  # torch threads; the CPUs granted to this process
    progress: bool = True  # tqdm bar when stderr is a terminal; log lines otherwise
    fail_at: str | None = None  # failure injection (tests); defaults to $HMOE_FAIL_AT_STEP
    non_ffn_lr_scale: float = Field(1.0, ge=0, le=1)  # lr multiplier outside the FFNs (optim.scale_non_ffn)
    gate_lr_scale: float = Field(1.0, gt=0)  # lr multiplier of the MoE routers (optim.is_gate_param)


@dataclass
class TrainResult:
    """Summary of one finished :func:`train` call (also written to ``<out_dir>/train_result.json``)."""

    name: str
    out_dir: str
    steps: int
    tokens: int
    flops: float
    final_train_loss: float
    last_val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    resumed_from: int | None
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """Loop bookkeeping that is checkpointed as JSON."""

    step: int = 0  # optimizer steps done
    tokens: int = 0
    best_val: float | None = None
    bad_evals: int = 0
    last_val: float | None = None
    train_loss: float = float("nan")
    stopped_early: bool = False


class MetricsLog:
    """Append-only JSONL: one flushed line per record, so a crash loses at most one line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file (a torn last line is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class InjectedFailure(RuntimeError):
    """Raised by the failure-injection hook (see ``HMOE_FAIL_AT_STEP``)."""


# ---- resume checkpoints ---------------------------------------------------------------------
def _save_resume(path: Path, task: Task, model: nn.Module, opt: torch.optim.Optimizer,
                 data: StatefulIterator, st: _State) -> None:
    opt_tensors, opt_rest = optim.optimizer_state_tensors(opt)
    rng_tensors, rng_rest = rng_state()
    data_tensors: dict[str, torch.Tensor] = {}
    data_json = split_tensors(data.state_dict(), data_tensors)
    extra_tensors = {"optimizer": opt_tensors, "rng": rng_tensors}
    if data_tensors:
        extra_tensors["data"] = data_tensors
    save_checkpoint(path, model.state_dict(), config=task.model_config(), kind="resume",
                    extra_tensors=extra_tensors,
                    extra_json={"optimizer": opt_rest, "rng": rng_rest, "data": data_json,
                                "trainer": asdict(st)},
                    meta={"step": st.step, "task": task.name})


def _load_resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                 data: StatefulIterator) -> _State:
    meta = read_meta(path, kind="resume")
    load_state_into(model, load_tensors(path), source=path)
    rest = {n: json.loads((path / f"{n}.json").read_text()) for n in ("optimizer", "rng", "data", "trainer")}
    optim.load_optimizer_state(opt, load_tensors(path, "optimizer.safetensors"), rest["optimizer"])
    data_tensors = load_tensors(path, "data.safetensors") if "data.safetensors" in meta["files"] else {}
    data.load_state_dict(join_tensors(rest["data"], data_tensors))
    set_rng_state(load_tensors(path, "rng.safetensors"), rest["rng"])
    return _State(**rest["trainer"])


def _try_resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                data: StatefulIterator, metrics: MetricsLog) -> _State | None:
    recover_dir(path)  # a writer killed mid-swap (no atomic exchange) left the last one aside
    if not path.exists():
        return None
    try:
        st = _load_resume(path, model, opt, data)
    except CheckpointError as e:  # an unusable checkpoint must not be silently trained over
        raise CheckpointError(f"cannot resume from {path}: {e}; delete it to start afresh") from e
    log.info("resumed %s from step %d", path, st.step)
    metrics.write(event="resume", step=st.step)
    return st


# ---- evaluation, failure injection, progress ------------------------------------------------
def _autocast(model: nn.Module):
    """bf16 autocast on accelerators that support it; a no-op context on CPU (fp32)."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, max_batches: int) -> float:
    """Mean validation loss over at most ``max_batches`` batches (token-weighted)."""
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    for i, batch in enumerate(task.val_batches()):
        if max_batches and i >= max_batches:
            break
        with _autocast(model):
            loss, metrics = task.loss(model, batch)
        n = task.batch_tokens(batch)
        total += float(metrics.get("lm_loss", loss.item())) * n
        weight += n
    model.train(was_training)
    return total / max(1, weight)


def _maybe_fail(spec: str | None, name: str, step: int, run_dir: Path) -> None:
    """Fail once at ``name:step`` (a marker file in the run dir makes retries pass)."""
    for item in filter(None, (spec or "").split(",")):
        parts = item.strip().split(":")
        if parts[0] != name or int(parts[1]) != step:
            continue
        marker = run_dir / ".injected-failures" / f"{name}-{step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        log.warning("injected failure in %s at step %d", name, step)
        if len(parts) > 2 and parts[2] == "exit":
            os._exit(17)  # a hard crash: the process dies without cleanup
        raise InjectedFailure(f"injected failure in {name} at step {step} ({FAIL_ENV})")


class _Progress:
    """A tqdm bar on a terminal, else an INFO log line every ``log_every`` steps."""

    def __init__(self, cfg: LoopConfig, name: str, start: int) -> None:
        self.cfg, self.name, self.bar = cfg, name, None
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_steps, initial=start, desc=name,
                            dynamic_ncols=True, leave=True)

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        elif self.cfg.log_every and step % self.cfg.log_every == 0:
            log.info("%s step %d/%d loss %.4f %.0f tok/s", self.name, step, self.cfg.max_steps, loss, tok_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the loop -------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_step(task: Task, model: nn.Module, opt: torch.optim.Optimizer, data: Iterator[Any],
                cfg: LoopConfig, step: int) -> tuple[float, int, dict[str, float]]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, tokens, metrics)."""
    optim.set_lr(opt, optim.lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                  total_steps=cfg.max_steps, schedule=cfg.schedule,
                                  decay_fraction=cfg.decay_fraction))
    total, tokens, agg = 0.0, 0, {}
    for _ in range(cfg.grad_accum):
        batch = next(data)
        with _autocast(model):
            loss, metrics = task.loss(model, batch)
        (loss / cfg.grad_accum).backward()
        total += loss.item() / cfg.grad_accum
        tokens += task.batch_tokens(batch)
        for k, v in metrics.items():
            agg[k] = agg.get(k, 0.0) + float(v) / cfg.grad_accum
    if cfg.grad_clip > 0:
        agg["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, tokens, agg


def _after_step(task: Task, model: nn.Module, cfg: LoopConfig, st: _State, metrics: MetricsLog) -> None:
    """Validation and early-stopping bookkeeping after optimizer step ``st.step``."""
    due = cfg.eval_every and st.step % cfg.eval_every == 0
    if not (due or st.step == cfg.max_steps):
        return
    val = evaluate(task, model, cfg.eval_batches)
    st.last_val = val
    if st.best_val is None or val < st.best_val - cfg.min_delta:
        st.best_val, st.bad_evals = val, 0
    else:
        st.bad_evals += 1
    metrics.write(kind="val", step=st.step, tokens=st.tokens, val_loss=val, best_val_loss=st.best_val)
    if cfg.patience and st.bad_evals >= cfg.patience:
        st.stopped_early = True
        log.info("%s: early stop at step %d (val %.4f, best %.4f)", task.name, st.step, val, st.best_val)


def train(task: Task, cfg: LoopConfig, run_dir: str | Path) -> TrainResult:
    """Train ``task``'s model under ``run_dir`` (resuming from its latest checkpoint if present)."""
    run_dir = Path(run_dir).resolve()
    out_dir = run_dir / task.out_dir
    ckpt = out_dir / "ckpt" / "latest"
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    model = task.build_model().to(device).train()
    opt = optim.build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                eps=cfg.eps, device=device, optimizer=cfg.optimizer, muon_lr=cfg.muon_lr,
                                muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay,
                                non_ffn_lr_scale=cfg.non_ffn_lr_scale, gate_lr_scale=cfg.gate_lr_scale)
    data = task.train_batches()
    metrics = MetricsLog(run_dir / "metrics" / f"{task.name}.jsonl")
    st = _try_resume(ckpt, model, opt, data, metrics)
    resumed_from = st.step if st else None
    st = st or _State()
    if resumed_from is None:
        metrics.write(event="start", step=0, config=cfg.model_dump(), flops_per_token=task.flops_per_token())
    t0, tok_t0 = time.perf_counter(), st.tokens
    bar = _Progress(cfg, task.name, st.step)
    fail_spec = cfg.fail_at if cfg.fail_at is not None else os.environ.get(FAIL_ENV)
    try:
        while st.step < cfg.max_steps and not st.stopped_early:
            loss, tokens, m = _train_step(task, model, opt, data, cfg, st.step)
            st.step, st.tokens, st.train_loss = st.step + 1, st.tokens + tokens, loss
            tok_s = (st.tokens - tok_t0) / max(1e-9, time.perf_counter() - t0)
            metrics.write(kind="train", step=st.step, tokens=st.tokens, loss=loss, tok_s=round(tok_s, 1),
                          lr=opt.param_groups[0]["lr"], **m)
            bar.update(st.step, loss, tok_s)
            _after_step(task, model, cfg, st, metrics)
            if cfg.ckpt_every and st.step % cfg.ckpt_every == 0 and st.step < cfg.max_steps:
                _save_resume(ckpt, task, model, opt, data, st)
                metrics.write(event="checkpoint", step=st.step)
            _maybe_fail(fail_spec, task.name, st.step, run_dir)
        result = _finish(task, model, cfg, st, out_dir, run_dir, resumed_from, time.perf_counter() - t0)
        _save_resume(ckpt, task, model, opt, data, st)  # after the final save, which replaces out_dir
        atomic_write_json(out_dir / "train_result.json", asdict(result))
        metrics.write(event="end", step=st.step, tokens=st.tokens, result=asdict(result))
        return result
    finally:
        bar.close()
        metrics.close()


def _finish(task: Task, model: nn.Module, cfg: LoopConfig, st: _State, out_dir: Path, run_dir: Path,
            resumed_from: int | None, elapsed: float) -> TrainResult:
    """Write the final checkpoint (an atomic directory replacing ``out_dir``) and return the summary."""
    if st.last_val is None:  # stopped before any evaluation ran
        st.last_val = evaluate(task, model, cfg.eval_batches)
        st.best_val = st.last_val if st.best_val is None else min(st.best_val, st.last_val)
    result = TrainResult(name=task.name, out_dir=str(out_dir.relative_to(run_dir)), steps=st.step,
                         tokens=st.tokens, flops=st.tokens * task.flops_per_token(),
                         final_train_loss=st.train_loss, last_val_loss=st.last_val,
                         best_val_loss=st.best_val, stopped_early=st.stopped_early,
                         resumed_from=resumed_from, elapsed_s=round(elapsed, 3))
    task.save_model(model, out_dir, {"train": asdict(result)})
    return result


def load_result(run_dir: str | Path, out_dir: str) -> TrainResult | None:
    """The :class:`TrainResult` of a finished task, or None if it has not finished."""
    p = Path(run_dir) / out_dir / "train_result.json"
    return TrainResult(**json.loads(p.read_text())) if p.exists() else None
