"""Per-expert report of a run: test-document perplexity / bits-per-byte, loss curves, compute, generation.

``write_report(run_dir)`` (also ``hmoe report RUN_DIR``) writes ``report/report.json``,
``report/report.md`` and PNG plots, atomically (the whole ``report/`` directory is replaced).

Every row of the matrix is scored on the same test *tokens*: per domain a seeded sample of whole
documents (``<|bos|>`` text ``<|eos|>`` truncated to ``MAX_DOC_TOKENS``, chunked to the model
context; up to ``MAX_TOKENS_PER_DOMAIN`` scored tokens per domain). The first
``router.prefix.ROUTING_PREFIX_TOKENS`` text tokens of each document are the routing prefix: the
router reads them to choose an expert, and no row scores them. So every cell, the pooled *mixed
test* column and the ratios to the dense generalist are like for like. Each model scores all
documents once, in length-sorted padded batches (``doc_logprobs``); the per-token log-probs are
cached in the context so that rows combining experts (the router's) cost no extra forward pass.

Extension point: extra rows of the matrix (e.g. the router-selected ensemble) come from *row
providers*: callables ``provider(ctx: ReportContext) -> dict[row_name, dict[domain, Cell]]``,
registered with :func:`register_row_provider`, passed as ``write_report(extra_rows=[...])``, or
exported as ``report_rows`` by a module listed in :data:`ROW_PROVIDER_MODULES` (imported if present).
A provider may add a report section in ``ctx.sections[name]`` (rendered for ``"router"``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experts.checkpoint import CheckpointError, atomic_dir, load_lm
from experts.device import resolve_device
from router.domains import DOMAINS
from router.prefix import ROUTING_PREFIX_TOKENS, prefix_ids, scored_targets, unscored
from training.loop import read_metrics

log = logging.getLogger(__name__)

ROW_PROVIDER_MODULES = ("training.router_report",)  # modules exporting report_rows(ctx)
QA_DOMAINS = ("math", "reasoning")
MAX_DOC_TOKENS = 512  # a test document is scored on its first MAX_DOC_TOKENS ids (<|bos|> text <|eos|>)
MAX_TOKENS_PER_DOMAIN = 8192  # cap on the scored test tokens per domain (keeps the report fast)
SCORE_BATCH = 32  # chunks per forward pass when scoring
THREADS_ENV = "HMOE_REPORT_THREADS"  # torch threads for the report (default: the CPUs idle when it starts)
RATIO_ROWS = ("router-top1", "router-mixture", "baseline-moe", "seed")  # mixed-test ratios to baseline-dense
MATCH_TOLERANCE = 0.02  # systems are called compute-matched when their FLOPs agree within this share


@dataclass
class Cell:
    """One (model, domain) entry: totals and the derived perplexity and bits per byte."""

    nats: float
    tokens: int
    bytes: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nats / max(1, self.tokens))

    @property
    def bpb(self) -> float:
        return self.nats / (math.log(2) * max(1, self.bytes))

    def to_dict(self) -> dict[str, float]:
        return {"ppl": round(self.ppl, 4), "bpb": round(self.bpb, 4), "nats": round(self.nats, 3),
                "tokens": self.tokens, "bytes": self.bytes}


@dataclass
class DocSet:
    """The test documents of one domain that every row is scored on (identical tokens for every row)."""

    ids: list[list[int]]  # <|bos|> + text (+ <|eos|>), truncated to the report's max_doc_tokens
    openings: list[str]  # each document's routing prefix as text (what the router reads)
    n_bytes: list[int]  # UTF-8 bytes of each document's scored text (after the prefix; specials excluded)
    prefix_tokens: int = ROUTING_PREFIX_TOKENS

    @property
    def tokens(self) -> int:
        """Scored tokens: every target after the routing prefix."""
        return sum(scored_targets(len(i), self.prefix_tokens) for i in self.ids)


@dataclass
class ReportContext:
    """What row providers get: the run, its corpus and tokenizer, the test documents and the loaded models.

    Every row is scored on the tokens of ``docs`` after their routing prefix: ``scored(name)`` gives
    each model's log-probs of exactly those tokens, ``prefix_logprobs(name)`` those of the prefix
    (for a likelihood router that reads it). Both slice one cached pass per model, so providers
    combine experts without re-scoring. Providers may put a JSON-able section of the report in
    ``sections[name]``.
    """

    run_dir: Path
    corpus: Any
    tokenizer: Any
    domains: tuple[str, ...]
    docs: dict[str, DocSet]
    device: torch.device
    window: int  # context length every document is chunked to (the smallest model context)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    name: str = "test"  # which document set: "test" (the corpus's test split) or "natural" (evaluation-only)
    batch_size: int = SCORE_BATCH
    _cache: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict, repr=False)

    @property
    def prefix_tokens(self) -> int:
        return next(iter(self.docs.values())).prefix_tokens if self.docs else ROUTING_PREFIX_TOKENS

    def logprobs(self, name: str, model: torch.nn.Module | None = None) -> dict[str, list[torch.Tensor]]:
        """Domain -> per-document log p(token_t | earlier tokens), t = 1..n-1, prefix included (cached)."""
        if name not in self._cache:
            model = model if model is not None else self.models[name]
            flat = [ids for d in self.domains for ids in self.docs[d].ids]
            lps = doc_logprobs(model, flat, window=self.window, device=self.device, batch_size=self.batch_size)
            out, i = {}, 0
            for d in self.domains:
                n = len(self.docs[d].ids)
                out[d], i = lps[i:i + n], i + n
            self._cache[name] = out
        return self._cache[name]

    def scored(self, name: str, model: torch.nn.Module | None = None) -> dict[str, list[torch.Tensor]]:
        """Domain -> per-document log-probs of the scored tokens (after the routing prefix)."""
        k = self.prefix_tokens
        return {d: [x[k:] for x in lps] for d, lps in self.logprobs(name, model).items()}

    def prefix_logprobs(self, name: str, model: torch.nn.Module | None = None) -> dict[str, list[torch.Tensor]]:
        """Domain -> per-document log-probs of the routing prefix's tokens (never scored in a row)."""
        k = self.prefix_tokens
        return {d: [x[:k] for x in lps] for d, lps in self.logprobs(name, model).items()}

    def cell(self, domain: str, nlls: Iterable[float]) -> Cell:
        """The Cell of ``domain`` from per-document NLLs of its scored tokens."""
        return Cell(sum(float(x) for x in nlls), self.docs[domain].tokens, sum(self.docs[domain].n_bytes))

    def score(self, name: str, model: torch.nn.Module | None = None) -> dict[str, Cell]:
        lp = self.scored(name, model)
        return {d: self.cell(d, (-float(x.sum()) for x in lp[d])) for d in self.domains}


