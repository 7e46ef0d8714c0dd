"""QK-norm (``ModelConfig.qk_norm``): every decode path matches the full forward (the KV-cache
decode test of ``test_model.py`` runs with and without it)."""

from __future__ import annotations

import copy

import pytest
import torch

from experts.checkpoint import load_lm, save_lm
from experts.config import ModelConfig
from experts.generate import generate
from experts.model import Transformer
from experts.quant import prepare_decode
from experts.sampling import SamplingParams


def _model(preset: str = "tiny") -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, qk_norm=True)).eval()
    with torch.no_grad():  # non-trivial q/k norm weights, so skipping them in a path would show
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def test_qk_norm_adds_per_head_norms_and_changes_the_function():
    model = _model()
    assert model.layers[0].attention.q_norm.weight.shape == (model.cfg.head_dim,)
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())
    plain = ModelConfig.preset("tiny")
    assert not plain.qk_norm and Transformer(plain).layers[0].attention.q_norm is None


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_qk_norm_generate_cached_equals_uncached_after_prepare_decode(weights):
    model = _model()
    try:
        served = prepare_decode(copy.deepcopy(model), weights)
    except (RuntimeError, ValueError) as e:  # int8 kernels may be unavailable on this CPU
        pytest.skip(str(e))
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    with torch.inference_mode():
        cached = list(generate(served, prompts, params))
        uncached = list(generate(served, prompts, params, use_cache=False))
    assert cached == uncached and len(cached) == 12
    if weights == "fp32":
        with torch.inference_mode():
            assert cached == list(generate(model, prompts, params))


def test_qk_norm_checkpoint_round_trip(tmp_path):
    model = _model()
    save_lm(tmp_path / "ckpt", model, model.cfg)
    loaded, cfg, _ = load_lm(tmp_path / "ckpt")
    assert cfg.qk_norm
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
