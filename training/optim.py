"""Optimizers and learning-rate schedules shared by every model hmoe trains.

Two recipes, selected by ``LoopConfig.optimizer``:

- ``adamw``: AdamW without weight decay on norms, biases and embeddings (the usual GPT recipe).
- ``muon``: :class:`MuonAdamW`, one optimizer holding two kinds of parameter groups. The 2-D
  hidden weight matrices (attention ``wqkv``/``wo``, FFN ``w1``/``w2``/``w3``, including each
  MoE expert's) are updated with Muon: SGD-momentum (Nesterov) whose update is orthogonalised by
  a Newton-Schulz iteration. Embeddings, the (tied) output head, norms, biases and the MoE gate
  (router) keep AdamW. The idea and the quintic Newton-Schulz coefficients come from Keller
  Jordan's Muon and the modded-nanogpt speedrun (github.com/KellerJordan/modded-nanogpt); this
  is an independent implementation.

Schedules (``lr_at``): linear warmup, then either a cosine decay to ``min_lr`` or
warmup-stable-decay (``wsd``: hold the peak, then a linear decay to ``min_lr`` over the last
``decay_fraction`` of the steps, as in modded-nanogpt). Both are pure functions of the step, so a
resumed run only needs the step number to continue exactly. Each param group may carry an
``lr_scale``; :func:`set_lr` multiplies the scheduled value by it, so one schedule drives the
AdamW groups (scale 1) and the Muon groups (scale ``muon_lr / lr``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


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


def is_muon_param(name: str, p: torch.Tensor, embedding_ids: set[int]) -> bool:
    """Hidden 2-D weight matrices: not embeddings, not the output head, not a MoE gate/router."""
    if p.ndim != 2 or id(p) in embedding_ids:
        return False
    leaf = name.rsplit(".", 2)
    if name == "output.weight" or name.endswith(".output.weight") or name.startswith("output.experts."):
        return False  # the LM head (a routed head's experts too)
    return not (len(leaf) >= 2 and leaf[-2] in ("gate", "router", "head"))


def muon_param_groups(model: nn.Module, *, lr: float, muon_lr: float, weight_decay: float,
                      muon_weight_decay: float, momentum: float) -> list[dict]:
    """AdamW groups first (decay / no decay), then the Muon group (``use_muon=True``)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                     for p in m.parameters(recurse=False)}
    decay, no_decay, muon, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if is_muon_param(name, p, embedding_ids):
            muon.append(p)
        elif p.ndim < 2 or id(p) in embedding_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "use_muon": False, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "use_muon": False, "lr_scale": 1.0},
              {"params": muon, "weight_decay": muon_weight_decay, "use_muon": True,
               "lr_scale": muon_lr / lr, "momentum": momentum}]
    return [g for g in groups if g["params"]]


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix (``U V^T`` of its SVD) by a quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) are those tuned for Muon (Keller Jordan,
    modded-nanogpt): they push the singular values towards 1 fast, to roughly [0.7, 1.2], which
    is all the update needs. Runs in fp32.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
        X = X.T
    X = X / (X.norm() + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others, in one optimizer.

    Muon group keys: ``lr``, ``momentum`` (0.95), ``nesterov`` (True), ``ns_steps`` (5),
    ``weight_decay`` (decoupled, multiplied by lr). The orthogonalised update is scaled by
    ``max(1, rows/cols) ** 0.5`` (modded-nanogpt) so tall matrices get comparable per-element
    steps. AdamW group keys: ``lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled).
    All state is tensors (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so
    :func:`optimizer_state_tensors` saves it and a resumed run continues bit-identically.
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, use_muon=False, lr_scale=1.0)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["use_muon"] and any(p.ndim != 2 for p in g["params"]):
                raise ValueError("MuonAdamW: Muon groups must hold 2-D matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mom)  # EMA of gradients
            u = g.lerp(buf, mom) if group["nesterov"] else buf
            u = newton_schulz(u, group["ns_steps"]).to(p.dtype)
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(u, alpha=-lr * scale)

    def _adamw(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if wd:
                p.mul_(1 - lr * wd)
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bc1)


def is_ffn_param(name: str) -> bool:
    """A parameter of a feed-forward block (dense SwiGLU or MoE experts and gate)."""
    return ".feed_forward." in name


def is_gate_param(name: str) -> bool:
    """A router of a mixture-of-experts module (``experts.moe.Routed.gate``)."""
    return name.endswith("gate.weight")


def scale_lr(model: nn.Module, groups: list[dict], pick: Callable[[str], bool], scale: float) -> list[dict]:
    """``groups`` with every parameter whose name ``pick`` selects moved to a copy of its group
    whose ``lr_scale`` is multiplied by ``scale``."""
    if scale == 1.0:
        return groups
    picked = {id(p) for name, p in model.named_parameters() if pick(name)}
    out = []
    for g in groups:
        rest = [p for p in g["params"] if id(p) not in picked]
        chosen = [p for p in g["params"] if id(p) in picked]
        out += [{**g, "params": rest}] if rest else []
        out += [{**g, "params": chosen, "lr_scale": g.get("lr_scale", 1.0) * scale}] if chosen else []
    return out


def scale_non_ffn(model: nn.Module, groups: list[dict], scale: float) -> list[dict]:
    """``groups`` with the learning rate of every parameter outside the FFNs (embeddings, head,
    attention, norms) multiplied by ``scale``. A branch trained so keeps what the experts will share
    close to the seed's, which is what averaging them needs (``training.merge``); its FFNs, which
    stay separate experts, learn at the full rate."""
    return scale_lr(model, groups, lambda name: not is_ffn_param(name), scale)


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, device: torch.device, optimizer: str = "adamw", muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, muon_weight_decay: float = 0.0,
                    non_ffn_lr_scale: float = 1.0, gate_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """``adamw``: torch AdamW (``fused`` on accelerators, ``foreach`` on CPU); ``muon``: :class:`MuonAdamW`.
    ``non_ffn_lr_scale`` multiplies the learning rate of every parameter outside the FFNs, and
    ``gate_lr_scale`` that of the MoE routers (after ``non_ffn_lr_scale``)."""

    def scaled(groups: list[dict]) -> list[dict]:
        return scale_lr(model, scale_non_ffn(model, groups, non_ffn_lr_scale), is_gate_param, gate_lr_scale)

    if optimizer == "adamw":
        fused = device.type != "cpu"
        groups = scaled(param_groups(model, weight_decay))
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps,
                                 fused=fused or None, foreach=None if fused else True)
    if optimizer == "muon":
        groups = muon_param_groups(model, lr=lr, muon_lr=muon_lr, weight_decay=weight_decay,
                                   muon_weight_decay=muon_weight_decay, momentum=muon_momentum)
        return MuonAdamW(scaled(groups), lr=lr, betas=betas, eps=eps,
                         momentum=muon_momentum)
    raise ValueError(f"optimizer={optimizer!r} is invalid: choose one of {list(OPTIMIZERS)}")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps``, then ``cosine``: a cosine decay to ``min_lr`` at
    ``total_steps``; or ``wsd`` (warmup-stable-decay): ``lr`` until the last
    ``decay_fraction * total_steps`` steps, then a linear decay that reaches ``min_lr`` at the
    last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = min(max(0, total_steps - warmup_steps), round(decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if decay_steps <= 0 or step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"schedule={schedule!r} is invalid: choose one of {list(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every group's lr to ``value`` times its ``lr_scale`` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)


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