_PROVIDERS: list[Callable[[ReportContext], dict[str, dict[str, Cell]]]] = []


def register_row_provider(fn: Callable[[ReportContext], dict[str, dict[str, Cell]]]) -> None:
    """Add rows to every report written by this process (e.g. the router-selected ensemble)."""
    _PROVIDERS.append(fn)


# ---- the matrix ---------------------------------------------------------------------------------
def model_dirs(run_dir: Path) -> dict[str, Path]:
    """Row name -> finished LM checkpoint: experts in domain order, then the seed and the baselines."""
    out = {d: run_dir / "experts" / d for d in DOMAINS if (run_dir / "experts" / d / "meta.json").exists()}
    if (run_dir / "seed" / "meta.json").exists():
        out["seed"] = run_dir / "seed"
    for kind in ("dense", "moe"):
        p = run_dir / "baselines" / kind
        if (p / "meta.json").exists():
            out[f"baseline-{kind}"] = p
    return out


def select_docs(texts: Iterable[str], tokenizer: Any, *, budget: int | None, max_doc_tokens: int,
                seed: int = 0, prefix_tokens: int = ROUTING_PREFIX_TOKENS) -> DocSet:
    """A seeded random sample of documents, each truncated to ``max_doc_tokens``, until ``budget``
    scored tokens. A document too short to have a token after its routing prefix is skipped."""
    from router.evaluate import doc_ids

    texts = [t for t in texts if t and t.strip()]
    random.Random(seed).shuffle(texts)
    ids_out, openings, n_bytes, total = [], [], [], 0
    for text in texts:
        if budget is not None and total >= budget:
            break
        ids = doc_ids(tokenizer, text[: 16 * max_doc_tokens], max_doc_tokens)
        if scored_targets(len(ids), prefix_tokens) < 1:
            continue
        ids_out.append(ids)
        openings.append(tokenizer.decode(prefix_ids(ids, prefix_tokens), skip_special=False))
        n_bytes.append(len(tokenizer.decode(ids[unscored(prefix_tokens):]).encode("utf-8")))
        total += scored_targets(len(ids), prefix_tokens)
    return DocSet(ids_out, openings, n_bytes, prefix_tokens)


