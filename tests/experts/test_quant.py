"""Decode weights: fp32 transposed equals nn.Linear; int8 stays close to fp32, the KV cache still
exact, the router untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from experts.config import ModelConfig
from experts.generate import Engine, generate
from experts.model import KVCache, Transformer
from experts.quant import Int8Linear, TransposedLinear, is_quantized, prepare_decode, quantize_int8
from experts.sampling import SamplingParams


def _pair(preset: str) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset)).eval()
    return model, quantize_int8(copy.deepcopy(model))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_int8_logits_stay_close_to_fp32(preset):
    model, q = _pair(preset)
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.inference_mode():
        ref, got = model(x).logits, q(x).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.03, rel  # quantised (not a no-op) and within 3%
    assert is_quantized(q) and not is_quantized(model)


def test_every_projection_is_int8_but_the_moe_router_and_embeddings():
    _, q = _pair("tiny-moe")
    linears = {n for n, m in q.named_modules() if isinstance(m, nn.Linear)}
    assert linears and all(n.endswith(".gate") for n in linears)
    int8 = {n for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    assert "output" in int8 and "layers.0.attention.wqkv" in int8 and "layers.0.feed_forward.experts.0.w1" in int8
    assert q.tok_embeddings.weight.dtype == torch.float32


def test_int8_kv_cache_decoding_equals_its_full_forward():
    _, q = _pair("tiny")
    ids = torch.randint(0, q.cfg.vocab_size, (1, 12))
    cache = KVCache(q.cfg, max_batch=1)
    with torch.inference_mode():
        full = q(ids).logits[0]
        cache.bind([0])
        steps = [q(ids[:, :5], cache=cache).logits[0]]
        for t in range(5, 12):
            steps.append(q(ids[:, t:t + 1], cache=cache).logits[0])
    # bf16 activations: the int8 kernel rounds per call, so compare at bf16 resolution
    torch.testing.assert_close(torch.cat(steps), full, atol=2e-2, rtol=1e-2)


def test_int8_engine_generates_deterministically_with_batching():
    _, q = _pair("tiny")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    batched = list(generate(q, prompts, params))
    assert batched == list(generate(q, prompts, params)) and len(batched) == 10
    engine = Engine(q, max_batch=2)
    slot = engine.add(prompts[1], params)
    solo = []
    while engine.has_work:
        solo.append(engine.step()[slot].token)
    assert solo == [row[1] for row in batched]


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_transposed_fp32_weights_give_the_same_logits_and_tokens(preset):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset)).eval()
    t = prepare_decode(copy.deepcopy(model), "fp32")
    swapped = {n for n, m in t.named_modules() if isinstance(m, TransposedLinear)}
    assert "output" in swapped and "layers.0.attention.wqkv" in swapped
    assert all(n.endswith(".gate") for n, m in t.named_modules() if isinstance(m, nn.Linear))
    with torch.inference_mode():  # a prefill shape and the decode shapes (batch 1 and 8, one token)
        for shape in ((3, 20), (1, 1), (8, 1)):
            x = torch.randint(0, model.cfg.vocab_size, shape)
            torch.testing.assert_close(t(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    assert list(generate(t, prompts, params)) == list(generate(model, prompts, params))
    assert not is_quantized(t)


def test_prepare_decode_names_the_choices():
    with pytest.raises(ValueError, match="use 'fp32' or 'int8'"):
        prepare_decode(Transformer(ModelConfig.preset("tiny")), "fp16")
