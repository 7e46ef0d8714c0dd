"""How the code expert's held-out completions parse under different decoding settings.

Asks the report's held-out code items (``training.data.instruct.task_items``) of one run's code
expert (and any other model named), with the report's token budget, and prints per setting the
share of completions that parse, the share that ended before the budget, and the parse rate of
those. Settings are greedy with a repetition penalty (1.0: none) and a token budget.

    python -m bench.code_decoding runs/std --out docs/results/code_decoding_standard.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import setup
from experts.atomic import atomic_write_text
from experts.checkpoint import load_lm
from training.data import load_corpora
from training.run_config import load_run_config
from training.task_scores import code_answers, code_scores
from training.data.instruct import task_items

SETTINGS = ((1.0, 96), (1.0, 192), (1.1, 96), (1.2, 96), (1.3, 96))  # (repetition penalty, max new tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--models", default="experts/code", help="comma-separated checkpoint dirs under RUN")
    ap.add_argument("--per-family", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = setup()
    cfg = load_run_config(str(args.run / "run.yaml"))
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    tok = corpus.tokenizer()
    items = task_items(corpus, "code", args.per_family)
    rows = []
    for name in args.models.split(","):
        model, _, _ = load_lm(args.run / name)
        for penalty, budget in SETTINGS:
            t0 = time.perf_counter()
            texts, finished = code_answers(model.eval(), tok, items, budget, repetition_penalty=penalty)
            s = code_scores(items, texts, finished=finished)
            row = {"model": name, "repetition_penalty": penalty, "max_new_tokens": budget, "n": s["n"],
                   "parse_rate": s["parse_rate"], "finished_rate": s["finished_rate"],
                   "parse_rate_finished": s["parse_rate_finished"], "codeio_n": s["codeio_n"],
                   "codeio_exec_accuracy": s["codeio_exec_accuracy"], "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"run": str(args.run), "env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
