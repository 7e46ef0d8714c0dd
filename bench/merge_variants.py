"""Branch-Train-MiX merges of one run's experts, before any fine-tune, scored as the report scores.

Each variant is the run's merge (``merge.*`` of its ``run.yaml``) with some fields changed: the
model the pipeline's merged job starts from (``training.pipeline.merged_job``: the same experts,
per-token embedding weights, router starts and, with ``gate_scope: model``, the run's router). Every
variant is scored on the report's test documents after their routing prefix (``training.scoring``:
the same tokens as the report's rows, so its ``router-top1`` and ``router-mixture`` rows compare),
with each expert alone as the reference ("own expert" per domain).

    python -m bench.merge_variants runs/standard --out docs/results/merge_variants.json \\
        [--variant 'name={"route": "all", "gate_scope": "layer", "top_k": 2, "gate_init": "fitted"}' ...] \\
        [--checkpoint NAME=DIR ...] [--split val]

``--checkpoint`` scores finished LMs too (fine-tuned merges of other run directories); ``--split val``
scores the validation split's documents the same way, to choose between merges without the test split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from experts.atomic import atomic_write_json
from experts.checkpoint import load_lm
from training.data import load_corpora
from training.pipeline import merged_job
from training.report import MAX_DOC_TOKENS, scored_budget
from training.run_config import load_run_config
from training.scoring import build_context, mixed_rows, model_dir

# name -> merge.* fields; what standard merges with, and the per-layer routers it replaced
VARIANTS: dict[str, dict] = {
    "model router, route full, top-1": {"route": "full", "gate_scope": "model", "top_k": 1, "gate_context": "doc"},
    "model router, route full, top-2": {"route": "full", "gate_scope": "model", "top_k": 2, "gate_context": "doc"},
    "model router, route ffn, top-1": {"route": "ffn", "gate_scope": "model", "top_k": 1, "gate_context": "doc"},
    "per-layer routers, route all, top-2, fitted": {"route": "all", "gate_scope": "layer", "top_k": 2,
                                                    "gate_context": "doc", "gate_init": "fitted"},
    "per-layer routers, route ffn, top-2, fitted": {"route": "ffn", "gate_scope": "layer", "top_k": 2,
                                                    "gate_context": "doc", "gate_init": "fitted"},
}


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, fields = text.partition("=")
    if not sep:
        raise SystemExit(f"--variant {text!r}: write NAME='{{\"route\": \"ffn\", ...}}'")
    return name, json.loads(fields)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON of merge.* fields (repeatable; "
                    "default: the built-in list)")
    ap.add_argument("--checkpoint", action="append", default=[], help="NAME=DIR: a finished LM to score too")
    ap.add_argument("--split", choices=("test", "val"), default="test", help="whose documents are scored")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = dict(parse_variant(v) for v in args.variant) or ({} if args.checkpoint else VARIANTS)
    cfg = load_run_config(str(args.run_dir / "run.yaml"))
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    expert_cfg = cfg.model.build(vocab_size=corpus.tokenizer().vocab_size)
    experts = {d: load_lm(model_dir(args.run_dir, d))[0] for d in cfg.experts}
    budget = scored_budget(cfg)
    texts = {d: (r["text"] for r in corpus.docs(d, args.split)) for d in cfg.experts}
    ctx = build_context(args.run_dir, corpus, experts, budget, MAX_DOC_TOKENS, torch.device("cpu"), texts=texts)
    matrix = {"own expert": {d: ctx.score(d)[d] for d in ctx.domains}}
    seconds = {}
    for name, path in (c.split("=", 1) for c in args.checkpoint):
        matrix[name] = ctx.score(name, load_lm(path)[0].eval())
    for name, fields in variants.items():
        t0 = time.perf_counter()
        vcfg = load_run_config(str(args.run_dir / "run.yaml"), {f"merge.{k}": v for k, v in fields.items()})
        model = merged_job(vcfg, corpus, expert_cfg, args.run_dir).task.build_model().eval()
        matrix[name] = ctx.score(name, model)
        seconds[name] = round(time.perf_counter() - t0, 1)
        cells = {d: round(c.ppl, 2) for d, c in matrix[name].items()}
        print(f"{name}: {cells} mixed {mixed_rows({name: matrix[name]}, ctx.domains)[name]['ppl']:.2f}", flush=True)
    out = {"run_dir": str(args.run_dir), "split": args.split, "variants": variants, "seconds": seconds,
           "checkpoints": args.checkpoint,
           "tokens": sum(ctx.docs[d].tokens for d in ctx.domains), "prefix_tokens": ctx.prefix_tokens,
           "matrix": {n: {d: c.to_dict() for d, c in cells.items()} for n, cells in matrix.items()},
           "mixed_test": mixed_rows(matrix, ctx.domains)}
    atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
