"""Per-expert report of a run: cross-domain perplexity / bits-per-byte, loss curves, compute, generation.

``write_report(run_dir)`` (also ``hmoe report RUN_DIR``) writes ``report/report.json``,
``report/report.md`` and PNG plots, atomically (the whole ``report/`` directory is replaced).

Extension point: extra rows of the matrix (e.g. the router-selected ensemble) come from *row
providers*: callables ``provider(ctx: ReportContext) -> dict[row_name, dict[domain, Cell]]``,
registered with :func:`register_row_provider`, passed as ``write_report(extra_rows=[...])``, or
exported as ``report_rows`` by a module listed in :data:`ROW_PROVIDER_MODULES` (imported if present).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from experts.checkpoint import CheckpointError, atomic_dir, load_lm
from experts.device import resolve_device
from router.domains import DOMAINS
from training.loop import read_metrics

log = logging.getLogger(__name__)

ROW_PROVIDER_MODULES = ("router.report",)  # modules exporting report_rows(ctx)
QA_DOMAINS = ("math", "reasoning")


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
class ReportContext:
    """What row providers get: the run, its corpus and tokenizer, and the evaluation windows."""

    run_dir: Path
    corpus: Any
    tokenizer: Any
    domains: tuple[str, ...]
    windows: dict[str, list[torch.Tensor]]  # domain -> list of (B, T+1) id windows
    device: torch.device
    evaluate: Callable[[torch.nn.Module, str], Cell]  # (model, domain) -> Cell, same windows


_PROVIDERS: list[Callable[[ReportContext], dict[str, dict[str, Cell]]]] = []


def register_row_provider(fn: Callable[[ReportContext], dict[str, dict[str, Cell]]]) -> None:
    """Add rows to every report written by this process (e.g. the router-selected ensemble)."""
    _PROVIDERS.append(fn)


# ---- the matrix ---------------------------------------------------------------------------------
def model_dirs(run_dir: Path) -> dict[str, Path]:
    """Row name -> finished LM checkpoint: experts in domain order, then the baselines."""
    out = {d: run_dir / "experts" / d for d in DOMAINS if (run_dir / "experts" / d / "meta.json").exists()}
    for kind in ("dense", "moe"):
        p = run_dir / "baselines" / kind
        if (p / "meta.json").exists():
            out[f"baseline-{kind}"] = p
    return out


def test_windows(path: Path, seq_len: int, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping (B, T+1) windows from the start of a packed test split."""
    from training.data.packing import load_tokens

    tokens = load_tokens(path)
    n = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    w = torch.stack([torch.from_numpy(tokens[i * seq_len:(i + 1) * seq_len + 1].astype("int64"))
                     for i in range(n)])  # (N, T+1)
    return [w[i:i + batch_size] for i in range(0, n, batch_size)]


def _window_bytes(windows: list[torch.Tensor], tokenizer: Any) -> int:
    """UTF-8 bytes of the predicted text (targets, specials excluded)."""
    return sum(len(tokenizer.decode(row[1:].tolist()).encode("utf-8")) for b in windows for row in b)


@torch.no_grad()
def eval_cell(model: torch.nn.Module, windows: list[torch.Tensor], n_bytes: int, device: torch.device) -> Cell:
    """Total next-token NLL of ``model`` over ``windows``."""
    nats, tokens = 0.0, 0
    for w in windows:
        w = w.to(device)
        logits = model(w[:, :-1]).logits  # (B, T, V)
        nats += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum"))
        tokens += w[:, 1:].numel()
    return Cell(nats, tokens, n_bytes)


def _context(run_dir: Path, corpus: Any, seq_len: int, batch_size: int, max_batches: int,
             device: torch.device) -> ReportContext:
    tok = corpus.tokenizer()
    domains = tuple(d for d in DOMAINS if d in corpus.domains)
    windows = {d: test_windows(corpus.tokens_path(d, "test"), seq_len, batch_size, max_batches) for d in domains}
    n_bytes = {d: _window_bytes(windows[d], tok) for d in domains}
    return ReportContext(run_dir, corpus, tok, domains, windows, device,
                         lambda m, d: eval_cell(m, windows[d], n_bytes[d], device))


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
    from experts.config import ModelConfig

    out = {}
    for name, path in names.items():
        meta = json.loads((path / "meta.json").read_text())
        cfg = ModelConfig.from_dict(meta["config"])
        tr = meta.get("train", {})
        out[name] = {"tokens": tr.get("tokens"), "flops": tr.get("flops"), "steps": tr.get("steps"),
                     "active_params": cfg.num_params(active=True), "total_params": cfg.num_params(),
                     "tokens_x_active_params": (tr.get("tokens") or 0) * cfg.num_params(active=True),
                     "best_val_loss": tr.get("best_val_loss"), "elapsed_s": tr.get("elapsed_s")}
    return out


