"""The prompt classifier: a bag of token embeddings with two heads (group, expert within group).

Shape legend: B batch, T tokens, D embedding width, H hidden width, G groups (3), E experts (5).

The classifier pools unigram and hashed-bigram embeddings (mean and max) and feeds them to a small
MLP. It is deliberately tiny: a 256-token prompt is routed in well under a millisecond on one CPU
thread, so routing never shows up next to the expert forward passes.

The expert head is read hierarchically: P(expert) = P(group) x P(expert | group), where
P(expert | group) is a softmax of the expert logits restricted to the experts of that group. The
five expert probabilities therefore sum to one and the group probabilities are their group sums.

It is a model component: the ``router`` package trains it and routes prompts with it, and a merged
model with ``moe.gate_scope == "model"`` (``experts.moe.DocRouter``) carries one inside.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts.checkpoint import load_model
from experts.config import check_field
from experts.domains import DOMAINS, EXPERT_GROUP, GROUP_NAMES

_BIGRAM_MULT = 1_000_003  # odd multiplier for the bigram hash; any large prime works


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    check_field(ok, "RouterConfig", name, value, rule)


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Sizes of the router classifier; ``vocab_size`` must match the shared tokenizer."""

    vocab_size: int = 8192
    d_embed: int = 64
    n_bigram_buckets: int = 16384  # hashed bigram vocabulary (0 disables bigrams)
    hidden: int = 128
    dropout: float = 0.1
    max_len: int = 256  # the router reads the first max_len tokens of a prompt
    fold_caps: bool = True  # read a prompt typed in capitals as lower case (see fold_caps)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_embed", "hidden", "max_len"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(self.n_bigram_buckets >= 0, "n_bigram_buckets", self.n_bigram_buckets, "must be >= 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")

    @property
    def n_features(self) -> int:
        """Width of the pooled feature vector: mean and max of unigrams (and of bigrams)."""
        return (4 if self.n_bigram_buckets else 2) * self.d_embed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouterConfig":
        """The config of a saved router; one saved before ``fold_caps`` existed was trained on text as
        typed, so it reads it that way (``fold_caps`` False)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RouterConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{"fold_caps": False, **d})

    def replace(self, **changes: Any) -> "RouterConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RouterConfig":
        """``tiny`` for tests, ``default`` for real runs."""
        presets = {"tiny": cls(vocab_size=512, d_embed=32, n_bigram_buckets=2048, hidden=64, max_len=64),
                   "default": cls()}
        if name not in presets:
            raise ValueError(f"unknown router preset {name!r}; choose one of {sorted(presets)}")
        return dataclasses.replace(presets[name], **overrides)


class RouterOutput(NamedTuple):
    group_logits: torch.Tensor  # (B, G)
    expert_logits: torch.Tensor  # (B, E)


def _masked_mean_max(x_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean and max over the unmasked positions; zeros for a row with no position."""
    m = mask_BT.unsqueeze(-1).to(x_BTD.dtype)  # (B, T, 1)
    mean = (x_BTD * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
    mx = x_BTD.masked_fill(m == 0, float("-inf")).amax(1) if x_BTD.shape[1] else mean
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # (B, D)
    return torch.cat([mean, mx], dim=-1)  # (B, 2D)


def hierarchical_log_probs(group_logits: torch.Tensor, expert_logits: torch.Tensor,
                           temperature: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log P(group) (B, G), log P(expert) (B, E)) with P(e) = P(g(e)) P(e | g(e))."""
    group_of = torch.tensor(EXPERT_GROUP, device=expert_logits.device)  # (E,)
    g_logp = F.log_softmax(group_logits.float() / temperature, dim=-1)  # (B, G)
    e = expert_logits.float() / temperature  # (B, E)
    same = group_of[:, None] == group_of[None, :]  # (E, E): experts sharing a group
    # log-sum-exp of the expert logits within each expert's own group: (B, E)
    lse = torch.logsumexp(e[:, None, :].masked_fill(~same[None], float("-inf")), dim=-1)
    e_logp = g_logp[:, group_of] + (e - lse)  # (B, E)
    return g_logp, e_logp


class RouterModel(nn.Module):
    """Unigram + hashed-bigram embedding bag, an MLP, and group / expert heads."""

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unigram = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.bigram = nn.Embedding(cfg.n_bigram_buckets, cfg.d_embed) if cfg.n_bigram_buckets else None
        self.norm = nn.LayerNorm(cfg.n_features)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_features, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout))
        self.group_head = nn.Linear(cfg.hidden, len(GROUP_NAMES))
        self.expert_head = nn.Linear(cfg.hidden, len(DOMAINS))
        for emb in (self.unigram, self.bigram):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.1)

    def features(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, n_features) of the first ``max_len`` tokens."""
        tokens, mask = tokens[:, : self.cfg.max_len], mask[:, : self.cfg.max_len].bool()  # (B, T)
        feats = [_masked_mean_max(self.unigram(tokens), mask)]  # (B, 2D)
        if self.bigram is not None:
            ids = (tokens[:, :-1] * _BIGRAM_MULT + tokens[:, 1:]) % self.cfg.n_bigram_buckets  # (B, T-1)
            feats.append(_masked_mean_max(self.bigram(ids), mask[:, :-1] & mask[:, 1:]))  # (B, 2D)
        return self.norm(torch.cat(feats, dim=-1))  # (B, n_features)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        if mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        h = self.mlp(self.features(tokens, mask))  # (B, H)
        return RouterOutput(self.group_head(h), self.expert_head(h))

    @torch.no_grad()
    def probs(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
              temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(group) (B, G), P(expert) (B, E)) at the given calibration temperature."""
        out = self.forward(tokens, mask)
        g_logp, e_logp = hierarchical_log_probs(out.group_logits, out.expert_logits, temperature)
        return g_logp.exp(), e_logp.exp()


def load_classifier(path: str | Path, *, verify: bool = True) -> tuple[RouterModel, RouterConfig]:
    """The classifier of a router checkpoint (kind "router"), in eval mode, and its config."""
    model, cfg, _ = load_model(path, kind="router", config_from_dict=RouterConfig.from_dict, build=RouterModel,
                               verify=verify)
    return model, cfg
