"""How much arithmetic does a trained math expert learn from more instruction steps on arithmetic alone?

Continues a run's math expert on the arithmetic curriculum only (``training.data.instruct``: + - x
on 1- to 4-digit operands, small operands first) for ``--steps`` steps of the run's recipe, through
``training.loop.train``, then asks the held-out 2- and 3-digit pairs in the plain phrasings, greedy,
with the calculator (``experts.calculator``), and prints the exact match per operation and the share
of replies whose call copies the question's expression, as one JSON line (also written to ``--out``).

    .venv/bin/python -m bench.arith_sft runs/standard --steps 1200 --out /tmp/arith.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from experts.atomic import atomic_write_json
from experts.calculator import Calculator, expression_in
from experts.checkpoint import load_lm
from training.data import load_corpora
from training.data.instruct import arithmetic_eval_items, arithmetic_items
from training.data.sft import encode_items, write_items
from training.loop import LoopConfig, train
from training.run_config import load_run_config
from training.task_scores import answer, is_correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--items", type=int, default=150, help="held-out items asked")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--init", type=Path, help="checkpoint to continue (default: the run's math expert)")
    ap.add_argument("--train-tool-outputs", action="store_true",
                    help="also train on the values the calculator writes (default: left out of the loss)")
    args = ap.parse_args()
    cfg = load_run_config(str(args.run_dir / "run.yaml"))
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    tok = corpus.tokenizer()
    expert = args.init or args.run_dir / "experts" / "math"
    _, mcfg, _ = load_lm(expert)
    t = cfg.train
    from training.tasks import LMTask

    with tempfile.TemporaryDirectory() as tmp:
        write_items(Path(tmp) / "arith.npz", encode_items(
            tok, arithmetic_items(60_000, seed=7), t.seq_len + 1,
            tool=None if args.train_tool_outputs else Calculator(tok)))
        task = LMTask(name="arith", out_dir="model", model_cfg=mcfg, train_paths=[str(corpus.tokens_path("math", "train"))],
                      val_paths=[str(corpus.tokens_path("math", "val"))], batch_size=t.batch_size, seq_len=t.seq_len,
                      init_from=str(expert), instruct_paths=(str(Path(tmp) / "arith.npz"),), instruct_from=0,
                      instruct_batches=args.steps)
        loop = LoopConfig(max_steps=args.steps, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                          optimizer=t.optimizer, muon_lr=t.muon_lr, schedule=t.schedule, decay_fraction=t.decay_fraction,
                          eval_every=0, ckpt_every=0, progress=False, num_threads=args.threads)
        t0 = time.perf_counter()
        train(task, loop, tmp)
        model = load_lm(Path(tmp) / "model")[0].eval()
    items = arithmetic_eval_items(args.items)
    outs = [tok.decode(o) for o in answer(model, tok, items, 24, tool=Calculator(tok))]
    by: dict[str, list[bool]] = {}
    for it, o in zip(items, outs):
        by.setdefault(it["family"], []).append(is_correct(o, it["answer"]))
        # the calculator's call is right when the model copied the question's expression
        by.setdefault("call copied", []).append(o.split(" =")[0].strip() == expression_in(it["messages"][0]["content"]))
    res = {"run_dir": str(args.run_dir), "init": str(expert), "tool_outputs_trained": args.train_tool_outputs,
           "steps": args.steps, "tokens": args.steps * t.tokens_per_step,
           "train_s": round(time.perf_counter() - t0), "exact_match": {k: sum(v) / len(v) for k, v in sorted(by.items())},
           "n": {k: len(v) for k, v in sorted(by.items())},
           "examples": [[it["messages"][0]["content"], it["answer"], o] for it, o in list(zip(items, outs))[:6]],
           "wrong": [[it["messages"][0]["content"], it["answer"], o] for it, o in zip(items, outs)
                     if not is_correct(o, it["answer"])][:6]}
    print(json.dumps(res))
    if args.out:
        atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