def _markdown(rep: dict[str, Any]) -> str:
    doms, rows = rep["domains"], rep["matrix"]
    lines = [f"# Report: {rep['run_dir']}", "", "## Perplexity (bits per byte) on each domain's test split", "",
             "| model | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for name, cells in rows.items():
        vals = [f"{cells[d]['ppl']:.2f} ({cells[d]['bpb']:.3f})" if d in cells else "-" for d in doms]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    lines += ["", f"Own-domain expert is best on every domain: **{rep['experts_best_on_own_domain']}**", "",
              "## Compute", "", "| model | steps | tokens | active params | tokens x active | FLOPs |",
              "|---|---|---|---|---|---|"]
    for name, c in rep["compute"].items():
        lines.append(f"| {name} | {c['steps']} | {c['tokens']} | {c['active_params']:,} | "
                     f"{c['tokens_x_active_params']:.3g} | {(c['flops'] or 0):.3g} |")
    lines += ["", "## Generation", ""]
    for name, g in rep["generation"].items():
        em = g.get("exact_match")
        if em:
            lines.append(f"- {name}: greedy exact match {em['correct']}/{em['n']}")
        lines.append(f"- {name}: sampled distinct-2 {g['sampling']['distinct_2']}")
    lines += ["", "![matrix](matrix_ppl.png)", "", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def _plots(rep: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms, names = rep["domains"], list(rep["matrix"])
    grid = [[math.log(rep["matrix"][n].get(d, {}).get("ppl", float("nan"))) for d in doms] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(doms) + 2, 0.6 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(doms)), doms, rotation=30)
    ax.set_yticks(range(len(names)), names)
    for i, n in enumerate(names):
        for j, d in enumerate(doms):
            if d in rep["matrix"][n]:
                light = grid[i][j] < (min(map(min, grid)) + max(map(max, grid))) / 2  # yellow end of viridis_r
                ax.text(j, i, f"{rep['matrix'][n][d]['ppl']:.1f}", ha="center", va="center",
                        color="k" if light else "w", fontsize=8)
    fig.colorbar(im, ax=ax, label="log perplexity")
    ax.set_title("test perplexity: model (row) on domain (column)")
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


def _own_best(matrix: dict[str, dict[str, dict]], domains: tuple[str, ...]) -> bool | None:
    experts = [d for d in domains if d in matrix]
    if len(experts) < 2:
        return None
    return all(matrix[d][d]["ppl"] < min(matrix[e][d]["ppl"] for e in experts if e != d) for d in experts)


def write_report(run_dir: str | Path, *, corpus: Any = None, run_cfg: Any = None,
                 extra_rows: Iterable[Callable] = (), device: str = "auto") -> dict[str, Any]:
    """Evaluate every finished model of ``run_dir`` and write ``run_dir/report/``; returns the JSON."""
    run_dir = Path(run_dir).resolve()
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
    ctx = _context(run_dir, corpus, run_cfg.train.seq_len, run_cfg.train.batch_size, rc.eval_batches, dev)
    models = {n: load_lm(p, device=dev)[0] for n, p in names.items()}
    matrix = {n: {d: ctx.evaluate(m, d) for d in ctx.domains} for n, m in models.items()}
    matrix.update(_external_rows(ctx, extra_rows))
    mat = {n: {d: c.to_dict() for d, c in cells.items()} for n, cells in matrix.items()}
    rep = {"run_dir": str(run_dir), "domains": list(ctx.domains), "matrix": mat,
           "experts_best_on_own_domain": _own_best(mat, ctx.domains),
           "compute": compute_used(run_dir, names), "curves": loss_curves(run_dir),
           "generation": generation_checks(models, ctx, rc.gen_items, rc.samples, rc.max_new_tokens)}
    with atomic_dir(run_dir / "report") as tmp:
        (tmp / "report.json").write_text(json.dumps(rep, indent=2))
        (tmp / "report.md").write_text(_markdown(rep))
        _plots(rep, tmp)
    log.info("report written to %s", run_dir / "report")
    return rep
