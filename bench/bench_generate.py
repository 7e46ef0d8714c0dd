"""Decode throughput: KV cache vs full re-forward, batch 1 and 8, and HF ``LlamaForCausalLM.generate``."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from bench.common import setup
from experts.config import ModelConfig
from experts.generate import generate
from experts.model import Transformer
from experts.sampling import SamplingParams

log = logging.getLogger(__name__)

NEW_TOKENS, PROMPT_LEN, REPEATS = 128, 16, 3


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def ours_tokens_per_s(model: Transformer, batch: int, use_cache: bool) -> float:
    """New tokens per second over the whole request (prefill included), median of timed runs.

    The no-cache path is quadratic and slow, so it gets a short warm-up and a single timed run.
    """
    prompts = [[(7 * i + j) % model.cfg.vocab_size for j in range(PROMPT_LEN)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    warm = params if use_cache else SamplingParams(temperature=0, max_new_tokens=4)
    list(generate(model, prompts, warm, use_cache=use_cache))  # warm-up
    times = []
    for _ in range(REPEATS if use_cache else 1):
        t0 = time.perf_counter()
        steps = list(generate(model, prompts, params, use_cache=use_cache))
        times.append(time.perf_counter() - t0)
        assert len(steps) == NEW_TOKENS
    return batch * NEW_TOKENS / _median(times)


def hf_tokens_per_s(cfg: ModelConfig) -> float | None:
    """HF LlamaForCausalLM of the same shape (random init, nothing downloaded), greedy, batch 1."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        log.warning("transformers not installed: skipping the HF comparison")
        return None
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True)
    model = LlamaForCausalLM(hf_cfg).eval()
    x = torch.arange(PROMPT_LEN)[None] % cfg.vocab_size
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(x, **kw)  # warm-up
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            out = model.generate(x, **kw)
            times.append(time.perf_counter() - t0)
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    return NEW_TOKENS / _median(times)


def measure(model: Transformer, cfg: ModelConfig, *, batches: tuple[int, ...], no_cache: bool) -> dict[str, Any]:
    """Tokens/s of our engine (cache, and optionally no-cache) at each batch size, and HF at batch 1."""
    tps: dict[str, Any] = {}
    for batch in batches:
        for use_cache in (True, False) if no_cache else (True,):
            key = f"batch{batch}_{'cache' if use_cache else 'no_cache'}"
            tps[key] = round(ours_tokens_per_s(model, batch, use_cache), 1)
            log.info("threads=%d %s: %.1f tok/s", torch.get_num_threads(), key, tps[key])
    hf = hf_tokens_per_s(cfg)
    tps["hf_llama_batch1_cache"] = None if hf is None else round(hf, 1)
    log.info("threads=%d HF batch 1: %s tok/s", torch.get_num_threads(), tps["hf_llama_batch1_cache"])
    return tps


def main() -> dict[str, Any]:
    env = setup()
    cfg = ModelConfig.preset("small", vocab_size=8192)
    model = Transformer(cfg).eval()
    tps = measure(model, cfg, batches=(1, 8), no_cache=True)
    hf = tps["hf_llama_batch1_cache"]
    res: dict[str, Any] = {
        "env": env, "new_tokens": NEW_TOKENS, "prompt_len": PROMPT_LEN, "greedy": True,
        "shape": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "vocab": cfg.vocab_size},
        "tokens_per_s": tps,
        "ratios": {
            "cache_vs_hf_batch1": None if hf is None else round(tps["batch1_cache"] / hf, 2),
            "cache_vs_no_cache_batch1": round(tps["batch1_cache"] / tps["batch1_no_cache"], 2),
            "cache_vs_no_cache_batch8": round(tps["batch8_cache"] / tps["batch8_no_cache"], 2),
        },
        "goals": "cache >= 2x HF at batch 1; cache >= 5x no-cache at 128 new tokens",
    }
    # batch-1 decoding is latency-bound: also record it on one thread (on a busy machine the
    # second thread's synchronisation can cost more than it gains)
    setup(threads=1)
    one = measure(model, cfg, batches=(1,), no_cache=False)
    res["one_thread"] = {**one, "cache_vs_hf_batch1": None if one["hf_llama_batch1_cache"] is None
                         else round(one["batch1_cache"] / one["hf_llama_batch1_cache"], 2)}
    setup()
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(main())
