"""The one training loop: learning, exact resume, early stopping, failure injection."""

from __future__ import annotations

import pytest
import torch

from experts.checkpoint import load_tensors, read_meta
from training.loop import InjectedFailure, LoopConfig, read_metrics, train
from training.optim import lr_at

from .conftest import lm_task


def _cfg(**kw) -> LoopConfig:
    base = dict(max_steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=4, eval_batches=2,
                ckpt_every=4, log_every=4, seed=3, device="cpu", num_threads=1, progress=False)
    return LoopConfig(**{**base, **kw})


def test_loss_decreases(synth_splits, tmp_path):
    task = lm_task(synth_splits, "math", "experts/math")
    res = train(task, _cfg(max_steps=30, eval_every=10), tmp_path)
    recs = [r for r in read_metrics(tmp_path / "metrics" / "math.jsonl") if r.get("kind") == "train"]
    assert res.steps == 30 and len(recs) == 30
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    assert res.tokens == 30 * 4 * 32
    read_meta(tmp_path / "experts" / "math", kind="lm")
    read_meta(tmp_path / "experts" / "math" / "ckpt" / "latest", kind="resume")


MUON = dict(optimizer="muon", muon_lr=0.05, schedule="wsd", decay_fraction=0.3)
ADAMW = dict(optimizer="adamw", schedule="cosine")


@pytest.mark.parametrize("recipe", [ADAMW, MUON], ids=["adamw", "muon"])
@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_resume_is_bit_identical(synth_splits, tmp_path, ffn, recipe):
    a, b = tmp_path / "a", tmp_path / "b"
    train(lm_task(synth_splits, "math", "experts/math", ffn), _cfg(**recipe), a)
    with pytest.raises(InjectedFailure):
        train(lm_task(synth_splits, "math", "experts/math", ffn), _cfg(fail_at="math:6", **recipe), b)
    res = train(lm_task(synth_splits, "math", "experts/math", ffn), _cfg(fail_at="math:6", **recipe), b)
    assert res.resumed_from == 4
    wa, wb = load_tensors(a / "experts" / "math"), load_tensors(b / "experts" / "math")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps = [r["step"] for r in read_metrics(b / "metrics" / "math.jsonl") if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]  # steps 1-4 were not redone
    state = load_tensors(b / "experts" / "math" / "ckpt" / "latest", "optimizer.safetensors")
    assert any(k.endswith(".exp_avg_sq") for k in state)  # AdamW's moments (all of them, or Muon's rest)
    assert any(k.endswith(".momentum_buffer") for k in state) == (recipe is MUON)  # Muon's momentum


def test_early_stopping(synth_splits, tmp_path):
    res = train(lm_task(synth_splits, "code", "experts/code"),
                _cfg(max_steps=200, lr=1e-6, min_lr=1e-6, warmup_steps=0, eval_every=2,
                     patience=2, min_delta=10.0), tmp_path)
    assert res.stopped_early and res.steps == 6


def test_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 110))


def test_loop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_steps"):
        LoopConfig(max_steps=0)
    with pytest.raises(ValueError, match="min_lr"):
        LoopConfig(max_steps=1, lr=1e-3, min_lr=1e-2)


def test_fused_cross_entropy_matches_torch_in_value_and_gradient():
    import torch.nn.functional as F

    from training.tasks import lm_loss

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 7, 50, generator=g)).requires_grad_()
    y = torch.randint(0, 50, (4, 7), generator=g)
    ref = logits.detach().clone().requires_grad_()
    loss, expected = lm_loss(logits, y), F.cross_entropy(ref.view(-1, 50), y.view(-1))
    (2.5 * loss).backward()
    (2.5 * expected).backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(logits.grad, ref.grad, atol=1e-7)


def test_a_branch_starts_from_the_seeds_exact_weights(synth_splits, tmp_path):
    """Seed, then branch: the branch's model before its first step is the seed checkpoint, bit for bit."""
    import dataclasses

    from experts.checkpoint import CheckpointError

    train(lm_task(synth_splits, "math", "seed"), _cfg(max_steps=6), tmp_path)
    seed_weights = load_tensors(tmp_path / "seed")
    branch = dataclasses.replace(lm_task(synth_splits, "code", "experts/code", seed=7),
                                 init_from=str(tmp_path / "seed"))
    torch.manual_seed(123)  # the branch's own seed must not matter
    state = branch.build_model().state_dict()
    assert seed_weights.keys() <= state.keys()
    for k, v in seed_weights.items():
        assert torch.equal(state[k], v), k
    fresh = lm_task(synth_splits, "code", "experts/code").build_model().state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in seed_weights.items())  # the test can tell them apart
    res = train(branch, _cfg(max_steps=3), tmp_path)
    assert res.steps == 3 and read_meta(tmp_path / "experts" / "code", kind="lm")["init_from"] == "seed"
    other = dataclasses.replace(branch, model_cfg=branch.model_cfg.replace(n_layers=1))
    with pytest.raises(CheckpointError, match="config differs"):
        other.build_model()


@pytest.mark.parametrize("gate_scope", ["layer", "model"])
def test_a_merged_model_resumes_bit_identically(synth_splits, tmp_path, gate_scope):
    """The Branch-Train-MiX fine-tune (an LMTask that merges finished experts, with per-token
    embedding weights) resumes like any other run: the same weights as an uninterrupted one. With
    ``gate_scope="model"`` the run's router checkpoint is the merged model's router and stays frozen."""
    import dataclasses

    from experts.checkpoint import save_checkpoint, save_lm
    from experts.classifier import RouterConfig, RouterModel
    from experts.model import Transformer
    from training.merge import merged_config

    from .conftest import tiny_cfg

    n = 2 if gate_scope == "layer" else 5  # a model router chooses among the five domains
    experts = []
    for i in range(n):
        torch.manual_seed(i)
        experts.append(str(save_lm(tmp_path / "experts" / f"e{i}", Transformer(tiny_cfg()), tiny_cfg())))
    tokens = [str(synth_splits[("math", "code")[i % 2]]["train"]) for i in range(n)]
    mcfg = merged_config(tiny_cfg(), n, 1, **({} if gate_scope == "layer" else
                                              {"route": "full", "gate_context": "doc", "gate_scope": "model"}))
    router = None
    if gate_scope == "model":
        m = mcfg.moe
        rcfg = RouterConfig(vocab_size=mcfg.vocab_size, d_embed=m.router_embed, n_bigram_buckets=m.router_buckets,
                            hidden=m.router_hidden)
        torch.manual_seed(9)
        router = RouterModel(rcfg)
        save_checkpoint(tmp_path / "router", router.state_dict(), config=rcfg.to_dict(), kind="router")
    task = dataclasses.replace(
        lm_task(synth_splits, "math", "merged"), name="merged", model_cfg=mcfg, merge_from=tuple(experts),
        merge_tokens=tuple(tokens), merge_router=str(tmp_path / "router") if router is not None else None)
    a, b = tmp_path / "a", tmp_path / "b"
    train(task, _cfg(), a)
    with pytest.raises(InjectedFailure):
        train(task, _cfg(fail_at="merged:6"), b)
    res = train(task, _cfg(fail_at="merged:6"), b)
    assert res.resumed_from == 4
    wa, wb = load_tensors(a / "merged"), load_tensors(b / "merged")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any("feed_forward.experts.1" in k for k in wa)
    if router is not None:  # frozen through the fine-tune: the run's router as trained
        for k, v in router.state_dict().items():
            assert torch.equal(wa[f"router.classifier.{k}"], v), k
