"""Packed tokens and TokenBatches: document framing, bounds and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import TokenBatches, load_tokens


def test_packed_split_is_bos_doc_eos(tiny_corpus) -> None:
    tok = tiny_corpus.tokenizer()
    arr = load_tokens(tiny_corpus.tokens_path("math", "val"))
    docs = tiny_corpus.docs("math", "val")
    assert arr.dtype == np.uint16
    assert int((arr == tok.bos_id).sum()) == len(docs) == int((arr == tok.eos_id).sum())
    first = tok.encode(docs[0]["text"], bos=True, eos=True)
    assert arr[:len(first)].tolist() == first


def test_token_batches_shapes_and_shift(tiny_corpus) -> None:
    it = TokenBatches(tiny_corpus.tokens_path("code", "train"), batch_size=4, seq_len=32, seed=0)
    x, y = next(it)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_token_batches_resume_exactly(tiny_corpus) -> None:
    path = tiny_corpus.tokens_path("knowledge", "train")
    a = TokenBatches(path, batch_size=3, seq_len=16, seed=7)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(4)]
    b = TokenBatches(path, batch_size=3, seq_len=16, seed=7)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (next(b) for _ in range(4))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = TokenBatches(path, batch_size=3, seq_len=16, seed=8)
    assert not torch.equal(next(other)[0], TokenBatches(path, 3, 16, seed=7).__next__()[0])
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_token_batches_errors(tiny_corpus, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="hmoe data build"):
        TokenBatches(tmp_path / "none", 2, 8)
    with pytest.raises(ValueError, match="seq_len"):
        TokenBatches(tiny_corpus.tokens_path("code", "test"), 2, 10**8)
