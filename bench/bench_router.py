"""Router latency on one CPU thread: a 256-token prompt, median over many calls (target < 5 ms).

Uses a trained router if one is given (``HMOE_ROUTER_DIR`` or ``runs/*/router``), else the default
``RouterConfig`` with random weights (latency does not depend on the weights).
Returns its figures; ``bench.run_all`` writes ``bench/results/bench_router.json``.
"""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path

import torch

from bench.common import run_times, setup
from router.model import RouterConfig, RouterModel
from router.router import Router, load_router

log = logging.getLogger(__name__)

PROMPT_TOKENS, CALLS, WARMUP, BATCH = 256, 300, 30, 64
TEXT = ("def parse(items):\n    return [x.strip() for x in items if x]\n"
        "What is 17 times 23? The capital of Norway is Oslo. hey, how are you doing today? ") * 20


class _WordTokenizer:
    """Fallback when no tokenizer file is around: one id per whitespace-separated word."""

    pad_id, vocab_size = 0, 8192

    def encode(self, text: str) -> list[int]:
        return [1 + hash(w) % (self.vocab_size - 1) for w in text.split()]


def _router() -> tuple[Router, str]:
    candidates = [os.environ.get("HMOE_ROUTER_DIR", "")] + sorted(str(p) for p in Path("runs").glob("*/router"))
    for path in filter(None, candidates):
        if (Path(path) / "meta.json").is_file():
            return load_router(path), path
    tok_file = Path(".hmoe/data/quick/tokenizer.json")
    if tok_file.is_file():
        from experts.tokenizer import Tokenizer

        tok = Tokenizer.load(tok_file)
    else:
        tok = _WordTokenizer()
    return Router(RouterModel(RouterConfig(vocab_size=tok.vocab_size)), tok), "random-init default config"


def _median_ms(fn, calls: int = CALLS, warmup: int = WARMUP) -> dict[str, float]:
    times = sorted(1e3 * t for t in run_times(fn, repeats=calls, warmup=warmup))
    return {"median_ms": round(statistics.median(times), 4), "p90_ms": round(times[int(0.9 * len(times))], 4),
            "calls": calls}


def main() -> dict:
    """Measure forward-only and end-to-end (tokenize + route) latency; write the JSON."""
    env = setup(threads=1)
    router, source = _router()
    ids = router.encode(TEXT)
    while len(ids) < PROMPT_TOKENS:
        ids = ids + ids
    ids = ids[:PROMPT_TOKENS]
    prompt = TEXT
    tokens = torch.tensor([ids])  # (1, 256)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.inference_mode():
        forward = _median_ms(lambda: router.model.probs(tokens, mask, temperature=router.temperature))
    route = _median_ms(lambda: router.route(prompt))
    batch = _median_ms(lambda: router.route_batch([prompt] * BATCH), calls=30, warmup=3)
    result = {
        "env": env, "router": source, "config": router.cfg.to_dict(),
        "params": sum(p.numel() for p in router.model.parameters()),
        "prompt_tokens": len(router.encode(prompt)),
        "forward_256_tokens": forward,
        "route_end_to_end": route,
        f"route_batch_{BATCH}": {**batch, "per_prompt_ms": round(batch["median_ms"] / BATCH, 4)},
        "target_ms": 5.0,
        "meets_target": route["median_ms"] < 5.0,
    }
    return result


if __name__ == "__main__":
    from bench.run_all import main as run_all

    raise SystemExit(run_all(["bench_router"]))
