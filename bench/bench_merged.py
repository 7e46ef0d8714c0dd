"""Serving the merged model (Branch-Train-MiX) against the routed experts: tokens/s at 1 and 8 clients.

One app serves both: the five domain experts behind the router (``model: "auto"``: a prompt is
routed, then one expert process decodes it, or a per-step mixture of two in ensemble mode) and the
merged MoE (``model: "merged"``: one process, one forward per token). Every client cycles through
one prompt per domain (``bench_serving.MIXED``), so the routed side spreads its load over the
experts as real traffic would. The two sides are measured alternately at each level (routed,
merged, merged, routed), so host noise falls on both.

Uses ``HMOE_BENCH_RUN`` (default ``runs/standard``) when it holds a merged model, else tiny
random-weight checkpoints with a merged one. ``python -m bench.run_all bench_merged`` writes
``bench/results/bench_merged.json``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_serving import MIXED, _load

TOKENS = 32
LEVELS = ((1, 10), (8, 4))  # (clients, requests per client per round)


def _run_dir() -> tuple[Path, str]:
    run = Path(os.environ.get("HMOE_BENCH_RUN", "runs/standard"))
    if (run / "merged" / "meta.json").is_file() and (run / "router" / "meta.json").is_file():
        return run, "trained"
    from serving.testing import make_tiny_run

    return make_tiny_run(Path(tempfile.mkdtemp(prefix="hmoe-bench-")), merged=True), "tiny-random"


def _bodies(model: str) -> list[dict[str, Any]]:
    return [{"model": model, "prompt": p, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
            for p in MIXED.values()]


def _level(url: str, clients: int, per: int) -> dict[str, Any]:
    runs: dict[str, list[dict]] = {"routed": [], "merged": []}
    for side in ("routed", "merged", "merged", "routed"):
        model = "auto" if side == "routed" else "merged"
        runs[side].append(asyncio.run(_load(url, _bodies(model), clients, per, repeats=2)))
    out = {}
    for side, got in runs.items():
        out[side] = {"tokens_per_s": round(statistics.median(g["tokens_per_s"] for g in got), 1),
                     "p50_ms": round(statistics.median(g["p50_ms"] for g in got), 1),
                     "rounds_tokens_per_s": [r for g in got for r in g["rounds_tokens_per_s"]],
                     "experts": [g["experts"] for g in got]}
    out["merged_over_routed"] = round(out["merged"]["tokens_per_s"] / max(out["routed"]["tokens_per_s"], 1e-9), 3)
    return out


def main() -> dict[str, Any]:
    import ray
    from ray import serve

    from serving.cli import default_proxy, start
    from serving.config import AppArgs
    from serving.testing import free_port

    run, kind = _run_dir()
    args = AppArgs(run_dir=str(run), max_tokens_cap=256)
    if "merged" not in args.experts:
        raise SystemExit(f"{run} has no merged model to serve; train with --merge or run hmoe merge")
    url = start(args, port=free_port(), num_cpus=2, proxy=default_proxy())
    try:
        levels = {str(c): _level(url, c, per) for c, per in LEVELS}
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"run": str(run), "checkpoints": kind, "served": args.experts, "completion_tokens": TOKENS,
            "prompts": list(MIXED.values()), "levels": levels,
            "note": "2-core shared machine: proxy, ingress, router, every expert and the merged model, and "
                    "the load generator share the two cores"}


if __name__ == "__main__":
    from bench.run_all import main as run_all

    raise SystemExit(run_all(["bench_merged"]))