def chunk_spans(n: int, window: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most ``window`` ids over ``n`` ids, overlapping by one id, so that every
    token after the first is predicted exactly once (with the context of its own window)."""
    return [(s, min(s + window, n)) for s in range(0, max(0, n - 1), window - 1)]


@torch.inference_mode()
def doc_logprobs(model: torch.nn.Module, docs: list[list[int]], *, window: int, device: torch.device,
                 batch_size: int = SCORE_BATCH, pad_id: int = 0) -> list[torch.Tensor]:
    """Per-document log p(ids[t] | context) for t = 1..n-1 (fp32, CPU), chunked to ``window`` ids.

    Chunks of all documents are sorted by length and scored in right-padded batches (causal
    attention: padding on the right never changes the scores of earlier positions).
    """
    chunks = [(i, s, e) for i, ids in enumerate(docs) for s, e in chunk_spans(len(ids), window)]
    chunks.sort(key=lambda c: c[2] - c[1], reverse=True)
    parts: dict[tuple[int, int], torch.Tensor] = {}
    for b in range(0, len(chunks), batch_size):
        batch = chunks[b:b + batch_size]
        t = batch[0][2] - batch[0][1]
        x = torch.full((len(batch), t), pad_id, dtype=torch.long)  # (B, T)
        for r, (i, s, e) in enumerate(batch):
            x[r, : e - s] = torch.tensor(docs[i][s:e])
        x = x.to(device)
        logits = model(x[:, :-1]).logits.float()  # (B, T-1, V)
        lp = (logits.gather(-1, x[:, 1:, None])[..., 0] - torch.logsumexp(logits, -1)).cpu()  # (B, T-1)
        for r, (i, s, e) in enumerate(batch):
            parts[(i, s)] = lp[r, : e - s - 1]
    return [torch.cat([parts[(i, s)] for s, _ in chunk_spans(len(ids), window)]) if len(ids) > 1
            else torch.zeros(0) for i, ids in enumerate(docs)]


def _context(run_dir: Path, corpus: Any, models: dict[str, torch.nn.Module], budget: int | None,
             max_doc_tokens: int, device: torch.device,
             texts: dict[str, Iterable[str]] | None = None, name: str = "test") -> ReportContext:
    """The context of one document set: the corpus's test split, or ``texts`` per domain."""
    tok = corpus.tokenizer()
    if texts is None:
        texts = {d: (r["text"] for r in corpus.docs(d, "test")) for d in DOMAINS if d in corpus.domains}
    docs = {d: select_docs(t, tok, budget=budget, max_doc_tokens=max_doc_tokens) for d, t in texts.items()}
    window = min((m.cfg.max_seq_len for m in models.values()), default=max_doc_tokens)
    return ReportContext(run_dir, corpus, tok, tuple(docs), docs, device, window, models, name=name)


def natural_texts() -> dict[str, list[str]]:
    """Each domain's evaluation-only natural-text documents (``training.data.evalsets``), where installed."""
    from training.data.evalsets import natural_eval_docs
    from training.data.sources import SourceUnavailable

    out = {}
    for d in DOMAINS:
        try:
            out[d] = [r["text"] for r in natural_eval_docs(d)]
        except SourceUnavailable as e:
            log.warning("no natural-text evaluation set for %s: %s", d, e)
    return out


def natural_section(ctx: ReportContext, extra_rows: Iterable[Callable]) -> dict[str, Any]:
    """Every model (and the routed rows) on the evaluation-only natural-text sets, in bits per byte.

    The question it answers: does each domain's own expert model that domain's real text best, and
    does the router, reading the same prefix, send the text to it?
    """
    matrix = {n: ctx.score(n) for n in ctx.models}
    matrix.update(_external_rows(ctx, extra_rows))
    mat = {n: {d: c.to_dict() for d, c in cells.items()} for n, cells in matrix.items()}
    experts = [d for d in ctx.domains if d in mat]
    own_best = {d: mat[d][d]["bpb"] == min(mat[e][d]["bpb"] for e in DOMAINS if e in mat) for d in experts}
    top1 = mat.get("router-top1")
    within = {d: top1[d]["bpb"] <= 1.02 * mat[d][d]["bpb"] for d in experts} if top1 else None
    return {"matrix": mat, "domains": list(ctx.domains), "own_expert_best": own_best,
            "router_top1_within_2pct_of_own": within, "router": ctx.sections.get("router"),
            "eval": {d: {"documents": len(ctx.docs[d].ids), "tokens": ctx.docs[d].tokens} for d in ctx.domains}}


def _external_rows(ctx: ReportContext, extra: Iterable[Callable]) -> dict[str, dict[str, Cell]]:
    providers = list(_PROVIDERS) + list(extra)
    for mod in ROW_PROVIDER_MODULES:
        if importlib.util.find_spec(mod.split(".")[0]) and importlib.util.find_spec(mod):
            fn = getattr(importlib.import_module(mod), "report_rows", None)
            if fn is not None:
                providers.append(fn)
    rows: dict[str, dict[str, Cell]] = {}
    for fn in providers:
        try:
            rows.update(fn(ctx) or {})
        except Exception as e:  # noqa: BLE001 - an optional row must not lose the whole report
            log.warning("report row provider %s failed: %s", getattr(fn, "__name__", fn), e)
    return rows


# ---- generation checks --------------------------------------------------------------------------
def distinct_2(ids: list[int]) -> float:
    """Unique bigrams / bigrams of a generated sequence (1.0 = no repetition)."""
    grams = list(zip(ids, ids[1:]))
    return len(set(grams)) / len(grams) if grams else 0.0


def _generate(model: torch.nn.Module, prompts: list[list[int]], params: Any) -> list[list[int]]:
    from experts.generate import generate

    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate(model, prompts, params):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return outs


def exact_match(model: torch.nn.Module, tok: Any, items: list[tuple[str, str]], max_new: int) -> dict:
    """Greedy answers to ``question\\n`` compared with the reference answer (stripped)."""
    from experts.sampling import SamplingParams

    if not items:
        return {"n": 0, "correct": 0, "accuracy": None, "examples": []}
    room = model.cfg.max_seq_len - max_new
    prompts = [([tok.bos_id] + tok.encode(q + "\n"))[-room:] for q, _ in items]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_ids=(tok.eos_id,))
    answers = [tok.decode(o).strip() for o in _generate(model, prompts, params)]
    correct = [a == ref.strip() for a, (_, ref) in zip(answers, items)]
    ex = [{"question": q[:200], "answer": ref, "output": a} for (q, ref), a in list(zip(items, answers))[:3]]
    return {"n": len(items), "correct": sum(correct), "accuracy": sum(correct) / len(items), "examples": ex}


