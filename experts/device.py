"""Device and thread count, resolved in one place.

The rest of the code receives a ``torch.device`` and never names an accelerator itself.
Threads matter on CPU: two processes that each use every core run several times slower than
one, so every process sets its torch thread count from the CPUs it was given.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

_ACCELERATORS = ("cuda", "mps")


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit name must be available."""
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device(_ACCELERATORS[0])
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device(_ACCELERATORS[1])
        return torch.device("cpu")
    kind = pref.split(":")[0]
    if kind == _ACCELERATORS[0] and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if kind == _ACCELERATORS[1] and not torch.backends.mps.is_available():
        raise ValueError(f"device {preference!r} requested but MPS is not available; use 'cpu' or 'auto'")
    if kind not in ("cpu", *_ACCELERATORS):
        raise ValueError(f"unknown device {preference!r}; use 'auto', 'cpu', 'cuda[:N]' or 'mps'")
    return torch.device(pref)


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity / cgroup-limited sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def set_threads(num_cpus: float | int | None = None) -> int:
    """Set torch's intra-op thread count to this process's CPU share and return it.

    ``num_cpus`` is the share a scheduler (e.g. a Ray task's ``num_cpus``) granted; None means
    every CPU this process may use. Fractions round down, to at least one thread.
    """
    n = available_cpus() if num_cpus is None else max(1, int(num_cpus))
    n = min(n, available_cpus())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.debug("torch threads set to %d", n)
    return n


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Training compute dtype: bf16 on accelerators that support it, fp32 on CPU (bf16 is slower there)."""
    if device.type == _ACCELERATORS[0] and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
