"""The router's part of the run report (``training.report`` adds its rows).

``report_rows(ctx)`` adds two rows to the perplexity matrix, on exactly the test documents and
tokens of the other rows (``ctx.docs``), so routed / dense and MoE / dense ratios are like for like:

* ``router-top1``: each test document is scored by the expert the router picks from the
  document's routing prefix (``router.prefix``, ``DocSet.openings``);
* ``router-mixture``: the router-weighted mixture of its top-k experts (weights renormalised),
  log sum_k w_k p_k(token), for every scored token of the document.

Like every other row, both are scored only on the tokens after the routing prefix. The experts'
per-token log-probs come from ``ctx.scored`` (computed once for the matrix rows), so the routed
rows cost no extra forward pass. The routing accuracy on test-document openings
(learned router, and the likelihood/BTM router from the same log-probs) and on test prompts goes
to ``ctx.sections["router"]`` (the report's "Router" section); the full evaluation (accuracy,
confusion, ECE, learned vs likelihood router on prompts) to ``<run_dir>/metrics/router_eval.json``
with the confusion plot next to it. The section also holds the router's figures on the
evaluation-only prompts of ``training.data.eval_prompts`` (third-party prompts from sources no
training data reads): group and expert accuracy, per domain, the confusion and failure examples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from experts.atomic import atomic_write_json
from experts.checkpoint import load_lm
from router.domains import DOMAINS
from router.evaluate import _mixture_nll, compare_with_likelihood, evaluate_router, misrouted, plot_confusion
from router.policy import Decision, decide
from router.prefix import prefix_text
from router.probes import probe_examples
from router.router import Router, load_router
from training.data import router_examples
from training.data.eval_prompts import HALVES, eval_prompt_examples

log = logging.getLogger(__name__)

EVAL_FILE, CONFUSION_FILE = "router_eval.json", "router_confusion.png"
OPENINGS_CONFUSION_FILE = "router_confusion_openings.png"
LIKELIHOOD_PER_DOMAIN = 20  # the prompt likelihood router runs every expert per prompt: keep it small
LIKELIHOOD_TOKENS = 64  # ... on the first LIKELIHOOD_TOKENS tokens of each test prompt
ROUTE_BATCH = 256
EVAL_PROMPT_FAILURES = 10  # failure examples kept in the report


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
    loaded = getattr(ctx, "models", None) or {}  # the report's already loaded models
    return router, {d: loaded[d] if d in loaded else load_lm(experts_dir / d, device=ctx.device)[0].eval()
                    for d in DOMAINS}


def route_all(router: Router, prompts: Sequence[str], batch_size: int = ROUTE_BATCH) -> list[Decision]:
    """The router's top-k mixture decision (threshold 1: always its top ``router.top_k``) per prompt."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out += [decide(d.expert_probs, threshold=1.0, top_k=router.top_k)
                for d in router.route_batch(list(prompts[i:i + batch_size]))]
    return out


def routed_nll(decisions: Sequence[Decision], logprobs: Mapping[str, Sequence[torch.Tensor]]) -> tuple[list, list]:
    """Per-document (top-1 NLL, mixture NLL) given each expert's per-document scored-token log-probs."""
    top1, mix = [], []
    for i, m in enumerate(decisions):
        top1.append(-float(logprobs[m.experts[0]][i].sum()))
        mix.append(_mixture_nll({e: logprobs[e][i] for e in m.experts}, m.experts, m.weights))
    return top1, mix


def _accuracy(pred: Sequence[str], true: Sequence[str]) -> dict[str, Any]:
    by = {d: [p == t for p, t in zip(pred, true) if t == d] for d in DOMAINS}
    return {"n": len(true), "all": sum(p == t for p, t in zip(pred, true)) / len(true) if true else None,
            "by_domain": {d: sum(v) / len(v) if v else None for d, v in by.items()},
            "n_by_domain": {d: len(v) for d, v in by.items()}}


def report_rows(ctx: Any) -> dict[str, dict[str, Any]]:
    """Matrix rows ``router-top1`` and ``router-mixture`` (``training.scoring.Cell`` per domain)."""
    loaded = _load(ctx)
    if loaded is None:
        return {}
    router, experts = loaded
    lp = {e: ctx.scored(e, experts[e]) for e in DOMAINS}  # cached: the matrix rows scored them already
    lp_prefix = {e: ctx.prefix_logprobs(e, experts[e]) for e in DOMAINS}
    rows: dict[str, dict[str, Any]] = {"router-top1": {}, "router-mixture": {}}
    pred, lik_pred, true = [], [], []
    for d in ctx.domains:
        docs = ctx.docs[d]
        decisions = route_all(router, docs.openings)
        top1, mix = routed_nll(decisions, {e: lp[e][d] for e in DOMAINS})
        rows["router-top1"][d], rows["router-mixture"][d] = ctx.cell(d, top1), ctx.cell(d, mix)
        pred += [m.experts[0] for m in decisions]
        true += [d] * len(decisions)
        # the likelihood (BTM) router on the same prefixes, from the same forward passes: free
        lik_pred += [max(DOMAINS, key=lambda e, i=i: float(lp_prefix[e][d][i].sum())) for i in range(len(decisions))]
    section: dict[str, Any] = {"scored_documents": len(true), "routed_accuracy": _accuracy(pred, true),
                               "opening_likelihood_accuracy": _accuracy(lik_pred, true)}
    if getattr(ctx, "name", "test") != "test":  # another document set: its rows and routing accuracy only
        ctx.sections["router"] = section
        return rows
    try:
        summary = router_summary(ctx, router, experts)
        section["opening_accuracy"] = summary.get("test_openings", {}).get("accuracy")
        section["prompt_accuracy"] = summary.get("test", {}).get("accuracy")
        section["probe_accuracy"] = summary.get("probes", {}).get("accuracy")
        section["heldout_probe_accuracy"] = summary.get("probes_heldout", {}).get("accuracy")
        section["eval_prompt_accuracy"] = summary.get("eval_prompts", {}).get("accuracy")
        if "eval_prompts" in summary:
            section["eval_prompts"] = eval_prompt_figures(summary["eval_prompts"])
        section["learned_vs_likelihood_prompts"] = summary.get("learned_vs_likelihood")
    except Exception as e:  # noqa: BLE001 - the rows above must not be lost to a summary failure
        log.warning("router summary failed: %s", e)
    if isinstance(getattr(ctx, "sections", None), dict):
        ctx.sections["router"] = section
    return rows