def samples(model: torch.nn.Module, tok: Any, prompts: list[str], max_new: int, seed: int = 0) -> dict:
    """A few sampled continuations of test prompts and their mean distinct-2 ratio."""
    from experts.sampling import SamplingParams

    if not prompts:
        return {"distinct_2": None, "samples": []}
    room = model.cfg.max_seq_len - max_new
    ids = [([tok.bos_id] + tok.encode(p))[-room:] for p in prompts]
    params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=max_new, stop_ids=(tok.eos_id,), seed=seed)
    outs = _generate(model, ids, params)
    d2 = [distinct_2(o) for o in outs]
    return {"distinct_2": round(sum(d2) / len(d2), 4),
            "samples": [{"prompt": p[:200], "continuation": tok.decode(o), "distinct_2": round(d, 4)}
                        for p, o, d in zip(prompts, outs, d2)]}


def generation_checks(models: dict[str, torch.nn.Module], ctx: ReportContext, n_items: int,
                      n_samples: int, max_new: int) -> dict[str, Any]:
    from training.data import qa_items

    out: dict[str, Any] = {}
    for name, model in models.items():
        if name not in DOMAINS:
            continue
        entry: dict[str, Any] = {}
        if name in QA_DOMAINS and n_items:
            entry["exact_match"] = exact_match(model, ctx.tokenizer, qa_items(ctx.corpus, name, "test")[:n_items],
                                               max_new)
        prompts = [r["prompt"] for r in ctx.corpus.docs(name, "test") if r.get("prompt", "").strip()][:n_samples]
        entry["sampling"] = samples(model, ctx.tokenizer, prompts, max_new)
        out[name] = entry
    return out


