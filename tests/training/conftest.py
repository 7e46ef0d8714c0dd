"""Fixtures for the training tests: synthetic packed splits; the router tests' tokenizer and trained router."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.router.conftest import router_data, tokenizer, trained_router_dir  # noqa: F401 - shared fixtures

VOCAB = 64


def write_packed(path: Path, tokens: np.ndarray) -> Path:
    """A ``.bin``/``.json`` pair in the format of ``training.data.packing``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = tokens.astype(np.uint16)
    path.with_suffix(".bin").write_bytes(arr.tobytes())
    path.with_suffix(".json").write_text(json.dumps(
        {"dtype": "uint16", "n_tokens": int(arr.size), "n_docs": 1, "n_chars": int(arr.size), "vocab_size": VOCAB}))
    return path


def domain_tokens(d: int, n: int, seed: int) -> np.ndarray:
    """A learnable stream: domain ``d`` cycles through its own arithmetic progression mod VOCAB."""
    rng = np.random.default_rng(seed)
    step = d + 1
    starts = rng.integers(0, VOCAB, size=n // 16 + 1)
    return np.concatenate([(s + step * np.arange(16)) % VOCAB for s in starts])[:n]


@pytest.fixture(scope="session")
def synth_splits(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{domain: {split: path}} for two synthetic domains."""
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for d, name in enumerate(("math", "code")):
        out[name] = {split: write_packed(root / name / split, domain_tokens(d, 4000, seed=d * 10 + i))
                     for i, split in enumerate(("train", "val", "test"))}
    return out


def tiny_cfg(ffn: str = "dense"):
    from experts.config import ModelConfig
    return ModelConfig.preset("tiny-moe" if ffn == "moe" else "tiny", vocab_size=VOCAB, max_seq_len=32)


def lm_task(splits, name: str, out_dir: str, ffn: str = "dense", seed: int = 0):
    from training.tasks import LMTask
    return LMTask(name=name, out_dir=out_dir, model_cfg=tiny_cfg(ffn),
                  train_paths=[splits[name]["train"]], val_paths=[splits[name]["val"]],
                  batch_size=4, seq_len=32, seed=seed, eval_batches=2)


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance for the whole session (2 CPUs: the machine's budget)."""
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
