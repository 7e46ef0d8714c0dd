"""The router's part of the run report (``training.report`` imports this module if present).

``report_rows(ctx)`` adds two rows to the perplexity matrix, on exactly the test windows of the
other rows (so routed/dense and MoE/dense ratios are read straight off the matrix):

* ``router-top1``: each window is scored by the expert the router picks from its opening
  (the first ``OPENING_TOKENS`` tokens, decoded to text);
* ``router-mixture``: the router-weighted mixture of its top-k experts, log sum_k w_k p_k(token).

As a side effect it writes the router evaluation (accuracy, confusion, ECE, learned vs likelihood
router) to ``<run_dir>/metrics/router_eval.json`` and the confusion plot next to it; the report can
embed them (see :func:`router_summary`). ``training`` is imported lazily: ``router/`` never imports
it at module level.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from experts.checkpoint import atomic_write_json, load_lm
from router.domains import DOMAINS
from router.evaluate import compare_with_likelihood, evaluate_router, plot_confusion
from router.policy import decide
from router.router import Router, load_router

log = logging.getLogger(__name__)

OPENING_TOKENS = 64
EVAL_FILE, CONFUSION_FILE = "router_eval.json", "router_confusion.png"
LIKELIHOOD_PER_DOMAIN = 40  # the likelihood router runs every expert per prompt: keep it small


def _load(ctx: Any) -> tuple[Router, dict[str, torch.nn.Module]] | None:
    router_dir, experts_dir = Path(ctx.run_dir) / "router", Path(ctx.run_dir) / "experts"
    if not (router_dir / "meta.json").is_file():
        log.info("no router checkpoint in %s: no routed rows", ctx.run_dir)
        return None
    missing = [d for d in DOMAINS if not (experts_dir / d / "meta.json").is_file()]
    if missing:
        log.warning("experts %s missing: no routed rows", missing)
        return None
    router = load_router(router_dir, device=ctx.device, tokenizer=ctx.tokenizer)
    return router, {d: load_lm(experts_dir / d, device=ctx.device)[0] for d in DOMAINS}


@torch.no_grad()
def _window_nats(router: Router, experts: dict[str, torch.nn.Module], tokenizer: Any,
                 w: torch.Tensor) -> tuple[float, float]:
    """(top-1 nats, mixture nats) of one (B, T+1) window batch, each row routed from its opening."""
    decisions = router.route_batch([tokenizer.decode(row[:OPENING_TOKENS].tolist()) for row in w])
    mixes = [decide(d.expert_probs, threshold=1.0, top_k=router.top_k) for d in decisions]
    needed = sorted({e for m in mixes for e in m.experts}, key=DOMAINS.index)
    x, y = w[:, :-1], w[:, 1:]  # (B, T)
    lp = {e: torch.log_softmax(experts[e](x.to(next(experts[e].parameters()).device)).logits.float(), -1)
          .gather(-1, y.to(next(experts[e].parameters()).device)[..., None])[..., 0].cpu() for e in needed}  # (B, T)
    top1 = mix = 0.0
    for i, m in enumerate(mixes):
        top1 -= float(lp[m.experts[0]][i].sum())
        stacked = torch.stack([lp[e][i] for e in m.experts])  # (K, T)
        logw = torch.tensor(m.weights, dtype=stacked.dtype).log()[:, None]  # (K, 1)
        mix -= float(torch.logsumexp(stacked + logw, 0).sum())
    return top1, mix


def report_rows(ctx: Any) -> dict[str, dict[str, Any]]:
    """Matrix rows ``router-top1`` and ``router-mixture`` (``training.report.Cell`` per domain)."""
    from training.report import Cell, _window_bytes  # lazy: router/ must not import training at load

    loaded = _load(ctx)
    if loaded is None:
        return {}
    router, experts = loaded
    rows: dict[str, dict[str, Any]] = {"router-top1": {}, "router-mixture": {}}
    for d in ctx.domains:
        windows = ctx.windows[d]
        top1 = mix = 0.0
        for w in windows:
            a, b = _window_nats(router, experts, ctx.tokenizer, w)
            top1, mix = top1 + a, mix + b
        tokens, n_bytes = sum(w[:, 1:].numel() for w in windows), _window_bytes(windows, ctx.tokenizer)
        rows["router-top1"][d], rows["router-mixture"][d] = Cell(top1, tokens, n_bytes), Cell(mix, tokens, n_bytes)
    try:
        router_summary(ctx, router, experts)
    except Exception as e:  # noqa: BLE001 - the rows above must not be lost to a summary failure
        log.warning("router summary failed: %s", e)
    return rows


def router_summary(ctx: Any, router: Router | None = None, experts: dict | None = None,
                   out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the router on the test prompts; write ``router_eval.json`` + confusion PNG to ``out_dir``."""
    from training.data import router_examples  # lazy

    if router is None:
        loaded = _load(ctx)
        if loaded is None:
            return {}
        router, experts = loaded
    out = Path(out_dir or Path(ctx.run_dir) / "metrics")
    examples = router_examples(ctx.corpus, "test", per_domain=100_000, seed=0)
    summary = {"test": evaluate_router(router, examples)}
    if experts:
        small = router_examples(ctx.corpus, "test", per_domain=LIKELIHOOD_PER_DOMAIN, seed=0)
        summary["learned_vs_likelihood"] = compare_with_likelihood(router, experts, ctx.tokenizer, small)
    plot_confusion(summary["test"]["confusion"], out / CONFUSION_FILE)
    atomic_write_json(out / EVAL_FILE, summary)
    log.info("router: group acc %.4f, expert acc %.4f, ECE %.4f", summary["test"]["group_accuracy"],
             summary["test"]["expert_accuracy"], summary["test"]["ece"])
    return summary