# ---- curves, compute, output --------------------------------------------------------------------
def loss_curves(run_dir: Path) -> dict[str, dict[str, list]]:
    """Per model (metrics file stem): train and val loss against tokens seen."""
    out = {}
    for f in sorted((run_dir / "metrics").glob("*.jsonl")):
        recs = read_metrics(f)
        train = {r["step"]: (r["tokens"], r["loss"]) for r in recs if r.get("kind") == "train"}
        val = {r["step"]: (r["tokens"], r["val_loss"]) for r in recs if r.get("kind") == "val"}
        out[f.stem] = {"train": [[s, *train[s]] for s in sorted(train)],
                       "val": [[s, *val[s]] for s in sorted(val)]}
    return out


def compute_used(run_dir: Path, names: dict[str, Path]) -> dict[str, dict]:
    """Per model, what its training really consumed (tokens seen x FLOPs per token), from its checkpoint."""
    from experts.config import ModelConfig

    out = {}
    for name, path in names.items():
        meta = json.loads((path / "meta.json").read_text())
        cfg = ModelConfig.from_dict(meta["config"])
        tr = meta.get("train", {})
        out[name] = {"tokens": tr.get("tokens"), "flops": tr.get("flops"), "steps": tr.get("steps"),
                     "active_params": cfg.num_params(active=True), "total_params": cfg.num_params(),
                     "tokens_x_active_params": (tr.get("tokens") or 0) * cfg.num_params(active=True),
                     "best_val_loss": tr.get("best_val_loss"), "elapsed_s": tr.get("elapsed_s"),
                     "init_from": meta.get("init_from")}
    return out


def system_compute(compute: dict[str, dict]) -> dict[str, Any]:
    """Total training FLOPs of each system compared, and whether they are compute-matched.

    The routed experts' system is the seed (when the run has one) plus every expert's branch; each
    generalist is one model. Systems are *matched* when every total is within ``MATCH_TOLERANCE``
    of the experts' total; the ratios are printed either way.
    """
    experts = [n for n in DOMAINS if n in compute]
    if not experts:
        return {}
    parts = experts + (["seed"] if "seed" in compute else [])
    totals = {"experts": float(sum(compute[n]["flops"] or 0 for n in parts))}
    totals.update({n: float(compute[n]["flops"] or 0) for n in ("baseline-dense", "baseline-moe") if n in compute})
    ratios = {n: round(v / totals["experts"], 4) if totals["experts"] else None for n, v in totals.items()}
    matched = len(totals) > 1 and all(r is not None and abs(r - 1) <= MATCH_TOLERANCE for r in ratios.values())
    return {"parts": {"experts": parts}, "flops": totals, "ratio_to_experts": ratios, "matched": matched,
            "tolerance": MATCH_TOLERANCE}


def _fmt(c: dict | None) -> str:
    return f"{c['ppl']:.2f} ({c['bpb']:.3f})" if c else "-"


