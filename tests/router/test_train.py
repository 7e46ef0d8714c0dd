"""Training with the shared loop, calibration, checkpoint round trip and Router behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from experts.checkpoint import CheckpointError, read_meta
from router import DEFAULT_EXPERT, load_router
from tests.router.fixtures import HELD_OUT


def test_held_out_prompt_of_each_domain_goes_to_its_expert(trained_router_dir):
    router = load_router(trained_router_dir[0])
    for domain, prompt in HELD_OUT.items():
        d = router.route(prompt)
        assert d.expert == domain, (domain, d.expert_probs)


def test_checkpoint_round_trip(trained_router_dir, tokenizer):
    path, result = trained_router_dir
    meta = read_meta(path, kind="router")
    calib = json.loads((path / "calibration.json").read_text())
    assert calib["temperature"] == pytest.approx(result.extra["temperature"])
    assert calib["val_nll"] <= calib["val_nll_t1"] + 1e-6  # calibration does not raise val NLL
    assert meta["config"]["vocab_size"] == tokenizer.vocab_size
    a = load_router(path)
    b = load_router(path, tokenizer=tokenizer)
    prompts = list(HELD_OUT.values())
    torch.testing.assert_close(a.probs(prompts)[1], b.probs(prompts)[1])
    assert a.temperature == pytest.approx(calib["temperature"])
    assert result.steps == 150 and result.best_val_loss < 0.5


def test_corrupt_checkpoint_is_refused(trained_router_dir, tmp_path):
    import shutil

    bad = tmp_path / "router"
    shutil.copytree(trained_router_dir[0], bad)
    (bad / "model.safetensors").write_bytes(b"oops")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_router(bad)


def test_route_batch_matches_route_and_empty_goes_to_default(trained_router_dir):
    router = load_router(trained_router_dir[0])
    prompts = ["", "   \n\t", *HELD_OUT.values()]
    batch = router.route_batch(prompts)
    assert [d.expert for d in batch[:2]] == [DEFAULT_EXPERT] * 2
    assert all(d.mode == "default" for d in batch[:2])
    for p, d in zip(prompts[2:], batch[2:]):
        single = router.route(p)
        assert single.experts == d.experts
        assert single.expert_probs == pytest.approx(d.expert_probs, abs=1e-5)


def test_router_package_does_not_import_training_serving_or_ray():
    code = ("import sys, router, router.likelihood, router.evaluate, router.calibration, router.model, router.policy; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'serving', 'ray')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_training_and_routing_encode_prompts_alike(trained_router_dir, tokenizer):
    from training.router_train import encode_examples

    router = load_router(trained_router_dir[0])
    assert router.cfg.fold_caps
    prompts = ["DO YOU PLAY SOCCER", "I PLAY Cricket", "what does HTTP mean", *HELD_OUT.values()]
    trained = encode_examples([(p, "conversation") for p in prompts], tokenizer, router.cfg)
    assert [ids for ids, _ in trained] == [router.encode(p) for p in prompts]
    assert router.encode("DO YOU PLAY SOCCER") == router.encode("do you play soccer")


def test_router_saved_before_fold_caps_reads_text_as_typed(trained_router_dir, tmp_path):
    import shutil

    old = tmp_path / "router"
    shutil.copytree(trained_router_dir[0], old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["config"]["fold_caps"]
    (old / "meta.json").write_text(json.dumps(meta))
    router = load_router(old)
    assert not router.cfg.fold_caps
    assert router.encode("DO YOU PLAY SOCCER") == router.tokenizer.encode("DO YOU PLAY SOCCER")
    new = load_router(trained_router_dir[0])
    torch.testing.assert_close(router.probs(["do you play soccer"])[1], new.probs(["do you play soccer"])[1])
