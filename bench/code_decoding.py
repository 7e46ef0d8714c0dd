"""How the code expert's completions parse under different decoding settings.

Asks one run's code expert (and any other model named) code items with the report's token budget,
and prints per setting the share of completions that parse, the share that ended before the
budget, and the parse rate of those. A setting is greedy decoding with or without the Python syntax
guard (``experts.syntax_guard``), with a CTRL repetition penalty or OpenAI's frequency penalty, and a
token budget (the report's 96, or the rest of the context: 256). ``--split
val`` asks validation items (``training.data.instruct.domain_items`` on the val split, shuffled
with seed 0, ``--per-family`` of each family): the split the served settings were chosen on; the
default asks the report's held-out test items (``task_items``).

    python -m bench.code_decoding runs/std --split val --out docs/results/code_guard_val.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from bench.common import setup
from experts.atomic import atomic_write_text
from experts.checkpoint import load_lm
from experts.syntax_guard import PythonGuard
from training.data import load_corpora
from training.data.instruct import domain_items, task_items
from training.run_config import load_run_config
from training.task_scores import code_answers, code_scores

# (syntax guard, repetition penalty, frequency penalty, max new tokens)
SETTINGS = ((False, 1.0, 0.0, 96), (True, 1.0, 0.0, 96), (False, 1.2, 0.0, 96), (True, 1.2, 0.0, 96),
            (True, 1.2, 0.0, 256), (False, 1.0, 1.0, 96), (True, 1.0, 0.5, 96), (True, 1.0, 1.0, 96),
            (True, 1.0, 1.5, 96), (True, 1.0, 2.0, 96), (True, 1.0, 1.5, 256))


def val_items(corpus, per_family: int) -> list[dict]:
    """``per_family`` validation items of each code family, in a seeded random order."""
    items = domain_items("code", corpus.docs("code", "val"))
    random.Random(0).shuffle(items)
    fams: dict[str, list[dict]] = {}
    for it in items:
        fams.setdefault(it["family"], []).append(it)
    return [it for f in sorted(fams) for it in fams[f][:per_family]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--models", default="experts/code", help="comma-separated checkpoint dirs under RUN")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--per-family", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = setup()
    cfg = load_run_config(str(args.run / "run.yaml"))
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    tok = corpus.tokenizer()
    items = val_items(corpus, args.per_family) if args.split == "val" else task_items(corpus, "code", args.per_family)
    rows = []
    for name in args.models.split(","):
        model, _, _ = load_lm(args.run / name)
        for guard, penalty, frequency, budget in SETTINGS:
            t0 = time.perf_counter()
            texts, finished = code_answers(model.eval(), tok, items, budget, repetition_penalty=penalty,
                                           frequency_penalty=frequency, guard=PythonGuard(tok) if guard else None,
                                           room=96)
            s = code_scores(items, texts, finished=finished, examples=False)
            row = {"model": name, "split": args.split, "guard": guard, "repetition_penalty": penalty,
                   "frequency_penalty": frequency, "max_new_tokens": budget, **s,
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"run": str(args.run), "env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
