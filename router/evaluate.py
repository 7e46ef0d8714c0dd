"""Router evaluation for the report: accuracy, confusion, calibration, the likelihood baseline.

The report calls these through its extension point; nothing here imports ``training``.
Confusion matrices have rows = true expert, columns = predicted expert, both in ``DOMAINS`` order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from router.calibration import expected_calibration_error
from router.domains import DOMAINS, GROUP_NAMES
from router.likelihood import LikelihoodRouter
from router.model import EXPERT_GROUP
from router.policy import decide
from router.router import Router

log = logging.getLogger(__name__)


def _labels(examples: Sequence[tuple[str, str]]) -> torch.Tensor:
    return torch.tensor([DOMAINS.index(d) for _, d in examples], dtype=torch.long)


def _accuracy_by_domain(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    return {d: float((pred[labels == i] == i).float().mean()) if (labels == i).any() else None
            for i, d in enumerate(DOMAINS)}


@torch.no_grad()
def evaluate_router(router: Router, examples: Sequence[tuple[str, str]], *, batch_size: int = 256,
                    n_bins: int = 15) -> dict[str, Any]:
    """Group / expert accuracy, 5x5 confusion, ECE (top-1 expert confidence) and NLL on ``examples``."""
    examples = [(p, d) for p, d in examples if p.strip()]
    if not examples:
        raise ValueError("evaluate_router: no non-empty examples to evaluate")
    labels = _labels(examples)
    g_probs, e_probs = map(torch.cat, zip(*(router.probs([p for p, _ in examples[i: i + batch_size]])
                                            for i in range(0, len(examples), batch_size))))
    g_probs, e_probs = g_probs.cpu().double(), e_probs.cpu().double()  # (N, G), (N, E)
    conf, pred = e_probs.max(-1)
    group_labels = torch.tensor(EXPERT_GROUP)[labels]
    confusion = torch.zeros(len(DOMAINS), len(DOMAINS), dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_domain = _accuracy_by_domain(pred, labels)
    present = [v for v in per_domain.values() if v is not None]
    modes = [decide(dict(zip(DOMAINS, row)), threshold=router.threshold, top_k=router.top_k).mode
             for row in e_probs.tolist()]
    return {
        "n": len(examples),
        "group_accuracy": float((g_probs.argmax(-1) == group_labels).double().mean()),
        "expert_accuracy": float((pred == labels).double().mean()),
        "balanced_expert_accuracy": sum(present) / len(present),
        "expert_accuracy_by_domain": per_domain,
        "ece": expected_calibration_error(conf, pred == labels, n_bins),
        "nll": float(-e_probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean()),
        "mean_confidence": float(conf.mean()),
        "ensemble_rate": modes.count("ensemble") / len(modes),
        "temperature": router.temperature,
        "labels": list(DOMAINS),
        "groups": list(GROUP_NAMES),
        "confusion": confusion.tolist(),
    }


@torch.no_grad()
def misrouted(router: Router, examples: Sequence[tuple[str, str]], limit: int, *,
              batch_size: int = 256) -> list[dict[str, Any]]:
    """Up to ``limit`` wrongly routed examples ``{prompt, true, routed, p_routed}``, taken from each true
    domain in turn (in example order), so that one domain's failures do not hide the others'."""
    examples = [(p, d) for p, d in examples if p.strip()]
    wrong: dict[str, list[dict[str, Any]]] = {d: [] for d in DOMAINS}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        _, e_probs = router.probs([p for p, _ in chunk])
        conf, pred = e_probs.cpu().double().max(-1)
        for (prompt, true), c, j in zip(chunk, conf.tolist(), pred.tolist()):
            if DOMAINS[j] != true:
                wrong[true].append({"prompt": prompt, "true": true, "routed": DOMAINS[j], "p_routed": round(c, 4)})
    out: list[dict[str, Any]] = []
    while len(out) < limit and any(wrong.values()):
        out += [wrong[d].pop(0) for d in DOMAINS if wrong[d]][: limit - len(out)]
    return out


def plot_confusion(matrix: Sequence[Sequence[int]], path: str | Path, *, labels: Sequence[str] = DOMAINS,
                   title: str = "router confusion (rows: true, columns: predicted)") -> Path:
    """Write the confusion matrix as a PNG heat map with row-normalised shading and raw counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(matrix, dtype=torch.float64)
    shade = m / m.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(shade.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                    color="white" if shade[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_with_likelihood(router: Router, experts: Mapping[str, nn.Module], tokenizer: Any,
                            examples: Sequence[tuple[str, str]], *, max_tokens: int = 256) -> dict[str, Any]:
    """Expert accuracy per domain of the learned router vs the likelihood (BTM) router."""
    examples = [(p, d) for p, d in examples if p.strip()]
    labels = _labels(examples)
    prompts = [p for p, _ in examples]
    reference = LikelihoodRouter(experts, tokenizer, max_tokens=max_tokens)
    out: dict[str, Any] = {"n": len(examples)}
    for name, decisions in (("learned", router.route_batch(prompts)), ("likelihood", reference.route_batch(prompts))):
        pred = torch.tensor([DOMAINS.index(max(d.expert_probs, key=d.expert_probs.get)) for d in decisions])
        out[name] = {"accuracy": float((pred == labels).double().mean()) if len(labels) else None,
                     "group_accuracy": float((torch.tensor(EXPERT_GROUP)[pred] == torch.tensor(EXPERT_GROUP)[labels])
                                             .double().mean()) if len(labels) else None,
                     "by_domain": _accuracy_by_domain(pred, labels)}
    return out


def doc_ids(tokenizer: Any, doc: str, max_tokens: int | None = None) -> list[int]:
    """The ids a document is scored on: ``<|bos|>`` + text (+ ``<|eos|>``), truncated to ``max_tokens``."""
    try:
        ids = tokenizer.encode(doc, bos=True, eos=True)
    except TypeError:  # a plain encoder without specials
        ids = tokenizer.encode(doc)
    return ids[:max_tokens] if max_tokens else ids


def _mixture_nll(lp: Mapping[str, torch.Tensor], experts: Sequence[str], weights: Sequence[float]) -> float:
    """-sum_t log sum_k w_k p_k(token_t)."""
    stacked = torch.stack([lp[e] for e in experts])  # (K, T)
    logw = torch.tensor(weights, dtype=stacked.dtype).log()[:, None]  # (K, 1)
    return -float(torch.logsumexp(stacked + logw, dim=0).sum())
