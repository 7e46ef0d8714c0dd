"""Fixtures for router tests: a tiny tokenizer, tiny data and one trained tiny router (session-wide)."""

from __future__ import annotations

import pytest

from router.model import RouterConfig
from tests.router.fixtures import HELD_OUT, make_examples


@pytest.fixture(scope="session")
def router_data() -> dict[str, list[tuple[str, str]]]:
    return {"train": make_examples(160, seed=1), "val": make_examples(30, seed=2),
            "test": make_examples(30, seed=3)}


@pytest.fixture(scope="session")
def tokenizer(router_data):
    from experts.tokenizer import Tokenizer

    texts = [p for p, _ in router_data["train"]] + list(HELD_OUT.values())
    return Tokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope="session")
def trained_router_dir(tmp_path_factory, router_data, tokenizer):
    from training.router_train import RouterTrainConfig, train_router

    run_dir = tmp_path_factory.mktemp("router-run")
    cfg = RouterConfig.preset("tiny")
    tc = RouterTrainConfig(batch_size=32, max_steps=150, eval_every=50, seed=0)
    result = train_router(None, tokenizer, run_dir, cfg, train_cfg=tc,
                          examples={"train": router_data["train"], "val": router_data["val"]},
                          num_threads=1, device="cpu", progress=False)
    return run_dir / "router", result
