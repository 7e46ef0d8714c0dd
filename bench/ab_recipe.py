"""A/B of training recipes at equal compute: per-domain validation loss of experts.

Every variant trains the same model size on the same data for the same steps, batch and
sequence length (so the same FLOPs), from the same seed, and is scored on the same fixed
validation windows (``LMTask.val_batches``: evenly spaced windows of the domain's val split).
Only the recipe differs: the optimizer (AdamW, or Muon on the hidden matrices), its lr, the
schedule (cosine, or warmup-stable-decay) and QK-norm. The ideas come from the modded-nanogpt
speedrun (github.com/KellerJordan/modded-nanogpt); the implementations are hmoe's own
(``training/optim.py``, ``experts/model.py``).

Trains through ``training.loop.train`` and ``training.tasks.LMTask`` directly (no Ray), ``--jobs``
runs at a time with one torch thread each. Results are written after every run, so an
interrupted sweep keeps what it measured.

    .venv/bin/hmoe data build --size quick
    .venv/bin/python bench/ab_recipe.py --size quick --domains math,conversation,code
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Every variant starts from the preset's budget and lr with this recipe pinned (AdamW, cosine, no
# QK-norm: hmoe's recipe before this A/B), so the presets' own defaults never leak into a variant.
BASE_LOOP = {"optimizer": "adamw", "schedule": "cosine", "decay_fraction": 0.2, "muon_weight_decay": 0.0}
BASE_MODEL = {"qk_norm": False}

# name -> (LoopConfig overrides, ModelConfig overrides); "adamw_cos_lr3e-3" is the preset's lr
# (3e-3 at quick; 2e-3 at standard)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "adamw_cos_lr3e-3": ({}, {}),  # the recipe of the presets
    "adamw_cos_lr1e-3": ({"lr": 1e-3, "min_lr": 1e-4}, {}),
    "adamw_cos_lr6e-3": ({"lr": 6e-3, "min_lr": 6e-4}, {}),
    "adamw_wsd": ({"schedule": "wsd"}, {}),
    "adamw_qknorm": ({}, {"qk_norm": True}),
    "muon0.02": ({"optimizer": "muon", "muon_lr": 0.02}, {}),
    "muon0.05": ({"optimizer": "muon", "muon_lr": 0.05}, {}),
    "muon_wsd_qknorm": ({"optimizer": "muon", "muon_lr": 0.02, "schedule": "wsd"}, {"qk_norm": True}),
    "muon0.05_wsd_qknorm": ({"optimizer": "muon", "muon_lr": 0.05, "schedule": "wsd"}, {"qk_norm": True}),
}

# the presets' settings; `standard` here is a shorter check of the small model (see --steps)
PRESET = {"quick": "quick", "standard": "standard"}


def _settings(size: str, steps: int | None):
    from training.run_config import load_run_config

    over = {"train.steps": steps} if steps else {}
    return load_run_config(PRESET[size], over)


def run_one(size: str, variant: str, domain: str, steps: int | None, eval_batches: int,
            loop_over: dict, model_over: dict, base_over: dict, work: str) -> dict:
    """Train one (variant, domain) expert in this process; return its final validation loss."""
    import torch

    torch.set_num_threads(1)
    from router.domains import DOMAINS
    from training.data import load_corpora
    from training.loop import train
    from training.pipeline import loop_config
    from training.tasks import LMTask

    cfg = _settings(size, steps)
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    model_cfg = cfg.model.build(vocab_size=corpus.tokenizer().vocab_size, **{**BASE_MODEL, **model_over})
    seed = cfg.seed + DOMAINS.index(domain)
    task = LMTask(name=domain, out_dir=f"experts/{domain}", model_cfg=model_cfg,
                  train_paths=[str(corpus.tokens_path(domain, "train"))],
                  val_paths=[str(corpus.tokens_path(domain, "val"))],
                  batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len, seed=seed,
                  eval_batches=eval_batches)
    loop = loop_config(cfg.train, steps=cfg.train.steps, seed=seed, device="cpu")
    loop = type(loop)(**{**loop.model_dump(), "eval_every": 0, "ckpt_every": 0, "eval_batches": eval_batches,
                         "num_threads": 1, "progress": False, "fail_at": "", **BASE_LOOP, **base_over, **loop_over})
    run_dir = Path(work) / size / variant
    shutil.rmtree(run_dir / "experts" / domain, ignore_errors=True)
    (run_dir / "metrics" / f"{domain}.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = train(task, loop, run_dir)
    n_val = sum(int(b[1].numel()) for b in task.val_batches())
    return {"variant": variant, "domain": domain, "val_loss": res.last_val_loss,
            "final_train_loss": res.final_train_loss, "steps": res.steps, "tokens": res.tokens,
            "flops": res.flops, "val_tokens": n_val, "wall_s": round(time.perf_counter() - t0, 1),
            "loop": {k: v for k, v in loop.model_dump().items()
                     if k in ("lr", "min_lr", "warmup_steps", "optimizer", "muon_lr", "schedule",
                              "decay_fraction", "weight_decay", "muon_weight_decay", "batch_size")},
            "model": {"qk_norm": model_cfg.qk_norm, "d_model": model_cfg.d_model,
                      "n_layers": model_cfg.n_layers, "params": model_cfg.num_params()}}


def table(results: list[dict], variants: list[str], domains: list[str]) -> str:
    cell = {(r["variant"], r["domain"]): r["val_loss"] for r in results}
    lines = ["| variant | " + " | ".join(domains) + " | mean |",
             "| --- |" + " ---: |" * (len(domains) + 1)]
    for v in variants:
        vals = [cell.get((v, d)) for d in domains]
        mean = sum(vals) / len(vals) if all(x is not None for x in vals) else None
        fmt = lambda x: "—" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"| {v} | " + " | ".join(fmt(x) for x in vals) + f" | {fmt(mean)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(PRESET), default="quick")
    ap.add_argument("--domains", default="math,conversation,code")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=None, help="override the preset's train.steps")
    ap.add_argument("--eval-batches", type=int, default=32, help="fixed validation batches per domain")
    ap.add_argument("--lr", type=float, default=None, help="AdamW lr for every variant without its own")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="re-run pairs already in the results file")
    ap.add_argument("--work", default="/tmp/hmoe_ab")
    ap.add_argument("--out", default=None, help="JSON (default docs/results/recipe_ab_<size>.json)")
    args = ap.parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out = Path(args.out or ROOT / "docs" / "results" / f"recipe_ab_{args.size}.json")
    base_over = {"lr": args.lr, "min_lr": args.lr / 10} if args.lr else {}
    prev = json.loads(out.read_text()) if out.exists() else {}
    results = [r for r in prev.get("results", [])
               if not (args.redo and r["variant"] in variants and r["domain"] in domains)]
    done = {(r["variant"], r["domain"]) for r in results}
    cfg = _settings(args.size, args.steps)
    header = {"note": "each (variant, domain) pair was run once; pairs already in the file are kept "
                      "unless --redo", "size": args.size, "preset": PRESET[args.size], "steps": cfg.train.steps,
              "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
              "eval_batches": args.eval_batches, "model": cfg.model.model_dump(),
              "variants": {v: {"loop": VARIANTS[v][0], "model": VARIANTS[v][1]} for v in VARIANTS},
              "commands": sorted({*prev.get("commands", []),
                                  "python bench/ab_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:])})}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(run_one, args.size, v, d, args.steps, args.eval_batches, *VARIANTS[v],
                            {} if "lr" in VARIANTS[v][0] else base_over, args.work): (v, d)
                for d in domains for v in variants if (v, d) not in done}
        for f in as_completed(futs):
            v, d = futs[f]
            try:
                r = f.result()
            except Exception as e:  # noqa: BLE001 - keep the sweep going, record the failure
                print(f"{v} {d}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            results.append(r)
            print(f"{v:22s} {d:14s} val {r['val_loss']:.4f} train {r['final_train_loss']:.4f} "
                  f"{r['wall_s']}s  [{time.perf_counter() - t0:.0f}s]", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**prev, **header, "results": results}, indent=1))
    all_variants = list(dict.fromkeys([*[r["variant"] for r in results]]))
    all_domains = list(dict.fromkeys([*[r["domain"] for r in results]]))
    print(table(results, [v for v in VARIANTS if v in all_variants], all_domains))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
