"""The router on the evaluation-only prompts (``training.data.eval_prompts``), measured as the report does.

    .venv/bin/python -m bench.router_evalset runs/standard --retrain-seeds 0 1 2 \\
        --out docs/results/router_evalset_standard_2026-12-04.json

Writes the figures of ``<run>/router`` (``training.router_report.eval_prompt_summary`` and
``eval_prompt_figures``: group / expert accuracy, per domain and per half, the confusion, failure
examples) and, with ``--retrain-seeds``, those of routers retrained alone with the current router
training data on the run's corpus and settings (``training.pipeline.train_router_task`` on the CPU,
a few minutes, no Ray). That is how a change to the router's training data is judged: on the dev
half; the test half is reported, never used to choose.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import setup
from experts.atomic import atomic_write_json
from router.router import load_router
from training.data import load_corpora
from training.data.eval_prompts import HALVES, PER_DOMAIN, SEED
from training.router_report import eval_prompt_figures, eval_prompt_summary
from training.run_config import load_run_config

PROTOCOL = ("Prompts from third-party sources no training corpus reads (training.data.eval_prompts), split by key "
            "hash into a dev and a test half. The run's router was measured on the whole set before the split "
            "existed; its failures (by domain and source) motivated the prompt views added to "
            "training.data.prompt_views (equations in one unknown for math, definition-first questions for "
            "knowledge, 'can you ...' requests for code), which were kept on their dev-half figures over three "
            "router seeds. The test half was not used to choose anything.")


def figures(router_dir: str | Path) -> dict[str, Any]:
    """The report's figures for the router in ``router_dir``."""
    return eval_prompt_figures(eval_prompt_summary(load_router(router_dir)))


def retrained(run_dir: Path, seed: int) -> dict[str, Any]:
    """Retrain the run's router alone (same corpus and settings, current training data) and measure it."""
    from training.pipeline import train_router_task

    cfg = load_run_config(str(run_dir / "run.yaml"))
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    with tempfile.TemporaryDirectory() as tmp:
        train_router_task(str(corpus.root), corpus.name, tmp, cfg.router.steps, cfg.router.per_domain, seed, "cpu")
        out = figures(Path(tmp) / "router")
    return {k: out[k] for k in ("n", "group_accuracy", "expert_accuracy", "by_domain", "halves", "confusion")}


def _mean(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Group / expert accuracy of each half, averaged over the retrained seeds."""
    return {h: {k: sum(r["halves"][h][k] for r in runs) / len(runs) for k in ("group_accuracy", "expert_accuracy")}
            for h in HALVES}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, write ``--out`` (if given) and return the figures."""
    ap = argparse.ArgumentParser(prog="python -m bench.router_evalset", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--retrain-seeds", type=int, nargs="*", default=[])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, Any] = {"env": setup(threads=1), "run": str(args.run_dir), "protocol": PROTOCOL,
                              "set": {"module": "training.data.eval_prompts", "per_domain": PER_DOMAIN, "seed": SEED},
                              "goal": {"group_accuracy": 0.9, "expert_accuracy": 0.8},
                              "router": figures(args.run_dir / "router")}
    if args.retrain_seeds:
        runs = {s: retrained(args.run_dir, s) for s in args.retrain_seeds}
        result["retrained"] = {"seeds": runs, "mean": _mean(list(runs.values()))}
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2)[:4000])
