"""The learned router's reading of a prompt: the ids it sees (:func:`encode_prompt`, :func:`fold_caps`)
and their batching (:func:`collate`). The classifier itself (:class:`RouterModel`, a bag of token
embeddings with group and expert heads) lives in ``experts.classifier``; it is re-exported here.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from experts.classifier import RouterConfig, RouterModel, RouterOutput, hierarchical_log_probs
from experts.domains import EXPERT_GROUP

__all__ = ["CAPS_SHARE", "EXPERT_GROUP", "RouterConfig", "RouterModel", "RouterOutput", "collate", "encode_prompt",
           "fold_caps", "hierarchical_log_probs"]


_WORD = re.compile(r"[^\W\d_]+")
CAPS_SHARE = 0.6  # a prompt is shouted when at least this share of its words are in capitals


def fold_caps(text: str) -> str:
    """``text`` in lower case if it is typed in capitals ("DO YOU PLAY SOCCER", "I PLAY Cricket"), else as is.

    Capitals tell no domain, but the shared tokenizer cuts capitalised words into rare pieces that
    the router's training data has mostly in acronyms and headings (knowledge). Acronyms inside
    ordinary text ("what does HTTP mean") leave it unchanged: at least :data:`CAPS_SHARE` of the words
    must be in capitals.
    """
    words = _WORD.findall(text)
    shouted = sum(w.isupper() for w in words)
    return text.lower() if words and shouted >= CAPS_SHARE * len(words) else text


def encode_prompt(tokenizer: Any, prompt: str, cfg: RouterConfig) -> list[int]:
    """The ids the router reads for ``prompt``: its first ``cfg.max_len`` tokens, after :func:`fold_caps`
    when ``cfg.fold_caps``. Training (``training.router_train``) and routing (``router.Router``) both
    encode through here, so the router is trained on exactly what it reads."""
    text = fold_caps(prompt) if cfg.fold_caps else prompt
    return tokenizer.encode(text[: 16 * cfg.max_len])[: cfg.max_len]


def collate(seqs: list[list[int]], max_len: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (truncated to ``max_len``) into (tokens (B, T), mask (B, T))."""
    seqs = [s[:max_len] for s in seqs]
    t = max(1, max((len(s) for s in seqs), default=1))
    tokens = torch.full((len(seqs), t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)  # (B, T)
    for i, s in enumerate(seqs):
        if s:
            tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
    return tokens, mask
