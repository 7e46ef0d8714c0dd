"""Decode throughput: KV cache vs full re-forward, batch 1 and 8, HF ``LlamaForCausalLM.generate``,
fp32 weights stored transposed (what serving decodes with) and int8 decode weights
(``experts.quant``) with their cost in perplexity on a trained run."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import setup
from experts.config import ModelConfig
from experts.generate import generate
from experts.model import Transformer
from experts.quant import quantize_int8, transpose_linears
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
    """Tokens/s of our engine (cache, and optionally no-cache; fp32 and int8 decode weights) at
    each batch size, and HF at batch 1."""
    tps: dict[str, Any] = {}
    q = quantize_int8(copy.deepcopy(model))
    t = transpose_linears(copy.deepcopy(model))
    for batch in batches:
        for use_cache in (True, False) if no_cache else (True,):
            key = f"batch{batch}_{'cache' if use_cache else 'no_cache'}"
            tps[key] = round(ours_tokens_per_s(model, batch, use_cache), 1)
            log.info("threads=%d %s: %.1f tok/s", torch.get_num_threads(), key, tps[key])
        for key, m in ((f"batch{batch}_cache_fp32_transposed", t), (f"batch{batch}_cache_int8", q)):
            tps[key] = round(ours_tokens_per_s(m, batch, True), 1)
            log.info("threads=%d %s: %.1f tok/s", torch.get_num_threads(), key, tps[key])
    hf = hf_tokens_per_s(cfg)
    tps["hf_llama_batch1_cache"] = None if hf is None else round(hf, 1)
    log.info("threads=%d HF batch 1: %s tok/s", torch.get_num_threads(), tps["hf_llama_batch1_cache"])
    return tps


def int8_quality(run: Path, experts: tuple[str, ...] = ("math", "code"), docs: int = 40,
                 gen_prompts: int = 16, gen_tokens: int = 32) -> dict[str, Any] | None:
    """What int8 decode weights cost on trained experts: test perplexity and greedy agreement."""
    from experts.checkpoint import load_lm
    from experts.tokenizer import Tokenizer
    from training.data.build import CorpusSet, cache_root

    meta = run / "run.yaml"
    if not meta.is_file():
        log.warning("no trained run at %s: skipping the int8 quality figures", run)
        return None
    import yaml

    size = yaml.safe_load(meta.read_text())["data"]["size"]
    corpus = CorpusSet(cache_root() / size, size, tuple(experts))
    out: dict[str, Any] = {"run": str(run)}
    for name in experts:
        model, cfg, _ = load_lm(run / "experts" / name)
        q = quantize_int8(copy.deepcopy(model))
        tok = Tokenizer.load(run / "experts" / name / "tokenizer.json")
        texts = [r["text"] for r in corpus.docs(name, "test")[:docs]]
        seqs = [[tok.bos_id, *tok.encode(t)][:cfg.max_seq_len] for t in texts]
        nll = {"fp32": 0.0, "int8": 0.0}
        n = 0
        with torch.inference_mode():
            for ids in seqs:
                x = torch.tensor([ids])
                for key, m in (("fp32", model), ("int8", q)):
                    lp = torch.log_softmax(m(x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])
                    nll[key] -= float(lp.sum())
                n += len(ids) - 1
        prompts = [ids[:16] for ids in seqs[:gen_prompts]]
        params = SamplingParams(temperature=0, max_new_tokens=gen_tokens)
        a = [t for step in generate(model, prompts, params) for t in step]
        b = [t for step in generate(q, prompts, params) for t in step]
        same = sum(x == y for x, y in zip(a, b)) / max(len(a), 1)
        ppl = {k: math.exp(v / n) for k, v in nll.items()}
        out[name] = {"tokens": n, "ppl_fp32": round(ppl["fp32"], 4), "ppl_int8": round(ppl["int8"], 4),
                     "ppl_ratio": round(ppl["int8"] / ppl["fp32"], 4), "greedy_same_token_share": round(same, 3)}
        log.info("int8 quality %s: %s", name, out[name])
    return out


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
            "int8_cache_vs_hf_batch1": None if hf is None else round(tps["batch1_cache_int8"] / hf, 2),
            "int8_vs_fp32_batch1": round(tps["batch1_cache_int8"] / tps["batch1_cache"], 2),
            "int8_vs_fp32_batch8": round(tps["batch8_cache_int8"] / tps["batch8_cache"], 2),
            "transposed_vs_fp32_batch1": round(tps["batch1_cache_fp32_transposed"] / tps["batch1_cache"], 2),
            "transposed_vs_fp32_batch8": round(tps["batch8_cache_fp32_transposed"] / tps["batch8_cache"], 2),
            "cache_vs_no_cache_batch1": round(tps["batch1_cache"] / tps["batch1_no_cache"], 2),
            "cache_vs_no_cache_batch8": round(tps["batch8_cache"] / tps["batch8_no_cache"], 2),
        },
        "goals": "cache >= 2x HF at batch 1; cache >= 5x no-cache at 128 new tokens",
        "int8_quality": int8_quality(Path(os.environ.get("HMOE_BENCH_RUN", "runs/quick"))),
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
