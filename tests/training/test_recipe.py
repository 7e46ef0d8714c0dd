"""The speedrun-style recipe: Muon + AdamW in one optimizer, the WSD schedule, their config."""

from __future__ import annotations

import pytest
import torch

from training import optim
from training.loop import LoopConfig, read_metrics, train
from training.optim import MuonAdamW, lr_at, newton_schulz

from .conftest import lm_task, tiny_cfg


def _cfg(**kw) -> LoopConfig:
    base = dict(max_steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=4, eval_batches=2,
                ckpt_every=4, log_every=4, seed=3, device="cpu", num_threads=1, progress=False,
                optimizer="muon", muon_lr=0.05, schedule="wsd", decay_fraction=0.3)
    return LoopConfig(**{**base, **kw})


def test_muon_learns(synth_splits, tmp_path):
    train(lm_task(synth_splits, "math", "experts/math"), _cfg(max_steps=30, eval_every=10), tmp_path)
    recs = [r for r in read_metrics(tmp_path / "metrics" / "math.jsonl") if r.get("kind") == "train"]
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5


def test_muon_groups_hold_hidden_matrices_only():
    from experts.model import Transformer

    model = Transformer(tiny_cfg("moe").replace(qk_norm=True))
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                                device=torch.device("cpu"), optimizer="muon", muon_lr=0.02)
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert all(n.endswith(("wqkv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight")) for n in muon)
    assert any(".experts.0.w1.weight" in n for n in muon) and any("shared_expert" in n for n in muon)
    assert "tok_embeddings.weight" in adam and any(n.endswith("gate.weight") for n in adam)
    assert any(n.endswith("q_norm.weight") for n in adam)
    assert len(muon) + len(adam) == len(names)
    optim.set_lr(opt, 1e-3)  # one schedule drives both kinds of groups
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 1e-3, 0.02])  # tied: no 2-D AdamW group


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_zero_non_ffn_lr_trains_the_ffns_alone(optimizer):
    """``non_ffn_lr_scale``: a branch that keeps its shared weights where the seed left them."""
    from experts.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_cfg("dense").replace(qk_norm=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optim.build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                                device=torch.device("cpu"), optimizer=optimizer, muon_lr=0.05,
                                non_ffn_lr_scale=0.0)
    optim.set_lr(opt, 1e-2)
    x = torch.randint(0, model.cfg.vocab_size, (2, 9))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (".feed_forward." in n), n
    scaled = optim.build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                                   device=torch.device("cpu"), optimizer="muon", muon_lr=0.05,
                                   non_ffn_lr_scale=0.25)
    optim.set_lr(scaled, 1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in scaled.param_groups:
        ffn = {".feed_forward." in names[id(p)] for p in g["params"]}
        assert len(ffn) == 1  # a group is all FFN or all shared
        full = 0.05 if g["use_muon"] else 1e-2
        assert g["lr"] == pytest.approx(full if ffn == {True} else 0.25 * full)


def test_the_routers_learning_rate_scales_on_its_own():
    """``gate_lr_scale``: a merged model's routers can learn faster than the weights they route."""
    from experts.model import Transformer

    model = Transformer(tiny_cfg("moe"))
    opt = optim.build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                                device=torch.device("cpu"), optimizer="muon", muon_lr=0.05, gate_lr_scale=3.0)
    optim.set_lr(opt, 1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    gates = [g for g in opt.param_groups if any(names[id(p)].endswith("gate.weight") for p in g["params"])]
    assert gates and all(names[id(p)].endswith("gate.weight") for g in gates for p in g["params"])
    assert all(g["lr"] == pytest.approx(3e-2) and not g["use_muon"] for g in gates)
    assert all(g["lr"] in (pytest.approx(1e-2), pytest.approx(0.05)) for g in opt.param_groups if g not in gates)


def test_newton_schulz_orthogonalises():
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, steps=5)
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.3  # near-orthogonal (the quintic's intended band)


def test_schedule_wsd_shape():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert all(lr_at(s, **kw) == 1.0 for s in range(10, 80))  # stable
    assert lr_at(80, **kw) < 1.0 and lr_at(99, **kw) == pytest.approx(0.1)  # linear decay to min_lr
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 120))
    assert lr_at(89, **kw) == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr_at(50, **{**kw, "decay_fraction": 0.0}) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(50, **{**kw, "schedule": "linear"})


def test_recipe_config_rejects_bad_values():
    for field, value in (("optimizer", "sgd"), ("schedule", "step"), ("muon_lr", 0.0),
                         ("decay_fraction", 1.5), ("muon_momentum", 1.0)):
        with pytest.raises(ValueError, match=field):
            LoopConfig(max_steps=1, **{field: value})


def test_train_spec_maps_recipe_to_loop_config():
    from training.pipeline import loop_config
    from training.run_config import RunConfigError, load_run_config

    cfg = load_run_config("tiny", {"train.optimizer": "muon", "train.muon_lr": 0.03,
                                   "train.schedule": "wsd", "train.decay_fraction": 0.4})
    loop = loop_config(cfg.train, steps=5, seed=0, device="cpu")
    assert (loop.optimizer, loop.muon_lr, loop.schedule, loop.decay_fraction) == ("muon", 0.03, "wsd", 0.4)
    for key, value in (("train.optimizer", "lion"), ("train.schedule", "step"),
                       ("train.decay_fraction", 2.0), ("train.muon_lr", -1.0)):
        with pytest.raises(RunConfigError, match=key.split(".")[1]):
            load_run_config("tiny", {key: value})
