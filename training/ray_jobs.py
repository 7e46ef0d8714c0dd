"""Thin ``@ray.remote`` wrappers around the training loop; resources are set with ``.options``.

Every task sets its torch thread count to the CPUs Ray granted it (two 2-thread processes on
two cores run several times slower than two 1-thread ones). A failed task is retried by Ray
(``max_retries``, ``retry_exceptions=True``) and resumes from its latest checkpoint, because
``training.loop.train`` always starts by looking for one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from training.loop import LoopConfig, TrainResult, train

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster this process runs in, or start a local instance.

    ``address`` (or ``$RAY_ADDRESS``, set by ``ray job submit``) joins a cluster; ``"auto"`` joins
    the latest ``ray start`` cluster on this machine. Without either, a private local instance is
    started (so a shared machine never silently lands on someone else's cluster).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray instance")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def _thread_count(num_cpus: float) -> int:
    return max(1, int(num_cpus))


@ray.remote
def _train_remote(task: Any, cfg: LoopConfig, run_dir: str, *after: Any) -> TrainResult:
    """``after``: results of tasks that had to finish first (Ray resolves them before this runs)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return train(task, cfg, run_dir)


@ray.remote
def _call_remote(fn_path: str, kwargs: dict[str, Any], num_threads: int) -> Any:
    """Run ``module:function(**kwargs)`` with the thread count set (hooks such as the router)."""
    import importlib

    from experts.device import set_threads

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(num_threads)
    module, name = fn_path.split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _options(name: str, num_cpus: float, num_gpus: float, max_retries: int) -> dict[str, Any]:
    return dict(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                retry_exceptions=True, name=f"train-{name}")


def submit_train(task: Any, cfg: LoopConfig, run_dir: str | Path, *, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, max_retries: int = 2, after: list[ray.ObjectRef] = ()) -> ray.ObjectRef:
    """Launch :func:`training.loop.train` as a Ray task with the given resources, once every
    task in ``after`` has finished (a failed one fails this task too, naming it)."""
    cfg = _with_threads(cfg, num_cpus)
    opts = _options(task.name, num_cpus, num_gpus, max_retries)
    return _train_remote.options(**opts).remote(task, cfg, str(Path(run_dir).resolve()), *after)


def submit_call(name: str, fn_path: str, kwargs: dict[str, Any], *, num_cpus: float = 1.0,
                num_gpus: float = 0.0, max_retries: int = 2) -> ray.ObjectRef:
    """Launch ``module:function(**kwargs)`` as a Ray task (for hooks that own their training)."""
    opts = _options(name, num_cpus, num_gpus, max_retries)
    return _call_remote.options(**opts).remote(fn_path, kwargs, _thread_count(num_cpus))


def _with_threads(cfg: LoopConfig, num_cpus: float) -> LoopConfig:
    return cfg.model_copy(update={"num_threads": _thread_count(num_cpus), "progress": False})
