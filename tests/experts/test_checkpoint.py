"""LM checkpoints: bit-exact round trip, and a truncated weights file is refused by name."""

from __future__ import annotations

import pytest
import torch

from experts.checkpoint import CheckpointError, load_lm, save_lm
from experts.config import ModelConfig
from experts.model import Transformer


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_save_load_round_trip_is_bit_exact(tmp_path, preset):
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset)
    model = Transformer(cfg).eval()
    save_lm(tmp_path / "ckpt", model, cfg)
    loaded, cfg2, meta = load_lm(tmp_path / "ckpt")
    assert cfg2 == cfg and meta["kind"] == "lm" and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.output.weight is loaded.tok_embeddings.weight  # still tied after loading
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_truncated_weights_raise_checkpoint_error_naming_the_file(tmp_path):
    cfg = ModelConfig.preset("tiny")
    save_lm(tmp_path / "ckpt", Transformer(cfg), cfg)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lm(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lm(tmp_path / "ckpt", verify=False)  # the safetensors reader names it too
