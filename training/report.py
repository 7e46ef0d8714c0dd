"""Per-expert report of a run: test-document perplexity / bits-per-byte, loss curves, compute, generation.

``write_report(run_dir)`` (also ``hmoe report RUN_DIR``) writes ``report/report.json``,
``report/report.md`` and PNG plots, atomically (the whole ``report/`` directory is replaced).
What the rows are scored on, and how, is ``training.scoring``; the router's rows and section come
from ``training.router_report``; the Markdown and the plots from ``training.report_render``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from experts.atomic import atomic_dir
from experts.checkpoint import CheckpointError, load_lm
from experts.device import resolve_device
from router.domains import DOMAINS
from training.loop import read_metrics
from training.report_render import markdown, plots
from training.router_report import report_rows as router_rows
from training.task_scores import distinct_2, generate_ids, task_section
from training.scoring import (ReportContext, beats_dense, build_context, external_rows, mixed_rows,
                              model_dirs, own_best, ratios_to)

log = logging.getLogger(__name__)

MAX_DOC_TOKENS = 512  # a test document is scored on its first MAX_DOC_TOKENS ids (<|bos|> text <|eos|>)
MAX_TOKENS_PER_DOMAIN = 8192  # cap on the scored test tokens per domain (keeps the report fast)
THREADS_ENV = "HMOE_REPORT_THREADS"  # torch threads for the report (default: the CPUs idle when it starts)
MATCH_TOLERANCE = 0.02  # systems are called compute-matched when their FLOPs agree within this share


# ---- the matrix ---------------------------------------------------------------------------------
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
    matrix.update(external_rows(ctx, [router_rows, *extra_rows]))
    mat = {n: {d: c.to_dict() for d, c in cells.items()} for n, cells in matrix.items()}
    experts = [d for d in ctx.domains if d in mat]
    lowest = {d: mat[d][d]["bpb"] == min(mat[e][d]["bpb"] for e in DOMAINS if e in mat) for d in experts}
    top1 = mat.get("router-top1")
    within = {d: top1[d]["bpb"] <= 1.02 * mat[d][d]["bpb"] for d in experts} if top1 else None
    return {"matrix": mat, "domains": list(ctx.domains), "own_expert_best": lowest,
            "router_top1_within_2pct_of_own": within, "router": ctx.sections.get("router"),
            "eval": {d: {"documents": len(ctx.docs[d].ids), "tokens": ctx.docs[d].tokens} for d in ctx.domains}}


# ---- generation checks --------------------------------------------------------------------------
def samples(model: torch.nn.Module, tok: Any, prompts: list[str], max_new: int, seed: int = 0) -> dict:
    """A few sampled continuations of test prompts and their mean distinct-2 ratio."""
    from experts.sampling import SamplingParams

    if not prompts:
        return {"distinct_2": None, "samples": []}
    room = model.cfg.max_seq_len - max_new
    ids = [([tok.bos_id] + tok.encode(p))[-room:] for p in prompts]
    params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=max_new, stop_ids=(tok.eos_id,), seed=seed)
    outs = generate_ids(model, ids, params)
    d2 = [distinct_2(o) for o in outs]
    return {"distinct_2": round(sum(d2) / len(d2), 4),
            "samples": [{"prompt": p[:200], "continuation": tok.decode(o), "distinct_2": round(d, 4)}
                        for p, o, d in zip(prompts, outs, d2)]}


def generation_checks(models: dict[str, torch.nn.Module], ctx: ReportContext, n_samples: int,
                      max_new: int) -> dict[str, Any]:
    """Sampled continuations of each expert's own test prompts (raw text, no chat format)."""
    out: dict[str, Any] = {}
    for name, model in models.items():
        if name in DOMAINS:
            prompts = [r["prompt"] for r in ctx.corpus.docs(name, "test") if r.get("prompt", "").strip()][:n_samples]
            out[name] = {"sampling": samples(model, ctx.tokenizer, prompts, max_new)}
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

    The routed experts' system is the seed (when the run has one) plus every expert's branch; the
    merged model's adds its fine-tune; each generalist is one model. Systems are *matched* when every
    total is within ``MATCH_TOLERANCE`` of the experts' total; the ratios are printed either way.
    """
    experts = [n for n in DOMAINS if n in compute]
    if not experts:
        return {}
    parts = experts + (["seed"] if "seed" in compute else [])
    totals = {"experts": float(sum(compute[n]["flops"] or 0 for n in parts))}
    if "merged" in compute:  # Branch-Train-MiX: the experts, then the merged model's fine-tune
        totals["merged"] = totals["experts"] + float(compute["merged"]["flops"] or 0)
    totals.update({n: float(compute[n]["flops"] or 0) for n in ("baseline-dense", "baseline-moe") if n in compute})
    ratios = {n: round(v / totals["experts"], 4) if totals["experts"] else None for n, v in totals.items()}
    matched = len(totals) > 1 and all(r is not None and abs(r - 1) <= MATCH_TOLERANCE for r in ratios.values())
    # the systems whose totals agree with each other (the merged model and the generalists, which
    # spend the experts' FLOPs plus the merge's fine-tune), when not every system's do
    groups: list[list[str]] = []
    for name, flops in sorted(totals.items(), key=lambda kv: kv[1]):
        low = totals[groups[-1][0]] if groups else 0.0
        if low and abs(flops / low - 1) <= MATCH_TOLERANCE:
            groups[-1].append(name)
        else:
            groups.append([name])
    return {"parts": {"experts": parts}, "flops": totals, "ratio_to_experts": ratios, "matched": matched,
            "matched_groups": [] if matched else [g for g in groups if len(g) > 1], "tolerance": MATCH_TOLERANCE}


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


def scored_budget(run_cfg: Any, max_tokens_per_domain: int | None = MAX_TOKENS_PER_DOMAIN) -> int:
    """Scored test tokens per domain: ``report.eval_batches x batch_size x seq_len``, capped at
    ``max_tokens_per_domain`` (None: no cap)."""
    budget = run_cfg.report.eval_batches * run_cfg.train.batch_size * run_cfg.train.seq_len
    return budget if max_tokens_per_domain is None else min(budget, max_tokens_per_domain)


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
        corpus = load_corpora(run_cfg.data.cache_dir, run_cfg.data.corpus_name())
    dev = resolve_device(device if device != "auto" else run_cfg.device)
    names = model_dirs(run_dir)
    if not names:
        raise CheckpointError(f"{run_dir}: no finished expert or baseline checkpoints to report on")
    rc = run_cfg.report
    budget = scored_budget(run_cfg, max_tokens_per_domain)
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

    loaded = {n: load_lm(p, device=dev) for n, p in names.items()}
    models = {n: m.eval() for n, (m, _, _) in loaded.items()}
    ctx = build_context(run_dir, corpus, models, budget, max_doc_tokens, dev)
    lap("load")
    matrix = {n: ctx.score(n) for n in models}
    lap("score")
    matrix.update(external_rows(ctx, [router_rows, *extra_rows]))
    lap("extra_rows")
    mat = {n: {d: c.to_dict() for d, c in cells.items()} for n, cells in matrix.items()}
    mixed = mixed_rows(matrix, ctx.domains)
    rep = {"run_dir": str(run_dir), "domains": list(ctx.domains), "matrix": mat, "mixed_test": mixed,
           "ratios": ratios_to(mixed),
           "eval": {"documents": sum(len(ctx.docs[d].ids) for d in ctx.domains),
                    "tokens": sum(ctx.docs[d].tokens for d in ctx.domains),
                    "by_domain": {d: {"documents": len(ctx.docs[d].ids), "tokens": ctx.docs[d].tokens}
                                  for d in ctx.domains},
                    "max_tokens_per_domain": budget, "max_doc_tokens": max_doc_tokens, "window": ctx.window,
                    "prefix_tokens": ctx.prefix_tokens},
           "experts_best_on_own_domain": own_best(mat, ctx.domains),
           "experts_beat_dense_on_own_domain": beats_dense(mat, ctx.domains),
           "compute": compute_used(run_dir, names), "curves": loss_curves(run_dir)}
    rep["system_compute"] = system_compute(rep["compute"])
    rep.update(ctx.sections)
    if "merged" in models:
        from training.merge import routing_shares
        origin = loaded["merged"][2].get("merged_from") or list(ctx.domains)
        rep["merged_routing"] = routing_shares(models["merged"], {d: ctx.docs[d].ids for d in ctx.domains},
                                               origin, dev)
    lap("merged_routing")
    natural = natural_texts()
    if natural:
        nctx = build_context(run_dir, corpus, models, budget, max_doc_tokens, dev, texts=natural, name="natural")
        rep["natural"] = natural_section(nctx, extra_rows)
    lap("natural")
    rep["generation"] = generation_checks(models, ctx, rc.samples, rc.max_new_tokens)
    lap("generation")
    rep["tasks"] = task_section(models, corpus, ctx.tokenizer, rc.gen_items, rc.max_new_tokens,
                                {n: meta for n, (_, _, meta) in loaded.items()})
    lap("tasks")
    with atomic_dir(run_dir / "report") as tmp:
        (tmp / "report.json").write_text(json.dumps(rep, indent=2))
        plots(rep, tmp)
        lap("plots")
        rep["timing_s"] = {**timing, "total": round(time.perf_counter() - t0, 2), "threads": threads}
        (tmp / "report.json").write_text(json.dumps(rep, indent=2))
        (tmp / "report.md").write_text(markdown(rep))
    log.info("report written to %s in %.1fs", run_dir / "report", time.perf_counter() - t0)
    return rep
