"""Optimizer and learning-rate schedule shared by every model hmoe trains.

AdamW without weight decay on norms, biases and embeddings (the usual GPT recipe), and a
linear warmup followed by a cosine decay to ``min_lr``. The schedule is a pure function of the
step, so a resumed run only needs the step number to continue exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters: 2-D+ weight matrices decay; norms, biases and embeddings do not."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                        for p in m.parameters(recurse=False)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in embedding_params:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW: ``fused`` on accelerators, ``foreach`` on CPU."""
    fused = device.type != "cpu"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


# ---- optimizer state as flat tensors + JSON (safetensors, no pickle) ------------------------
def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()`` into ``{"<param>.<key>": tensor}`` plus JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().clone().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         rest: dict) -> None:
    """Inverse of :func:`optimizer_state_tensors`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, kv in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(kv)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
