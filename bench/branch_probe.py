"""Retrain one run's math branch from its seed with changed settings; score held-out arithmetic.

Copies ``SRC_RUN``'s seed and instruction items into ``runs/NAME``, plans the run of ``PRESET`` with
the JSON ``OVERRIDES`` (``training.pipeline.plan_jobs``), trains only its math expert, and asks
300 held-out 2-digit and 300 3-digit + - x items in the plain phrasings, greedy, with the
calculator, and the held-out items of the math corpus's expression families (``basic_arithmetic``,
``chain_sum``, ``products``: 30 each, as the report asks them). An override of ``train.expr_share``
(the share of expressions in the arithmetic curriculum) writes the math instruction items anew
instead of copying them. Appends one JSON line to ``--out``. With ``--score-only`` nothing trains:
``SRC_RUN``'s own math expert is asked the same items.

    python -m bench.branch_probe runs/quick quick qp-replay02 '{"train.instruct_replay": 0.2}' \\
        --out docs/results/branch_probe_quick.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from experts.calculator import tool_for
from experts.checkpoint import load_lm
from training.data import load_corpora
from training.data.instruct import PLAIN_PHRASINGS, arithmetic_items, task_items
from training.loop import train
from training.pipeline import INSTRUCT_DIR, plan_jobs, write_instruct_items
from training.run_config import load_run_config
from training.task_scores import answer, is_correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the run whose seed and instruction items are reused")
    ap.add_argument("preset", help="the run config (a preset name or YAML file)")
    ap.add_argument("name", help="the probe's run directory, runs/NAME")
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON config overrides")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file the result line is appended to")
    ap.add_argument("--score-only", action="store_true", help="score SRC's math expert; train nothing")
    args = ap.parse_args()
    src, preset, name, ov = args.src, args.preset, args.name, json.loads(args.overrides)
    if args.score_only:
        cfg = load_run_config(str(src / "run.yaml"))
        corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
        return _append(args.out, {"name": name, "run": str(src),
                                  **arithmetic_scores(src / "experts" / "math", corpus)})
    run = Path("runs") / name
    run.mkdir(parents=True, exist_ok=True)
    for d in ("seed", "instruct"):
        if not (run / d).exists():
            shutil.copytree(src / d, run / d)
    cfg = load_run_config(preset, ov)
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    if "train.expr_share" in ov:  # the math items anew, with that share of expressions
        (run / INSTRUCT_DIR / "math.npz").unlink(missing_ok=True)
        write_instruct_items(cfg.model_copy(update={"experts": ("math",)}), corpus, run)
    tok = corpus.tokenizer()
    job = {j.task.name: j for j in plan_jobs(cfg, corpus, tok.vocab_size, run)}["math"]
    t0 = time.perf_counter()
    train(job.task, job.loop.model_copy(update={"num_threads": 1, "progress": False}), run)
    _append(args.out, {"name": name, "overrides": ov, "expr_share": cfg.train.expr_share,
                       "train_s": round(time.perf_counter() - t0), "instruct_batches": job.task.instruct_batches,
                       **arithmetic_scores(run / "experts" / "math", corpus)})


def _append(out: Path, res: dict) -> None:
    print(json.dumps(res), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


def arithmetic_scores(expert_dir: Path, corpus) -> dict:
    """The math expert in ``expert_dir`` on the held-out arithmetic items, and its validation loss."""
    tok = corpus.tokenizer()
    m, _, meta = load_lm(expert_dir)
    res: dict = {}
    for digits in [(2,), (3,)]:
        its = arithmetic_items(300, 777, split="test", digits=digits, phrasings=PLAIN_PHRASINGS)
        outs = answer(m, tok, its, 24, tool=tool_for(meta, tok))
        by = {}
        for i, o in zip(its, outs):
            by.setdefault(i["family"], []).append(is_correct(tok.decode(o), i["answer"]))
        res[f"{digits[0]}-digit"] = {k: round(sum(v) / len(v), 3) for k, v in sorted(by.items())}
    families = ("basic_arithmetic", "chain_sum", "products")
    its = [it for it in task_items(corpus, "math", 30) if it["family"] in families]
    outs = answer(m, tok, its, 48, tool=tool_for(meta, tok))
    for fam in families:
        ok = [is_correct(tok.decode(o), i["answer"]) for i, o in zip(its, outs) if i["family"] == fam]
        res[fam] = round(sum(ok) / len(ok), 3)
    result = json.loads((expert_dir / "train_result.json").read_text())
    res["val"], res["last_val"] = result.get("best_val_loss"), result.get("last_val_loss")  # nats/token, math val
    return res


if __name__ == "__main__":
    main()