def _markdown(rep: dict[str, Any]) -> str:
    doms, rows, mixed, ev = rep["domains"], rep["matrix"], rep.get("mixed_test", {}), rep.get("eval", {})
    lines = [f"# Report: {rep['run_dir']}", "", "## Perplexity (bits per byte) on each domain's test documents", ""]
    if ev:
        lines += [f"Every row is scored on the same {ev['tokens']} tokens of {ev['documents']} test documents: per "
                  f"domain a seeded sample of up to {ev['max_tokens_per_domain']} scored tokens, each document "
                  f"`<|bos|>` + text + `<|eos|>` truncated to {ev['max_doc_tokens']} tokens and scored in "
                  f"{ev['window']}-token windows. The router routes each document from its first "
                  f"{ev['prefix_tokens']} text tokens (the routing prefix), and no row scores those tokens. "
                  "*mixed* pools every domain's documents (token-weighted).", ""]
    lines += ["| model | " + " | ".join(doms) + " | mixed |", "|---" * (len(doms) + 2) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cells.get(d)) for d in doms) + f" | {_fmt(mixed.get(name))} |")
    lines += ["", f"Own-domain expert is best on every domain: **{rep['experts_best_on_own_domain']}**", ""]
    if rep.get("experts_beat_dense_on_own_domain"):
        lines += ["Own-domain expert beats the dense generalist: "
                  + ", ".join(f"{d} **{v}**" for d, v in rep["experts_beat_dense_on_own_domain"].items()), ""]
    sc = rep.get("system_compute") or {}
    if rep.get("ratios"):
        how = ("compute-matched: training FLOPs within "
               f"{100 * sc['tolerance']:.0f}%" if sc.get("matched") else
               "NOT compute-matched; see the FLOP ratios under Compute")
        lines += [f"Mixed-test perplexity ratios ({how}; < 1 is better than the dense generalist): "
                  + ", ".join(f"{k} = **{v:.3f}**" for k, v in rep["ratios"].items()), ""]
    lines += _router_markdown(rep.get("router"), doms)
    lines += _natural_markdown(rep.get("natural"))
    lines += ["## Compute", "", "What each model's training really consumed (tokens seen x FLOPs per token).", "",
              "| model | steps | tokens | active params | starts from | FLOPs |", "|---|---|---|---|---|---|"]
    for name, c in rep["compute"].items():
        lines.append(f"| {name} | {c['steps']} | {c['tokens']} | {c['active_params']:,} | "
                     f"{c.get('init_from') or 'random'} | {(c['flops'] or 0):.4g} |")
    if sc:
        lines += ["", f"Systems: routed experts ({' + '.join(sc['parts']['experts'])}) "
                  + ", ".join(f"{n} {f:.4g} FLOPs ({sc['ratio_to_experts'][n]:.3f}x)" for n, f in sc["flops"].items())
                  + (f". Compute-matched within {100 * sc['tolerance']:.0f}%." if sc["matched"] else
                     f". Not compute-matched (tolerance {100 * sc['tolerance']:.0f}%).")]
    lines += ["", "## Generation", ""]
    for name, g in rep["generation"].items():
        em = g.get("exact_match")
        if em:
            lines.append(f"- {name}: greedy exact match {em['correct']}/{em['n']}")
        lines.append(f"- {name}: sampled distinct-2 {g['sampling']['distinct_2']}")
    if rep.get("timing_s"):
        lines += ["", "Report timing (s, wall clock on a possibly shared CPU): "
                  + ", ".join(f"{k} {v}" for k, v in rep["timing_s"].items())]
    lines += ["", "![matrix](matrix_ppl.png)", "", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def _natural_markdown(nat: dict | None) -> list[str]:
    if not nat:
        return []
    doms = nat["domains"]
    lines = ["## Evaluation-only natural text (bits per byte)", "",
             "Each domain's natural-text set comes from a source that no training corpus uses "
             "(`training.data.evalsets`); scored after the routing prefix like the test documents.", "",
             "| model | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for name, cells in nat["matrix"].items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[d]['bpb']:.3f}" if d in cells else "-" for d in doms) + " |")
    lines += ["", "Own expert lowest of the five: " + ", ".join(f"{d} **{v}**" for d, v in nat["own_expert_best"].items())]
    if nat.get("router_top1_within_2pct_of_own"):
        lines += ["", "router-top1 within 2% of the own expert: "
                  + ", ".join(f"{d} **{v}**" for d, v in nat["router_top1_within_2pct_of_own"].items())]
    return lines + [""]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _router_markdown(r: dict | None, doms: list[str]) -> list[str]:
    """The router section (``training.router_report`` fills ``rep["router"]``): routing accuracy per domain."""
    if not r:
        return []
    lines = ["## Router", "", "| routing accuracy | " + " | ".join(doms) + " | all |", "|---" * (len(doms) + 2) + "|"]
    for key, label in (("opening_accuracy", "learned, openings of all test documents"),
                       ("routed_accuracy", "learned, openings of the scored documents"),
                       ("opening_likelihood_accuracy", "likelihood (BTM), openings of the scored documents"),
                       ("prompt_accuracy", "learned, test prompts"),
                       ("probe_accuracy", "learned, hand-written probes (`router.probes.PROBES`)"),
                       ("heldout_probe_accuracy", "learned, second hand-written probe set (`HELDOUT`, close to `PROBES`)")):
        acc = r.get(key)
        if acc:
            lines.append(f"| {label} (n={acc.get('n')}) | " + " | ".join(_pct(acc["by_domain"].get(d)) for d in doms)
                         + f" | {_pct(acc.get('all'))} |")
    return lines + [""]


