"""Temperature scaling (Guo et al., 2017) and calibration metrics for the router.

One scalar T divides both heads' logits; it is fitted on validation NLL of the hierarchical
expert probability, so it changes confidence but never the argmax of either head.
"""

from __future__ import annotations

import logging

import torch

from router.model import hierarchical_log_probs

log = logging.getLogger(__name__)

T_MIN, T_MAX = 0.05, 20.0


def expert_nll(group_logits: torch.Tensor, expert_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Mean -log P(expert = label) under the hierarchical probabilities; labels (B,) index DOMAINS."""
    _, e_logp = hierarchical_log_probs(group_logits, expert_logits, temperature)  # (B, E)
    return -e_logp.gather(1, labels.view(-1, 1)).mean()


@torch.no_grad()
def _grid_search(group_logits: torch.Tensor, expert_logits: torch.Tensor, labels: torch.Tensor) -> float:
    grid = torch.logspace(torch.log10(torch.tensor(T_MIN)), torch.log10(torch.tensor(T_MAX)), 60)
    nlls = torch.stack([expert_nll(group_logits, expert_logits, labels, t) for t in grid])
    return float(grid[int(nlls.argmin())])


def fit_temperature(group_logits: torch.Tensor, expert_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [0.05, 20] minimising validation NLL: a log-spaced grid, then LBFGS on log T.

    Returns 1.0 for an empty validation set. The result never has a higher NLL than T = 1.
    """
    if labels.numel() == 0:
        return 1.0
    g, e, y = group_logits.detach().float(), expert_logits.detach().float(), labels.detach().long()
    log_t = torch.tensor(float(torch.log(torch.tensor(_grid_search(g, e, y)))), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = expert_nll(g, e, y, log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp().clamp(T_MIN, T_MAX))
    with torch.no_grad():
        if not expert_nll(g, e, y, t) <= expert_nll(g, e, y, 1.0):  # also catches NaN
            t = 1.0
    log.info("router temperature %.4f (val NLL %.4f at T=1 -> %.4f)", t,
             float(expert_nll(g, e, y, 1.0)), float(expert_nll(g, e, y, t)))
    return t


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins: sum_b |B|/N |acc(B) - conf(B)|."""
    if confidence.numel() == 0:
        return 0.0
    conf, ok = confidence.double().flatten(), correct.double().flatten()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)  # confidence 1.0 -> last bin
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += float(sel.double().mean() * (ok[sel].mean() - conf[sel].mean()).abs())
    return ece
