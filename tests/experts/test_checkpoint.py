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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask):
    """Not a temporary file's owner-only 0600/0700: other users and services read checkpoints."""
    import os
    import stat

    from experts.atomic import atomic_dir, atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        with atomic_dir(tmp_path / "ckpt") as d:
            (d / "meta.json").write_text("{}")
        cfg = ModelConfig.preset("tiny")
        save_lm(tmp_path / "lm", Transformer(cfg), cfg)
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "report.md") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "plain") == 0o777 & ~umask
    assert {mode(f) for f in (tmp_path / "lm").iterdir() if f.is_file()} == {0o666 & ~umask}
    assert mode(tmp_path / "lm") == 0o777 & ~umask