def _plots(rep: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["matrix"])
    cells = {n: {**rep["matrix"][n], **({"mixed": rep["mixed_test"][n]} if n in rep.get("mixed_test", {}) else {})}
             for n in names}
    doms = rep["domains"] + (["mixed"] if rep.get("mixed_test") else [])
    grid = [[math.log(cells[n].get(d, {}).get("ppl", float("nan"))) for d in doms] for n in names]
    finite = [v for row in grid for v in row if v == v]
    mid = (min(finite) + max(finite)) / 2 if finite else 0.0
    fig, ax = plt.subplots(figsize=(1.4 * len(doms) + 2, 0.6 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(doms)), doms, rotation=30)
    ax.set_yticks(range(len(names)), names)
    for i, n in enumerate(names):
        for j, d in enumerate(doms):
            if d in cells[n]:
                light = grid[i][j] < mid  # yellow end of viridis_r
                ax.text(j, i, f"{cells[n][d]['ppl']:.1f}", ha="center", va="center",
                        color="k" if light else "w", fontsize=8)
    fig.colorbar(im, ax=ax, label="log perplexity")
    ax.set_title("test-document perplexity: model (row) on domain (column)")
    fig.tight_layout()
    fig.savefig(out / "matrix_ppl.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, c in rep["curves"].items():
        if name not in rep["compute"]:  # LM curves only (the router's loss is another quantity)
            continue
        for ax, key in zip(axes, ("train", "val")):
            if c[key]:
                ax.plot([p[1] for p in c[key]], [p[2] for p in c[key]], label=name)
    for ax, key in zip(axes, ("train", "val")):
        ax.set_xlabel("tokens")
        ax.set_title(f"{key} loss")
        ax.set_yscale("log")
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)


def _beats_dense(matrix: dict[str, dict[str, dict]], domains: tuple[str, ...],
                 base: str = "baseline-dense") -> dict[str, bool] | None:
    """Per domain: does the domain's own expert have a lower perplexity there than ``base``?"""
    if base not in matrix:
        return None
    return {d: matrix[d][d]["ppl"] < matrix[base][d]["ppl"] for d in domains if d in matrix}


def _own_best(matrix: dict[str, dict[str, dict]], domains: tuple[str, ...]) -> bool | None:
    experts = [d for d in domains if d in matrix]
    if len(experts) < 2:
        return None
    return all(matrix[d][d]["ppl"] < min(matrix[e][d]["ppl"] for e in experts if e != d) for d in experts)


def _mixed(matrix: dict[str, dict[str, Cell]], domains: tuple[str, ...]) -> dict[str, dict]:
    """Every row with a cell on every domain: all domains' documents pooled (token-weighted)."""
    out = {}
    for name, cells in matrix.items():
        if all(d in cells for d in domains):
            out[name] = Cell(sum(cells[d].nats for d in domains), sum(cells[d].tokens for d in domains),
                             sum(cells[d].bytes for d in domains)).to_dict()
    return out


def _ratios(mixed: dict[str, dict], base: str = "baseline-dense") -> dict[str, float]:
    if base not in mixed:
        return {}
    return {f"{n}/{base.removeprefix('baseline-')}": round(mixed[n]["ppl"] / mixed[base]["ppl"], 4)
            for n in RATIO_ROWS if n in mixed}


