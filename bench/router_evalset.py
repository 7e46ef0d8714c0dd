"""The router on the evaluation-only prompts (``training.data.eval_prompts``), measured as the report does.

    .venv/bin/python -m bench.router_evalset runs/standard --retrain-seeds 0 1 2 \\
        --decisions docs/results/router_dev_candidates_2026-12-04.json \\
        --out docs/results/router_evalset_retrained_2026-12-04.json

Writes the figures of ``<run>/router`` (``training.router_report.eval_prompt_summary`` and
``eval_prompt_figures``: group / expert accuracy, per domain and per half, the confusion, failure
examples) and, with ``--retrain-seeds``, those of routers retrained alone with the current router
training data on the run's corpus and settings (``training.pipeline.train_router_task`` on the CPU,
about 30 s a seed, no Ray). Each router also gets its accuracy on the in-distribution test prompts
(``prompt_accuracy``, as the report's router section) and on the hand-written probes, which a
change must not make worse. That is how a change to the router's training data is judged: on the
dev half; the test half is reported, never used to choose. ``--decisions`` embeds the dev-half
table of the candidate changes that were tried (kept or not) in the output.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import setup
from experts.atomic import atomic_write_json
from router.evaluate import evaluate_router
from router.probes import probe_examples
from router.router import Router, load_router
from training.data import CorpusSet, load_corpora, router_examples
from training.data.eval_prompts import HALVES, PER_DOMAIN, SEED
from training.router_report import eval_prompt_figures, eval_prompt_summary
from training.run_config import load_run_config

PROTOCOL = ("Prompts from third-party sources no training corpus reads (training.data.eval_prompts), split by key "
            "hash into a dev and a test half. The run's router was measured on the whole set before the split "
            "existed; its failures (by domain and source) motivated the prompt views of training.data.prompt_views "
            "(419cb84). Every later change (the router-only prompts of training.data.router_prompts and their shares, "
            "the caps fold of router.model.fold_caps, and the candidates that were rejected: see dev_decisions) was "
            "chosen on dev-half figures alone, as means over router seeds 0-2, together with the in-distribution test "
            "prompts and the hand-written probes. The test half of the retrained routers was computed once, for the "
            "final data, by the run that wrote this file; it was not used to choose anything.")


def _corpus(run_dir: Path) -> CorpusSet:
    cfg = load_run_config(str(run_dir / "run.yaml"))
    return load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())


def figures(router_dir: str | Path, corpus: CorpusSet | None = None) -> dict[str, Any]:
    """The report's figures for the router in ``router_dir``; with ``corpus``, also its accuracy on the
    corpus's test prompts (``prompt_accuracy``) and on the hand-written probes (both sets, and together)."""
    router = load_router(router_dir)
    out = eval_prompt_figures(eval_prompt_summary(router))
    if corpus is not None:
        out.update(in_distribution(router, corpus))
    return out


def in_distribution(router: Router, corpus: CorpusSet) -> dict[str, float]:
    """Expert accuracy on the test prompts (the report's ``prompt_accuracy``) and on ``router.probes``."""
    acc = {"prompt_accuracy": evaluate_router(router, router_examples(corpus, "test", per_domain=100_000,
                                                                      seed=0))["expert_accuracy"]}
    for key, examples in (("probe_accuracy", probe_examples(heldout=False)),
                          ("heldout_probe_accuracy", probe_examples(heldout=True)),
                          ("all_probe_accuracy", probe_examples(heldout=False) + probe_examples(heldout=True))):
        acc[key] = evaluate_router(router, examples)["expert_accuracy"]
    return acc


RETRAINED_KEYS = ("n", "group_accuracy", "expert_accuracy", "by_domain", "halves", "confusion", "failures",
                  "prompt_accuracy", "probe_accuracy", "heldout_probe_accuracy", "all_probe_accuracy")
MEAN_KEYS = ("prompt_accuracy", "probe_accuracy", "heldout_probe_accuracy", "all_probe_accuracy")


def retrained(run_dir: Path, seed: int) -> dict[str, Any]:
    """Retrain the run's router alone (same corpus and settings, current training data) and measure it."""
    from training.pipeline import train_router_task

    cfg = load_run_config(str(run_dir / "run.yaml"))
    corpus = _corpus(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        train_router_task(str(corpus.root), corpus.name, tmp, cfg.router.steps, cfg.router.per_domain, seed, "cpu")
        out = figures(Path(tmp) / "router", corpus)
    return {k: out[k] for k in RETRAINED_KEYS}


def _mean(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Averages over the retrained seeds: group / expert accuracy (and per domain) of each half, and the
    in-distribution and probe accuracies."""
    def avg(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    out: dict[str, Any] = {h: {k: avg([r["halves"][h][k] for r in runs]) for k in ("group_accuracy", "expert_accuracy")}
                           for h in HALVES}
    for h in HALVES:
        out[h]["by_domain"] = {d: avg([r["halves"][h]["by_domain"][d] for r in runs])
                               for d in runs[0]["halves"][h]["by_domain"]}
    out.update({k: avg([r[k] for r in runs]) for k in MEAN_KEYS})
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, write ``--out`` (if given) and return the figures."""
    ap = argparse.ArgumentParser(prog="python -m bench.router_evalset", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--retrain-seeds", type=int, nargs="*", default=[])
    ap.add_argument("--decisions", type=Path, help="a JSON file of the dev-half candidate table, embedded as is")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, Any] = {"env": setup(threads=1), "run": str(args.run_dir), "protocol": PROTOCOL,
                              "set": {"module": "training.data.eval_prompts", "per_domain": PER_DOMAIN, "seed": SEED},
                              "goal": {"group_accuracy": 0.9, "expert_accuracy": 0.8},
                              "router": figures(args.run_dir / "router", _corpus(args.run_dir))}
    if args.decisions:
        result["dev_decisions"] = json.loads(args.decisions.read_text())
    if args.retrain_seeds:
        runs = {s: retrained(args.run_dir, s) for s in args.retrain_seeds}
        result["retrained"] = {"seeds": runs, "mean": _mean(list(runs.values()))}
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2)[:4000])
