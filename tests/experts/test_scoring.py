"""experts.scoring.token_logprobs: the one scoring function (report, likelihood router, engine, API)."""

from __future__ import annotations

import pytest
import torch

from experts.config import ModelConfig
from experts.model import Transformer
from experts.scoring import chunk_spans, token_logprobs


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", max_seq_len=32)).eval()


def _direct(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) from one full forward pass (ids must fit the context)."""
    logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_chunk_spans_overlap_by_one_so_each_id_is_predicted_once():
    assert chunk_spans(5, 3) == [(0, 3), (2, 5)]
    assert chunk_spans(1, 3) == [] and chunk_spans(0, 3) == []
    spans = chunk_spans(70, 32)
    predicted = [t for s, e in spans for t in range(s + 1, e)]
    assert predicted == list(range(1, 70))
    with pytest.raises(ValueError, match="at least 2"):
        chunk_spans(5, 1)


def test_long_sequences_are_scored_in_windows_with_their_own_context(model):
    ids = [(7 * i) % 500 + 1 for i in range(70)]  # longer than max_seq_len = 32
    lp = token_logprobs(model, [ids])[0].logprobs
    assert lp.shape == (69,) and (lp <= 0).all()
    torch.testing.assert_close(lp[:31], _direct(model, ids[:32]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp[31:62], _direct(model, ids[31:63]), rtol=1e-4, atol=1e-5)


def test_batching_and_padding_do_not_change_the_scores(model):
    seqs = [[5, 6, 7, 8, 9], [11, 12], [13], list(range(20, 60)), [14, 15, 16]]
    batched = token_logprobs(model, seqs, batch_size=3, pad_id=0)
    alone = [token_logprobs(model, [s], batch_size=1)[0] for s in seqs]
    for s, b, a in zip(seqs, batched, alone):
        assert b.logprobs.shape == (max(0, len(s) - 1),)
        torch.testing.assert_close(b.logprobs, a.logprobs, rtol=1e-4, atol=1e-5)
    other_pad = token_logprobs(model, seqs, batch_size=5, pad_id=99)
    for b, o in zip(batched, other_pad):
        torch.testing.assert_close(b.logprobs, o.logprobs, rtol=1e-4, atol=1e-5)


def test_top_ids_are_the_most_likely_tokens_with_their_logprobs(model):
    ids = [3, 40, 41, 42, 100, 7]
    s = token_logprobs(model, [ids], top=4)[0]
    full = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)  # (5, V)
    assert s.top_ids.shape == s.top_logprobs.shape == (5, 4)
    torch.testing.assert_close(s.top_logprobs, full.topk(4, -1).values, rtol=1e-4, atol=1e-5)
    assert torch.equal(s.top_ids[:, 0], full.argmax(-1))
    assert (s.top_logprobs[:, 0] >= s.logprobs - 1e-6).all()
    empty = token_logprobs(model, [[3]], top=2)[0]
    assert empty.logprobs.shape == (0,) and empty.top_ids.shape == (0, 2)


def test_whole_distributions_agree_with_the_token_and_top_scores(model):
    """``dists`` returns each position's log-distribution: normalised, its entry at the next id is the
    token's log-prob, its top-k are ``top``'s; across windows too (70 ids in 32-id windows)."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (70, 5, 1)]
    with torch.no_grad():
        full = token_logprobs(model, seqs, top=4, dists=True)
    for ids, s in zip(seqs, full):
        assert s.dists.shape == (len(ids) - 1, model.cfg.vocab_size)
        if len(ids) < 2:
            continue
        torch.testing.assert_close(s.dists.logsumexp(-1), torch.zeros(len(ids) - 1), atol=1e-4, rtol=0)
        torch.testing.assert_close(s.dists.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], s.logprobs)
        torch.testing.assert_close(s.dists.topk(4, dim=-1).values, s.top_logprobs)