def _idle_cpus(interval: float = 0.3) -> float | None:
    """CPUs left idle by every other process over ``interval`` seconds (Linux ``/proc/stat``), else None."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total (user .. steal)

    try:
        i0, t0 = sample()
        time.sleep(interval)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (i1 - i0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def report_threads(device: torch.device) -> int:
    """Torch threads for the report: ``HMOE_REPORT_THREADS``, else the CPUs that are idle right now.

    On a shared CPU, intra-op threads that do not get a core of their own spin at every barrier:
    measured on the quick run with one competing busy process, 2 threads took 41 s, 1 thread 27 s
    (and up to ~3 min under heavier load), while on an idle machine 2 threads take 17 s.
    """
    cur = torch.get_num_threads()
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    if device.type != "cpu":
        return cur
    idle = _idle_cpus()
    return cur if idle is None else max(1, min(cur, int(idle + 0.5)))


def write_report(run_dir: str | Path, *, corpus: Any = None, run_cfg: Any = None,
                 extra_rows: Iterable[Callable] = (), device: str = "auto",
                 max_tokens_per_domain: int | None = MAX_TOKENS_PER_DOMAIN,
                 max_doc_tokens: int = MAX_DOC_TOKENS) -> dict[str, Any]:
    """Evaluate every finished model of ``run_dir`` and write ``run_dir/report/``; returns the JSON.

    Per domain the scored test tokens are ``report.eval_batches x batch_size x seq_len``, capped at
    ``max_tokens_per_domain`` (None: no cap), taken as whole documents (truncated to ``max_doc_tokens``).
    """
    run_dir = Path(run_dir).resolve()
    t0 = time.perf_counter()
    if run_cfg is None:
        from training.run_config import load_run_config
        run_cfg = load_run_config(str(run_dir / "run.yaml"))
    if corpus is None:
        from training.data import load_corpora
        corpus = load_corpora(run_cfg.data.cache_dir, run_cfg.data.size)
    dev = resolve_device(device if device != "auto" else run_cfg.device)
    names = model_dirs(run_dir)
    if not names:
        raise CheckpointError(f"{run_dir}: no finished expert or baseline checkpoints to report on")
    rc = run_cfg.report
    budget = rc.eval_batches * run_cfg.train.batch_size * run_cfg.train.seq_len
    if max_tokens_per_domain is not None:
        budget = min(budget, max_tokens_per_domain)
    threads, prev_threads = report_threads(dev), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _write_report(run_dir, corpus, names, rc, budget, max_doc_tokens, dev, extra_rows, t0, threads)
    finally:
        torch.set_num_threads(prev_threads)


def _write_report(run_dir: Path, corpus: Any, names: dict[str, Path], rc: Any, budget: int | None,
                  max_doc_tokens: int, dev: torch.device, extra_rows: Iterable[Callable], t0: float,
                  threads: int) -> dict[str, Any]:
    timing: dict[str, float] = {}

    def lap(name: str) -> None:
        timing[name] = round(time.perf_counter() - t0 - sum(timing.values()), 2)

    models = {n: load_lm(p, device=dev)[0].eval() for n, p in names.items()}
    ctx = _context(run_dir, corpus, models, budget, max_doc_tokens, dev)
    lap("load")
    matrix = {n: ctx.score(n) for n in models}
    lap("score")
    matrix.update(_external_rows(ctx, extra_rows))
    lap("extra_rows")
    mat = {n: {d: c.to_dict() for d, c in cells.items()} for n, cells in matrix.items()}
    mixed = _mixed(matrix, ctx.domains)
    rep = {"run_dir": str(run_dir), "domains": list(ctx.domains), "matrix": mat, "mixed_test": mixed,
           "ratios": _ratios(mixed),
           "eval": {"documents": sum(len(ctx.docs[d].ids) for d in ctx.domains),
                    "tokens": sum(ctx.docs[d].tokens for d in ctx.domains),
                    "by_domain": {d: {"documents": len(ctx.docs[d].ids), "tokens": ctx.docs[d].tokens}
                                  for d in ctx.domains},
                    "max_tokens_per_domain": budget, "max_doc_tokens": max_doc_tokens, "window": ctx.window,
                    "prefix_tokens": ctx.prefix_tokens},
           "experts_best_on_own_domain": _own_best(mat, ctx.domains),
           "experts_beat_dense_on_own_domain": _beats_dense(mat, ctx.domains),
           "compute": compute_used(run_dir, names), "curves": loss_curves(run_dir)}
    rep["system_compute"] = system_compute(rep["compute"])
    rep.update(ctx.sections)
    natural = natural_texts()
    if natural:
        nctx = _context(run_dir, corpus, models, budget, max_doc_tokens, dev, texts=natural, name="natural")
        rep["natural"] = natural_section(nctx, extra_rows)
    lap("natural")
    rep["generation"] = generation_checks(models, ctx, rc.gen_items, rc.samples, rc.max_new_tokens)
    lap("generation")
    with atomic_dir(run_dir / "report") as tmp:
        (tmp / "report.json").write_text(json.dumps(rep, indent=2))
        _plots(rep, tmp)
        lap("plots")
        rep["timing_s"] = {**timing, "total": round(time.perf_counter() - t0, 2), "threads": threads}
        (tmp / "report.json").write_text(json.dumps(rep, indent=2))
        (tmp / "report.md").write_text(_markdown(rep))
    log.info("report written to %s in %.1fs", run_dir / "report", time.perf_counter() - t0)
    return rep
