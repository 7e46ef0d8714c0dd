"""Router evaluation for the report: accuracy, confusion, calibration, likelihood baseline, routed PPL.

The report calls these through its extension point; nothing here imports ``training``.
Confusion matrices have rows = true expert, columns = predicted expert, both in ``DOMAINS`` order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from router.calibration import expected_calibration_error
from router.domains import DOMAINS, GROUP_NAMES
from router.likelihood import LikelihoodRouter, token_logprobs
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


class _NLL:
    """Accumulates summed NLL and token counts, overall and per domain."""

    def __init__(self) -> None:
        self.nll: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def add(self, domain: str, nll: float, tokens: int) -> None:
        self.nll[domain] = self.nll.get(domain, 0.0) + nll
        self.tokens[domain] = self.tokens.get(domain, 0) + tokens

    def summary(self) -> dict[str, Any]:
        n, t = sum(self.nll.values()), sum(self.tokens.values())
        return {"ppl": math.exp(n / t) if t else None, "nll_per_token": n / t if t else None, "tokens": t,
                "ppl_by_domain": {d: math.exp(self.nll[d] / self.tokens[d]) for d in self.tokens if self.tokens[d]}}


def doc_ids(tokenizer: Any, doc: str, max_tokens: int | None = None) -> list[int]:
    """The ids a document is scored on: ``<|bos|>`` + text (+ ``<|eos|>``), truncated to ``max_tokens``."""
    try:
        ids = tokenizer.encode(doc, bos=True, eos=True)
    except TypeError:  # a plain encoder without specials
        ids = tokenizer.encode(doc)
    return ids[:max_tokens] if max_tokens else ids


def routed_perplexity(router: Router, experts: Mapping[str, nn.Module], tokenizer: Any,
                      docs_by_domain: Mapping[str, Sequence[str]], *, prefix_chars: int = 256,
                      max_tokens: int | None = 1024,
                      baselines: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
    """Test perplexity of the routed system, on identical tokens for every row.

    Each document is routed once from its opening ``prefix_chars`` characters. Rows:
    ``routed`` (the top-1 expert scores the whole document), ``mixture`` (log sum_k w_k p_k(token)
    over the router's top-k experts, weights renormalised), ``policy`` (what serving does: top-1
    when confident, else the mixture), ``oracle`` (each document's own domain expert) and every
    model in ``baselines`` (e.g. ``{"dense": ..., "moe": ...}``), plus ``<row>/<baseline>`` ratios.
    """
    rows = {name: _NLL() for name in ("routed", "mixture", "policy", "oracle", *(baselines or {}))}
    correct = total = 0
    for domain, docs in docs_by_domain.items():
        for doc in docs:
            ids = doc_ids(tokenizer, doc, max_tokens)
            if len(ids) < 2:
                continue
            decision = router.route(doc[:prefix_chars])
            mix = decide(decision.expert_probs, threshold=1.0, top_k=router.top_k)
            lp = {e: token_logprobs(experts[e], ids) for e in {*mix.experts, *decision.experts, domain}
                  if e in experts}
            n = len(ids) - 1
            rows["routed"].add(domain, -float(lp[mix.experts[0]].sum()), n)
            rows["mixture"].add(domain, _mixture_nll(lp, mix.experts, mix.weights), n)
            rows["policy"].add(domain, _mixture_nll(lp, decision.experts, decision.weights), n)
            if domain in lp:
                rows["oracle"].add(domain, -float(lp[domain].sum()), n)
            for name, model in (baselines or {}).items():
                rows[name].add(domain, -float(token_logprobs(model, ids).sum()), n)
            correct, total = correct + (mix.experts[0] == domain), total + 1
    out: dict[str, Any] = {name: acc.summary() for name, acc in rows.items()}
    out.update(documents=total, routing_accuracy=correct / total if total else None,
               prefix_chars=prefix_chars, max_tokens=max_tokens)
    for base in baselines or {}:
        for name in ("routed", "mixture", "policy", "oracle"):
            if out[name]["ppl"] and out[base]["ppl"]:
                out[f"{name}/{base}"] = out[name]["ppl"] / out[base]["ppl"]
    return out


def _mixture_nll(lp: Mapping[str, torch.Tensor], experts: Sequence[str], weights: Sequence[float]) -> float:
    """-sum_t log sum_k w_k p_k(token_t)."""
    stacked = torch.stack([lp[e] for e in experts])  # (K, T)
    logw = torch.tensor(weights, dtype=stacked.dtype).log()[:, None]  # (K, 1)
    return -float(torch.logsumexp(stacked + logw, dim=0).sum())
