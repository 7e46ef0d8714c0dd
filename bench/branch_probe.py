"""Retrain one run's branch (math by default) from its seed with changed settings, and score it.

Copies ``SRC_RUN``'s seed and instruction items into ``runs/NAME``, plans the run of ``PRESET`` with
the JSON ``OVERRIDES`` (``training.pipeline.plan_jobs``) and trains only the expert of ``--domain``.
Every branch gets its validation loss, its perplexity on the report's test documents of its domain
(after the routing prefix, as the report scores them) and its bits per byte on the domain's
evaluation-only natural text, next to every expert of ``SRC_RUN`` on the same documents
(``--natural D ...`` adds other domains' natural sets, as ``natural_bpb_other``). The math branch
is also asked 300 held-out 2-digit and 300 3-digit + - x items in the plain phrasings,
greedy, with the calculator, and the held-out items of the math corpus's expression families
(``basic_arithmetic``, ``chain_sum``, ``products``: 30 each, as the report asks them). An override
of ``train.expr_share`` (the share of expressions in the arithmetic curriculum) writes the math
instruction items anew instead of copying them. Appends one JSON line to ``--out``. With
``--score-only`` nothing trains: ``SRC_RUN``'s own expert is scored.

    python -m bench.branch_probe runs/quick quick qp-replay02 '{"train.instruct_replay": 0.2}' \\
        --out docs/results/branch_probe_quick.jsonl
    python -m bench.branch_probe runs/std16 standard rs-replay '{"train.branch_replay": 0.2}' \\
        --domain reasoning --out docs/results/branch_probe_reasoning.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from experts.calculator import tool_for
from experts.checkpoint import load_lm
from router.domains import DOMAINS
from training.data import load_corpora
from training.data.instruct import PLAIN_PHRASINGS, arithmetic_items, task_items
from training.loop import train
from training.pipeline import INSTRUCT_DIR, plan_jobs, write_instruct_items
from training.report import MAX_DOC_TOKENS, natural_texts
from training.run_config import load_run_config
from training.scoring import build_context
from training.task_scores import answer, domain_scores, is_correct


TEST_DOCS = 400  # the first documents of the domain's test split (a fixed set, in the corpus's order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the run whose seed and instruction items are reused")
    ap.add_argument("preset", help="the run config (a preset name or YAML file)")
    ap.add_argument("name", help="the probe's run directory, runs/NAME")
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON config overrides")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file the result line is appended to")
    ap.add_argument("--domain", default="math", choices=DOMAINS, help="the branch to retrain (default: math)")
    ap.add_argument("--score-only", action="store_true", help="score SRC's expert; train nothing")
    ap.add_argument("--natural", nargs="*", default=[], choices=DOMAINS, metavar="DOMAIN",
                    help="other domains whose natural-text sets are scored too")
    args = ap.parse_args()
    src, preset, name, ov, domain = args.src, args.preset, args.name, json.loads(args.overrides), args.domain
    if args.score_only:
        cfg = load_run_config(str(src / "run.yaml"))
        corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
        return _append(args.out, {"name": name, "run": str(src), "domain": domain,
                                  **branch_scores(src / "experts" / domain, domain, corpus, src, args.natural)})
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
    job = {j.task.name: j for j in plan_jobs(cfg, corpus, tok.vocab_size, run)}[domain]
    t0 = time.perf_counter()
    train(job.task, job.loop.model_copy(update={"num_threads": 1, "progress": False}), run)
    _append(args.out, {"name": name, "domain": domain, "overrides": ov, "expr_share": cfg.train.expr_share,
                       "train_s": round(time.perf_counter() - t0), "instruct_batches": job.task.instruct_batches,
                       **branch_scores(run / "experts" / domain, domain, corpus, src, args.natural)})


def _append(out: Path, res: dict) -> None:
    print(json.dumps(res), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")


def branch_scores(expert_dir: Path, domain: str, corpus, src: Path, other_natural: list[str] = ()) -> dict:
    """The branch's validation loss (nats/token), test perplexity and natural-text bits per byte on
    its domain (and on the ``other_natural`` domains' sets), those of ``src``'s experts on the same
    documents, and (math) the arithmetic scores."""
    result = json.loads((expert_dir / "train_result.json").read_text())
    res: dict = {"val": result.get("best_val_loss"), "last_val": result.get("last_val_loss")}
    branch, _, meta = load_lm(expert_dir)
    models = {"branch": branch.eval(),
              **{f"{src.name}/{d}": load_lm(src / "experts" / d)[0].eval() for d in DOMAINS
                 if (src / "experts" / d / "train_result.json").is_file()}}
    dev = next(iter(models.values())).tok_embeddings.weight.device
    test = build_context(src, corpus, models, None, MAX_DOC_TOKENS, dev,
                         texts={domain: [r["text"] for r in corpus.docs(domain, "test")][:TEST_DOCS]})
    res["test_ppl"] = {n: round(test.score(n)[domain].ppl, 3) for n in models}
    natural = natural_texts()
    sets = {d: natural[d] for d in (domain, *other_natural) if d in natural}
    if sets:
        ctx = build_context(src, corpus, models, None, MAX_DOC_TOKENS, dev, texts=sets, name="natural")
        cells = {n: ctx.score(n) for n in models}
        bpb = {d: {n: round(cells[n][d].bpb, 4) for n in models} for d in sets}
        if domain in bpb:
            res["natural_bpb"] = bpb.pop(domain)
        if bpb:
            res["natural_bpb_other"] = bpb
    if domain == "math":
        res.update(arithmetic_scores(expert_dir, corpus))
    else:  # the report's task scores (its 30 items per family, 48 new tokens, 96 for code)
        tok = corpus.tokenizer()
        scores = domain_scores(branch, tok, domain, task_items(corpus, domain, 30), 48, tool_for(meta, tok))
        res["tasks"] = {k: v for k, v in scores.items() if k != "examples"}
    return res


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
    return res


if __name__ == "__main__":
    main()
