"""Model configuration: one frozen, keyword-only dataclass with named presets.

Every model in hmoe (the five experts, the generalist baselines) is described by a
``ModelConfig``. Derived values are properties; invalid values raise ``ValueError``
naming the field and the value, so a bad YAML file or CLI flag says what to change.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FFNKind = Literal["dense", "moe"]


def check_field(ok: bool, owner: str, name: str, value: Any, rule: str) -> None:
    """Raise ``ValueError("Owner.name=value is invalid: rule")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: {rule}")


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    check_field(ok, "ModelConfig", name, value, rule)


GATE_CONTEXTS = ("token", "mean", "doc")
GATE_SCOPES = ("layer", "model")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The token-level mixture-of-experts FFN (used when ``ModelConfig.ffn == "moe"``)."""

    n_experts: int = 4
    top_k: int = 2
    n_shared: int = 1  # shared experts applied to every token
    expert_hidden: int | None = None  # None: hidden_dim // (top_k + n_shared), so active FFN size ~ dense
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    z_loss_coef: float = 0.001  # ST-MoE router z-loss weight
    # beyond the FFN, also route each layer's attention projections and the LM head over n_experts
    # copies (a Branch-Train-MiX merge that keeps every expert's weights: training.merge)
    routed_attention: bool = False
    routed_head: bool = False  # needs tie_embeddings=False: the head's experts are not the embedding
    # the input embeddings too (needs tie_embeddings=False): a token's input is its top-k experts'
    # rows, chosen by a router that reads (per gate_context) a shared embedding of the tokens
    routed_embeddings: bool = False
    # what a router reads: "token" (the token's own input), "mean" (the mean of the inputs of the
    # token and every one before it in its sequence: a causal document-level choice, per token) or
    # "doc" (that mean restarted at every document start, a ``doc_start_id`` token: in a row packed
    # with several documents each is routed from its own tokens alone, as when it is served alone)
    gate_context: str = "token"
    doc_start_id: int = 1  # <|bos|> of the hmoe tokenizer (experts.tokenizer.SPECIALS)
    # "layer": every routed module has its own router; "model": one router chooses each token's experts
    # once, for every routed module of every layer (as DEMix layers route by a document's domain), so a
    # token sent to expert i alone is computed by expert i's weights throughout. That router is a prompt
    # classifier (router.model.RouterModel: embeddings of router_embed wide, router_buckets hashed
    # bigrams, an MLP of router_hidden) reading the first router_window tokens of the token's document
    # up to the token itself: from there on a document goes where its opening is sent
    gate_scope: str = "layer"
    router_embed: int = 64
    router_buckets: int = 16384
    router_hidden: int = 128
    router_window: int = 12

    def __post_init__(self) -> None:
        _check(self.n_experts >= 1, "moe.n_experts", self.n_experts, "must be >= 1")
        _check(1 <= self.top_k <= self.n_experts, "moe.top_k", self.top_k,
               f"must be in [1, n_experts={self.n_experts}]")
        _check(self.n_shared >= 0, "moe.n_shared", self.n_shared, "must be >= 0")
        _check(self.expert_hidden is None or self.expert_hidden >= 1, "moe.expert_hidden",
               self.expert_hidden, "must be None or >= 1")
        _check(self.aux_loss_coef >= 0, "moe.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        _check(self.z_loss_coef >= 0, "moe.z_loss_coef", self.z_loss_coef, "must be >= 0")
        _check(self.gate_context in GATE_CONTEXTS, "moe.gate_context", self.gate_context,
               f"must be one of {list(GATE_CONTEXTS)}")
        _check(self.gate_scope in GATE_SCOPES, "moe.gate_scope", self.gate_scope, f"must be one of {list(GATE_SCOPES)}")
        _check(self.gate_scope == "layer" or self.gate_context == "doc", "moe.gate_context", self.gate_context,
               "must be 'doc' with gate_scope 'model' (its router reads each token's document)")
        for name in ("router_embed", "router_hidden", "router_window"):
            _check(getattr(self, name) >= 1, f"moe.{name}", getattr(self, name), "must be >= 1")
        _check(self.router_buckets >= 0, "moe.router_buckets", self.router_buckets, "must be >= 0")
        _check(self.doc_start_id >= 0, "moe.doc_start_id", self.doc_start_id, "must be a token id (>= 0)")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU (or MoE) FFN."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    ffn_hidden: int | None = None  # None: SwiGLU default, 8/3 * d_model rounded up to 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    ffn: FFNKind = "dense"
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3 / modded-nanogpt)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON / YAML
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(self.d_model % self.n_heads == 0, "d_model", self.d_model,
               f"must be divisible by n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0, "d_model", self.d_model,
               f"head size d_model/n_heads={self.head_dim} must be even for RoPE")
        _check(self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0, "n_kv_heads",
               self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        _check(self.ffn_hidden is None or self.ffn_hidden >= 1, "ffn_hidden", self.ffn_hidden,
               "must be None or >= 1")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        _check(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        _check(self.init_std > 0, "init_std", self.init_std, "must be > 0")
        _check(self.ffn in ("dense", "moe"), "ffn", self.ffn, "must be 'dense' or 'moe'")
        _check(isinstance(self.qk_norm, bool), "qk_norm", self.qk_norm, "must be true or false")
        _check(not (self.routed_head and self.tie_embeddings), "tie_embeddings",
               self.tie_embeddings, "must be false with moe.routed_head (each head expert is its own matrix)")
        _check(not (self.routed_embeddings and self.tie_embeddings), "tie_embeddings", self.tie_embeddings,
               "must be false with moe.routed_embeddings (each embedding expert is its own matrix)")

    # ---- derived values -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Hidden size of the dense SwiGLU FFN."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 64 * -(-int(8 * self.d_model / 3) // 64)

    @property
    def expert_hidden_dim(self) -> int:
        """Hidden size of one MoE expert (routed or shared)."""
        if self.moe.expert_hidden is not None:
            return self.moe.expert_hidden
        return max(1, self.hidden_dim // (self.moe.top_k + self.moe.n_shared))

    # ---- parameter counts -----------------------------------------------------------
    def _attn_params(self) -> int:
        """One layer's attention projections; routed attention runs every expert's (its gate mixes them)."""
        d, hd = self.d_model, self.head_dim
        one = d * self.n_heads * hd + 2 * d * self.kv_heads * hd + self.n_heads * hd * d
        if self.routed_attention:
            return self.moe.n_experts * (one + (2 * hd if self.qk_norm else 0)) + self._gate_params
        return one

    @property
    def routed_attention(self) -> bool:
        return self.ffn == "moe" and self.moe.routed_attention

    @property
    def routed_head(self) -> bool:
        return self.ffn == "moe" and self.moe.routed_head

    @property
    def routed_embeddings(self) -> bool:
        return self.ffn == "moe" and self.moe.routed_embeddings

    @property
    def model_router(self) -> bool:
        """One router for the whole model (``moe.gate_scope == "model"``), none in the routed modules."""
        return self.ffn == "moe" and self.moe.gate_scope == "model"

    @property
    def _router_mlp_params(self) -> int:
        """The model router's layer norm, MLP and group (3) and expert heads (router.model.RouterModel)."""
        m = self.moe
        feats = (4 if m.router_buckets else 2) * m.router_embed
        return 2 * feats + (feats + 1) * m.router_hidden + (m.router_hidden + 1) * (3 + m.n_experts)

    @property
    def _gate_params(self) -> int:
        """A routed module's own router: ``d_model x n_experts``, or nothing under a model router."""
        return 0 if self.model_router else self.d_model * self.moe.n_experts

    def _head_params(self, active: bool) -> int:
        """The LM head: one ``vocab x d_model`` matrix, or top_k (active) of n_experts plus their gate."""
        if not self.routed_head:
            return self.vocab_size * self.d_model
        return (self.moe.top_k if active else self.moe.n_experts) * self.vocab_size * self.d_model + \
            self._gate_params

    def _ffn_params(self, active: bool) -> int:
        if self.ffn == "dense":
            return 3 * self.d_model * self.hidden_dim
        per_expert = 3 * self.d_model * self.expert_hidden_dim
        routed = self.moe.top_k if active else self.moe.n_experts
        return (routed + self.moe.n_shared) * per_expert + self._gate_params

    def num_params(self, *, active: bool = False, embeddings: bool = True) -> int:
        """Total parameters, or with ``active=True`` the parameters used per token."""
        block = self._attn_params() + self._ffn_params(active) + 2 * self.d_model
        if self.qk_norm and not self.routed_attention:  # routed: counted with each expert
            block += 2 * self.head_dim
        n = self.n_layers * block + self.d_model  # + final norm
        if self.routed_embeddings:
            n += self._gate_params  # the embeddings' router (a real matmul per token)
        if self.model_router:  # the one router: its MLP and heads, and its embeddings
            m = self.moe
            n += self._router_mlp_params + (embeddings and (self.vocab_size + m.router_buckets) * m.router_embed)
        if embeddings:
            n += self.vocab_size * self.d_model
            if self.routed_embeddings:  # the shared embedding the router reads, and the experts'
                n += (self.moe.top_k if active else self.moe.n_experts) * self.vocab_size * self.d_model
            if not self.tie_embeddings:
                n += self._head_params(active)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 x active non-embedding params + attention (PaLM appendix B).

        The output projection (d_model x vocab) is counted: it is a real matmul per token.
        """
        t = seq_len or self.max_seq_len
        n = self.num_params(active=True, embeddings=False) + self._head_params(active=True)
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * t

    # ---- (de)serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset, optionally with fields overridden (e.g. ``vocab_size``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # for tests: a few thousand parameters, runs in milliseconds
    "tiny": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        max_seq_len=128),
    "tiny-moe": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            max_seq_len=128, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2)),
    # CPU demo sizes
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "small-moe": ModelConfig(d_model=256, n_layers=4, n_heads=4, max_seq_len=256, ffn="moe",
                             moe=MoEConfig(n_experts=4, top_k=2, n_shared=1)),
    "base": ModelConfig(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=512),
    # sensible sizes for one or more GPUs
    "gpu": ModelConfig(vocab_size=16384, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                       max_seq_len=1024),
    "gpu-moe": ModelConfig(vocab_size=16384, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                           max_seq_len=1024, ffn="moe", moe=MoEConfig(n_experts=8, top_k=2)),
}