def opening_examples(ctx: Any) -> list[tuple[str, str]]:
    """(routing prefix, domain) of every test document (all of them when the corpus is there, else ``ctx.docs``)."""
    if getattr(ctx, "corpus", None) is not None:
        return [(prefix_text(ctx.tokenizer, r["text"]), d) for d in ctx.domains for r in ctx.corpus.docs(d, "test")
                if r["text"].strip()]
    return [(o, d) for d in ctx.domains for o in ctx.docs[d].openings]


def router_summary(ctx: Any, router: Router | None = None, experts: dict | None = None,
                   out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the router on test prompts and test-document openings; write ``router_eval.json`` + PNGs."""
    if router is None:
        loaded = _load(ctx)
        if loaded is None:
            return {}
        router, experts = loaded
    out = Path(out_dir or Path(ctx.run_dir) / "metrics")
    summary: dict[str, Any] = {}
    if getattr(ctx, "corpus", None) is not None:

        examples = router_examples(ctx.corpus, "test", per_domain=100_000, seed=0)
        summary["test"] = evaluate_router(router, examples)
        if experts:
            small = router_examples(ctx.corpus, "test", per_domain=LIKELIHOOD_PER_DOMAIN, seed=0)
            summary["learned_vs_likelihood"] = compare_with_likelihood(router, experts, ctx.tokenizer, small,
                                                                      max_tokens=LIKELIHOOD_TOKENS)
        plot_confusion(summary["test"]["confusion"], out / CONFUSION_FILE)
    for key, heldout in (("probes", False), ("probes_heldout", True)):
        summary[key] = evaluate_router(router, probe_examples(heldout=heldout))
    evalset = eval_prompt_summary(router)
    if evalset:
        summary["eval_prompts"] = evalset
    openings = opening_examples(ctx)
    if openings:
        summary["test_openings"] = evaluate_router(router, openings)
        plot_confusion(summary["test_openings"]["confusion"], out / OPENINGS_CONFUSION_FILE,
                       title="router on test-document openings (rows: true, columns: predicted)")
    for key in ("test", "test_openings", "probes", "probes_heldout", "eval_prompts"):
        if key in summary:
            s = summary[key]
            s["accuracy"] = {"n": s["n"], "all": s["expert_accuracy"], "by_domain": s["expert_accuracy_by_domain"]}
            log.info("router on %s: group acc %.4f, expert acc %.4f, ECE %.4f", key, s["group_accuracy"],
                     s["expert_accuracy"], s["ece"])
    atomic_write_json(out / EVAL_FILE, summary)
    return summary


def eval_prompt_summary(router: Router, examples: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """``evaluate_router`` on the evaluation-only prompts (default: every available domain of
    ``training.data.eval_prompts``), plus ``n_by_domain``, ``failures``, the ``skipped`` domains and
    (default set only) the figures of each half. Empty when no domain's source is installed."""
    skipped: list[str] = []
    halves: dict[str, Any] = {}
    if examples is None:
        examples, skipped = eval_prompt_examples()
        for h in HALVES:
            part = evaluate_router(router, eval_prompt_examples(half=h)[0]) if examples else None
            halves[h] = part and {"n": part["n"], "group_accuracy": part["group_accuracy"],
                                  "expert_accuracy": part["expert_accuracy"],
                                  "by_domain": part["expert_accuracy_by_domain"]}
    for reason in skipped:
        log.info("evaluation-only prompts: %s", reason)
    if not examples:
        return {}
    out = evaluate_router(router, examples)
    out["n_by_domain"] = {d: sum(t == d for _, t in examples) for d in DOMAINS}
    out["failures"] = misrouted(router, examples, EVAL_PROMPT_FAILURES)
    out["skipped"], out["halves"] = skipped, halves
    return out


def eval_prompt_figures(s: dict[str, Any]) -> dict[str, Any]:
    """The report's view of :func:`eval_prompt_summary`: accuracies, ``confusion[true][routed]`` counts
    (non-zero only), failure examples."""
    labels = s["labels"]
    return {"n": s["n"], "n_by_domain": s["n_by_domain"], "group_accuracy": s["group_accuracy"],
            "expert_accuracy": s["expert_accuracy"], "by_domain": s["expert_accuracy_by_domain"],
            "confusion": {t: {r: c for r, c in zip(labels, row) if c} for t, row in zip(labels, s["confusion"])},
            "halves": s.get("halves", {}), "failures": s["failures"], "skipped": s["skipped"]}
