"""Packed tokens and TokenBatches: document framing, bounds and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import TokenBatches, load_tokens
from training.tasks import eval_windows


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


def test_token_batches_carry_each_windows_document_opening(tiny_corpus) -> None:
    """With ``opening_window``, a window that starts mid-document carries that document's first ids
    (up to the window's start; -1 pads), and a window that starts at ``<|bos|>`` carries none: what
    a model router reads for it. The windows themselves are the same as without."""
    tok = tiny_corpus.tokenizer()
    path = tiny_corpus.tokens_path("knowledge", "train")
    arr = load_tokens(path)
    x, y, opening = next(TokenBatches(path, batch_size=64, seq_len=16, seed=3, opening_window=6,
                                      doc_start_id=tok.bos_id))
    x0, y0 = next(TokenBatches(path, batch_size=64, seq_len=16, seed=3))
    assert torch.equal(x, x0) and torch.equal(y, y0) and opening.shape == (64, 6)
    starts = np.random.default_rng([3, 0]).integers(0, len(arr) - 16, size=64)
    bos = np.flatnonzero(arr == tok.bos_id)
    kinds = set()
    for row, s in zip(opening.tolist(), starts):
        doc = int(bos[bos <= s][-1])  # the latest <|bos|> at or before the window's start
        want = arr[doc + 1:min(doc + 7, s)].tolist() if doc < s else []
        assert row == want + [-1] * (6 - len(want))
        kinds.add(0 if doc == s else 1 if len(want) < 6 else 2)
    assert kinds == {1, 2} or kinds == {0, 1, 2}  # windows inside an opening and past one
    val = eval_windows(path, 4, 16, 2, opening_window=6, doc_start_id=tok.bos_id)
    assert all(len(b) == 3 and b[2].shape == (4, 6) for b in val)
