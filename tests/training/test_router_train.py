"""training.router_train: the router's training data (balanced, shuffled, resumable batches)."""

from __future__ import annotations

import torch

from training.router_train import ShuffledBatches, balance


def test_batches_resume_exactly():
    examples = [([i, i + 1, i + 2, i + 3, i + 4, i + 5], i % 5) for i in range(1, 40)]
    a = ShuffledBatches(examples, batch_size=8, max_len=16, seed=3, crop_prob=0.5)
    for _ in range(7):
        next(a)
    b = ShuffledBatches(examples, batch_size=8, max_len=16, seed=3, crop_prob=0.5)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        for x, y in zip(next(a), next(b)):
            assert torch.equal(x, y)


def test_balance_repeats_rare_domains():
    examples = [([1], 0)] * 100 + [([2], 4)] * 7
    out = balance(examples, 0.5)
    assert sum(1 for _, y in out if y == 0) == 100 and sum(1 for _, y in out if y == 4) == 56
    assert balance(examples, 0.0) == examples
