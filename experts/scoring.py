"""Scoring: the log-probability a language model gives each token of a sequence.

One function, :func:`token_logprobs`, serves every caller: the report's perplexity matrix, the
likelihood router, the engine's ``score`` and the HTTP API's ``echo`` + ``logprobs``. Sequences
longer than the window are scored in windows that overlap by one token, so every token after the
first is predicted exactly once, with the context of its own window (a model router,
``moe.gate_scope: model``, routes every token of a ``<|bos|>``-led sequence, in every window, from
the sequence's opening: the router reads it before anything is scored, as the report's router rows
and the served router read a prompt). Windows of many sequences are
sorted by length and scored in right-padded batches: attention is causal, so padding on the right
never changes the scores of earlier positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TokenScores:
    """Scores of one sequence of n ids: n - 1 entries, for ids[1:] given the ids before each."""

    logprobs: torch.Tensor  # (n-1,) fp32 log p(ids[t] | context), on CPU
    top_ids: torch.Tensor | None = None  # (n-1, k) the k most likely ids at each position (``top`` > 0)
    top_logprobs: torch.Tensor | None = None  # (n-1, k) their log-probs
    dists: torch.Tensor | None = None  # (n-1, V) the whole log-distribution at each position (``dists``)


def chunk_spans(n: int, window: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most ``window`` ids over ``n`` ids, overlapping by one id, so that
    every id after the first is predicted exactly once."""
    if window < 2:
        raise ValueError(f"a scoring window needs at least 2 ids, got {window}")
    return [(s, min(s + window, n)) for s in range(0, max(0, n - 1), window - 1)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def token_logprobs(model: nn.Module, seqs: Sequence[Sequence[int]], *, window: int | None = None,
                   batch_size: int = 32, pad_id: int = 0, top: int = 0, dists: bool = False) -> list[TokenScores]:
    """Per-token log-probs of each sequence in ``seqs`` (see the module docstring).

    ``window`` defaults to the model's ``cfg.max_seq_len``; ``top`` > 0 also returns the ``top``
    most likely ids and their log-probs at every position; ``dists`` the whole log-distribution
    (what a mixture of models needs to score exactly: ``serving`` mixes experts' distributions).
    """
    window = int(window or model.cfg.max_seq_len)
    device = _device(model)
    known = getattr(model, "known_openings", None)
    chunks = [(i, s, e) for i, ids in enumerate(seqs) for s, e in chunk_spans(len(ids), window)]
    chunks.sort(key=lambda c: c[2] - c[1], reverse=True)
    parts: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    for b in range(0, len(chunks), batch_size):
        batch = chunks[b:b + batch_size]
        x = torch.full((len(batch), batch[0][2] - batch[0][1]), pad_id, dtype=torch.long)  # (B, T)
        for r, (i, s, e) in enumerate(batch):
            x[r, : e - s] = torch.tensor(list(seqs[i][s:e]))
        x = x.to(device)
        # a model router reads every window's document opening, known before anything is scored
        opening = known([seqs[i] for i, _, _ in batch], [s for _, s, _ in batch]) if known else None
        out = model(x[:, :-1], opening=opening) if opening is not None else model(x[:, :-1])
        logits = out.logits.float()  # (B, T-1, V)
        norm = torch.logsumexp(logits, -1)  # (B, T-1)
        lp = (logits.gather(-1, x[:, 1:, None])[..., 0] - norm).cpu()  # (B, T-1)
        if top > 0:
            vals, idx = logits.topk(min(top, logits.shape[-1]), dim=-1)  # (B, T-1, k)
            vals, idx = (vals - norm[..., None]).cpu(), idx.cpu()
        full = (logits - norm[..., None]).cpu() if dists else None  # (B, T-1, V)
        for r, (i, s, e) in enumerate(batch):
            n = e - s - 1
            parts[(i, s)] = ((lp[r, :n], idx[r, :n], vals[r, :n]) if top > 0 else (lp[r, :n], None, None)) \
                + ((full[r, :n],) if dists else ())
    out = []
    for i, ids in enumerate(seqs):
        pieces = [parts[(i, s)] for s, _ in chunk_spans(len(ids), window)]
        if not pieces:
            empty = torch.zeros(0)
            out.append(TokenScores(empty, *((torch.zeros(0, top, dtype=torch.long), torch.zeros(0, top))
                                            if top > 0 else (None, None)),
                                   torch.zeros(0, model.cfg.vocab_size) if dists else None))
            continue
        cat = [None if p[0] is None else torch.cat(p) for p in zip(*pieces)]
        out.append(TokenScores(*cat))
    return out
