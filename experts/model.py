"""A Llama-style decoder: pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU or MoE FFN.

Parameter names follow Meta's Llama reference code, so mapping to HF ``LlamaForCausalLM`` is a
rename: ``tok_embeddings -> model.embed_tokens``, ``layers.N.attention.wo ->
model.layers.N.self_attn.o_proj``, ``layers.N.feed_forward.{w1,w2,w3} -> mlp.{gate,down,up}_proj``,
``attention_norm -> input_layernorm``, ``ffn_norm -> post_attention_layernorm``, ``norm ->
model.norm``, ``output -> lm_head``. The q/k/v projections are fused into one matmul (litgpt
style; one kernel instead of three matters for batch-1 decoding): ``attention.wqkv.weight`` is
``cat([q_proj, k_proj, v_proj])`` by rows, split with ``.split([H*Dh, Hkv*Dh, Hkv*Dh])``.
RoPE uses the HF "rotate_half" layout (first half of each head pairs with the second half), so
q/k weights need *no* permutation.

Shape legend: B batch, T new tokens, S attended keys, D d_model, H heads, Hkv key/value heads,
Dh head_dim, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from experts.config import ModelConfig
from experts.moe import (Chosen, DocRouter, MoEAux, MoEFFN, Routed, RoutedEmbedding, RoutedHead, Routing, SwiGLU,
                         dense_gates, document_opening)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V) fp32
    aux_loss: torch.Tensor  # scalar, load-balancing loss averaged over MoE layers (0 for dense)
    z_loss: torch.Tensor  # scalar, router z-loss averaged over MoE layers (0 for dense)
    expert_counts: torch.Tensor | None  # (routers, n_experts) long, one row per routed module in order; None for dense


# ---- KV cache ------------------------------------------------------------------------------
@dataclass
class _CacheStep:
    """What one forward over the cache needs: rows, write positions, and the attention mask."""

    slots: list[int]
    starts: list[int]  # cache length of each row before this forward
    n_new: int
    n_valid: list[int] | None  # real tokens per row of a right-padded prefill (None: all n_new)
    end: int  # keys attended: [0, end)
    rows: slice | None  # the slots as a slice when they are contiguous (views, no gathers)
    slot_idx: torch.Tensor
    mask: torch.Tensor | None  # (B or 1, 1, T, end) bool, True = attend; None when not needed
    is_causal: bool


def _write(buf: torch.Tensor, step: _CacheStep, new_BHTD: torch.Tensor) -> torch.Tensor:
    """Write the new positions of the bound rows into ``buf (max_batch, H, max_len, X)``; return its
    rows up to ``step.end``, ``(B, H, S, X)``."""
    T, s0 = step.n_new, step.starts[0]
    if step.rows is not None and step.mask is None:  # same length, contiguous: slice views
        buf[step.rows, :, s0:s0 + T] = new_BHTD
        return buf[step.rows, :, :step.end]
    if T == 1:  # batched decode at different positions: one scatter
        buf[step.slot_idx, :, torch.tensor(step.starts, device=buf.device)] = new_BHTD[:, :, 0]
    else:  # chunks of several tokens: one slice copy per row (a loop over rows, not tokens)
        for b, (slot, start) in enumerate(zip(step.slots, step.starts)):
            buf[slot, :, start:start + T] = new_BHTD[b]
    return buf[step.rows if step.rows is not None else step.slot_idx, :, :step.end]


class KVCache:
    """Slot-based key/value cache: per layer ``(max_batch, kv_heads, max_len, head_dim)``.

    A slot holds one sequence and its length. ``bind(slots)`` selects the rows of the next
    forward (prefill one slot with T tokens, or decode one token for a set of slots at different
    lengths); ``Transformer.forward(tokens, cache=...)`` then writes the new keys, attends over
    each row's valid prefix and advances the lengths. Buffers are preallocated; masks are only
    built when rows differ in length or a chunk is appended to a non-empty slot.
    """

    def __init__(self, cfg: ModelConfig, *, max_batch: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        max_len = max_len or cfg.max_seq_len
        if max_batch < 1:
            raise ValueError(f"KVCache.max_batch={max_batch} is invalid: must be >= 1")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"KVCache.max_len={max_len} is invalid: must be in [1, max_seq_len={cfg.max_seq_len}]")
        shape = (max_batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_batch, self.max_len = max_batch, max_len
        # routers that read the running mean of their inputs (moe.gate_context "mean") keep the inputs
        # here, as attention keeps keys: key -> (max_batch, 1, max_len, d_model), made on first use
        self.inputs: dict[str, torch.Tensor] = {}
        self._dtype = dtype
        self.lengths = [0] * max_batch  # Python ints: reading them never syncs a device
        # where each slot's current document starts (routers with moe.gate_context "doc"): a device
        # tensor, read and written by index, so that decoding never waits on it
        self.doc_starts = torch.zeros(max_batch, dtype=torch.long, device=device)
        self._slots: list[int] = [0]
        self._valid: list[int] | None = None

    def reset(self, slot: int) -> None:
        """Empty one slot (its old keys are simply overwritten later)."""
        self.lengths[slot] = 0
        self.doc_starts[slot] = 0

    def bind(self, slots: Sequence[int], valid: Sequence[int] | None = None) -> None:
        """Choose the slots (one per batch row) that the next forward reads and writes.

        ``valid`` (per row) marks a right-padded prefill of empty slots: row ``i`` keeps only its
        first ``valid[i]`` positions. The padding's keys land past the row's length, where no
        query ever attends (causal within the chunk; later masks stop at each row's length) and
        the next tokens overwrite them.
        """
        self._slots, self._valid = list(slots), None
        if valid is not None:
            if len(valid) != len(self._slots) or any(self.lengths[s] for s in self._slots):
                raise ValueError("a padded prefill needs one valid length per slot, and empty slots")
            self._valid = [int(n) for n in valid]

    def begin(self, batch: int, n_new: int) -> _CacheStep:
        """Plan one forward of ``n_new`` tokens for the bound slots (called by the model)."""
        slots = self._slots
        valid, self._valid = self._valid, None  # for this forward only, even if it fails
        if len(slots) != batch:
            raise ValueError(f"batch has {batch} rows but {len(slots)} cache slots are bound")
        starts = [self.lengths[s] for s in slots]
        end = max(starts) + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, max_len={self.max_len}")
        device = self.k[0].device
        contiguous = slots == list(range(slots[0], slots[0] + batch))
        rows = slice(slots[0], slots[0] + batch) if contiguous else None
        same = all(s == starts[0] for s in starts)
        mask, is_causal = None, False
        if same and starts[0] == 0:
            is_causal = n_new > 1  # plain prefill: SDPA's own causal mask
        elif not (same and n_new == 1):  # a chunk after a prefix, or rows of different lengths
            q_pos_BT = torch.tensor(starts, device=device)[:, None] + torch.arange(n_new, device=device)
            k_pos_S = torch.arange(end, device=device)
            mask = (k_pos_S[None, None, :] <= q_pos_BT[:, :, None]).unsqueeze(1)  # (B, 1, T, S)
        slot_idx = torch.tensor(slots, device=device)
        if valid is not None and any(not 1 <= n <= n_new for n in valid):
            raise ValueError(f"valid lengths {valid} must be in [1, {n_new}]")
        return _CacheStep(slots, starts, n_new, valid, end, rows, slot_idx, mask, is_causal)

    def update(self, layer: int, step: _CacheStep, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of ``layer`` and return the keys/values to attend over."""
        return _write(self.k[layer], step, k_BHTD), _write(self.v[layer], step, v_BHTD)

    def update_inputs(self, key: str, step: _CacheStep, x_BTD: torch.Tensor) -> torch.Tensor:
        """Write a router's new inputs under ``key`` and return every input of the rows so far,
        ``(B, S, D)`` (positions past a row's length hold stale values: the caller reads only its own).
        Integer inputs (token ids) are kept as they are, floating ones in the cache's dtype."""
        dtype = self._dtype if x_BTD.is_floating_point() else x_BTD.dtype
        if key not in self.inputs:
            self.inputs[key] = torch.zeros(self.max_batch, 1, self.max_len, x_BTD.shape[-1],
                                           device=x_BTD.device, dtype=dtype)
        return _write(self.inputs[key], step, x_BTD.unsqueeze(1).to(dtype)).squeeze(1)

    def commit(self, step: _CacheStep, doc_BT: torch.Tensor | None = None) -> None:
        """Advance the lengths of the rows written by ``step``; with ``doc_BT`` (each new token's
        document start) keep each row's, at its last valid token, for the next forward."""
        for i, s in enumerate(step.slots):
            self.lengths[s] += step.n_new if step.n_valid is None else step.n_valid[i]
        if doc_BT is not None:
            last = [step.n_new - 1] * len(step.slots) if step.n_valid is None else [n - 1 for n in step.n_valid]
            rows = torch.arange(len(last), device=doc_BT.device)
            self.doc_starts[step.slot_idx] = doc_BT[rows, torch.tensor(last, device=doc_BT.device)]


# ---- modules ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(max_len, head_dim)`` in the HF layout: frequencies repeated for both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, Dh)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, T, heads, Dh)`` by position; ``cos``/``sin`` are (T, 1, Dh) or (B, T, 1, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        # QK-norm (``cfg.qk_norm``): RMSNorm over head_dim on q and k before RoPE, one weight of
        # size Dh shared by the heads (as Qwen3's q_norm/k_norm; modded-nanogpt uses it too)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, H + 2 Hkv, Dh)``: queries, keys and values, q and k QK-normed (not yet rotated)."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim)
        if self.q_norm is None:
            return qkv
        return torch.cat([self.q_norm(qkv[:, :, :H]), self.k_norm(qkv[:, :, H:H + Hkv]), qkv[:, :, H + Hkv:]], dim=2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, step: _CacheStep | None) -> torch.Tensor:
        return self.wo(self.attend(self.qkv(x), cos, sin, cache, step))

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: KVCache | None, step: _CacheStep | None) -> torch.Tensor:
        """Rotate q and k, update the cache, attend: ``(B, T, H * Dh)``, the input of ``wo``."""
        B, T = qkv.shape[:2]
        H, Hkv = self.n_heads, self.kv_heads
        qk = apply_rope(qkv[:, :, :H + Hkv], cos, sin)  # one rotation for q and k together
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, Dh)
        k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, Dh)
        v = qkv[:, :, H + Hkv:].transpose(1, 2)  # (B, Hkv, T, Dh)
        mask, is_causal = None, T > 1
        if cache is not None:
            k, v = cache.update(self.layer_id, step, k, v)  # (B, Hkv, S, Dh)
            mask, is_causal = step.mask, step.is_causal
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.kv_heads != self.n_heads)
        return y.transpose(1, 2).reshape(B, T, H * self.head_dim)


class RoutedAttention(Routed):
    """Attention whose projections are ``n_experts`` experts (``moe.routed_attention``); returns
    ``(y, MoEAux)``. A token's queries, keys and values are its top-k experts' (each QK-normed by its
    own norm) weighted by the gate, and so is its output projection; the attention itself is shared.
    Every expert's projections run on every token (they are small next to the FFN and the head),
    and the gate's zeros drop the others. With one expert per token it is that expert's attention."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg.d_model, cfg.moe.n_experts, cfg.moe.top_k, context=cfg.moe.gate_context,
                         key=f"attn{layer_id}", gated=not cfg.model_router)
        self.experts = nn.ModuleList(Attention(cfg, layer_id) for _ in range(cfg.moe.n_experts))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                step: _CacheStep | None, doc_BT: torch.Tensor | None = None,
                routing: Routing | None = None) -> tuple[torch.Tensor, MoEAux]:
        B, T, D = x.shape
        if isinstance(routing, Chosen) and routing.single is not None:
            return self.experts[routing.single](x, cos, sin, cache, step), routing.aux
        logits_NE, probs_NE, weights_NK, experts_NK = self.decide(x, cache, step, doc_BT, routing)
        g_BTE = dense_gates(weights_NK, experts_NK, self.n_experts).to(x.dtype).view(B, T, self.n_experts)
        used = experts_NK.unique().tolist()
        qkv = sum(g_BTE[:, :, e, None, None] * self.experts[e].qkv(x) for e in used)
        y = self.experts[0].attend(qkv, cos, sin, cache, step)
        out = sum(g_BTE[:, :, e, None] * self.experts[e].wo(y) for e in used)
        return out, self.aux(logits_NE, probs_NE, experts_NK, routing)


class Block(nn.Module):
    """Pre-norm residual block; the FFN is dense SwiGLU or ``MoEFFN`` (``cfg.ffn``)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = RoutedAttention(cfg, layer_id) if cfg.routed_attention else Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = MoEFFN(cfg, layer_id) if cfg.ffn == "moe" else SwiGLU(cfg.d_model, cfg.hidden_dim)
        self.dropout = cfg.dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # functional and skipped when off: a no-op module call per residual costs at batch-1 decode
        return F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                step: _CacheStep | None, doc_BT: torch.Tensor | None = None,
                routing: Routing | None = None) -> tuple[torch.Tensor, list[MoEAux]]:
        """``doc_BT``: each token's document start, for routers that read their document's mean;
        ``routing``: the model router's choice, for routed modules without a router of their own."""
        auxes = []
        routed = (doc_BT, routing) if isinstance(self.attention, RoutedAttention) else ()
        a = self.attention(self.attention_norm(x), cos, sin, cache, step, *routed)
        if isinstance(a, tuple):
            a, aux = a
            auxes.append(aux)
        x = x + self._drop(a)
        if isinstance(self.feed_forward, MoEFFN):
            y = self.feed_forward(self.ffn_norm(x), cache, step, doc_BT, routing)
        else:
            y = self.feed_forward(self.ffn_norm(x))
        if isinstance(y, tuple):
            y, aux = y
            auxes.append(aux)
        return x + self._drop(y), auxes


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = RoutedEmbedding(cfg.vocab_size, cfg.d_model, cfg.moe.n_experts, cfg.moe.top_k,
                                              context=cfg.moe.gate_context, gated=not cfg.model_router) \
            if cfg.routed_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model)
        # moe.gate_scope "model": one router, reading each token's document opening, chooses every
        # token's experts for all routed modules
        self.router = DocRouter(cfg) if cfg.model_router else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = RoutedHead(cfg) if cfg.routed_head else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def known_openings(self, seqs: Sequence[Sequence[int]], starts: Sequence[int] | None = None
                       ) -> torch.Tensor | None:
        """The ``opening`` (``(B, W)``) to pass with rows of ``seqs`` that begin at ``starts`` (default
        0), or None for a model without a model router: for a row at a ``<|bos|>`` (a prompt, a scored
        document) its document's opening, known before anything is generated or scored, so that
        every token of the document is routed from it, as the served router routes a prompt (it
        reads generated ids only where the prompt is shorter than its window); for a row that begins
        mid-document the document's ids before it (``experts.moe.document_opening``)."""
        if self.router is None:
            return None
        w, bos = self.router.window, self.cfg.moe.doc_start_id
        starts = starts if starts is not None else [0] * len(seqs)
        return torch.tensor([document_opening(q, s, w, bos, known=True) if len(q) else [-1] * w
                             for q, s in zip(seqs, starts)], dtype=torch.long, device=self.rope_cos.device)

    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual projections (wo, w2) scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        resid_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = resid_std if name.endswith(("wo.weight", "w2.weight")) else self.cfg.init_std
                nn.init.normal_(p, mean=0.0, std=std)

    def _rope(self, B: int, T: int, positions: torch.Tensor | None,
              step: _CacheStep | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the new tokens: a (T, 1, Dh) slice when rows share positions, else (B, T, 1, Dh)."""
        if positions is None and step is not None and any(s != step.starts[0] for s in step.starts):
            positions = torch.tensor(step.starts, device=self.rope_cos.device)[:, None] + \
                torch.arange(T, device=self.rope_cos.device)  # (B, T)
        if positions is not None:
            if positions.shape != (B, T):
                raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {(B, T)}")
            return self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2)
        start = step.starts[0] if step is not None else 0
        return self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None]

    def doc_starts(self, tokens: torch.Tensor, cache: KVCache | None = None,
                   step: _CacheStep | None = None) -> torch.Tensor:
        """``(B, T)``: the position (absolute, as the cache counts) where each token's document
        starts: its latest ``moe.doc_start_id`` token, else the row's first position (with a cache,
        the slot's document so far)."""
        B, T = tokens.shape
        pos_BT = torch.arange(T, device=tokens.device).expand(B, T)
        prev_B1 = torch.zeros(B, 1, dtype=torch.long, device=tokens.device)
        if step is not None:
            pos_BT = pos_BT + torch.tensor(step.starts, device=tokens.device)[:, None]
            prev_B1 = cache.doc_starts[step.slot_idx][:, None]
        marked_BT = torch.where(tokens == self.cfg.moe.doc_start_id, pos_BT, prev_B1)
        return marked_BT.cummax(1).values

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, last_only: bool = False,
                opening: torch.Tensor | None = None) -> ModelOutput:
        """Logits for ``tokens (B, T)``; with ``cache`` the tokens continue the bound slots.

        ``opening (B, router window)`` (only a model with a model router, :meth:`known_openings`):
        what is known in advance of each row's first document's opening, which the model router reads
        for all of its tokens: a prompt's or a scored document's opening, or the ids before a row
        that begins mid-document.

        ``last_only=True`` returns logits ``(B, 1, V)`` for the last position only (each row's last
        valid one in a padded prefill): a prefill that only needs the next token skips T-1 rows of
        the LM head (its largest matmul).
        """
        B, T = tokens.shape
        step = cache.begin(B, T) if cache is not None else None
        if step is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self._rope(B, T, positions, step)
        doc_BT = self.doc_starts(tokens, cache, step) if self.cfg.ffn == "moe" and \
            self.cfg.moe.gate_context == "doc" else None
        auxes = []
        # one choice per token for every routed module
        if opening is not None and self.router is None:
            raise ValueError("only a model with a model router (moe.gate_scope 'model') reads a document opening")
        routing = None
        if self.router is not None:
            routing = self.router.choose(tokens, cache, step, doc_BT, opening)
            routing = Chosen.of(routing, self.router.aux(routing[0], routing[1], routing[3]))
        if isinstance(self.tok_embeddings, RoutedEmbedding):
            h, aux = self.tok_embeddings(tokens, cache, step, doc_BT, routing)
            auxes.append(aux)
        else:
            h = self.tok_embeddings(tokens)  # (B, T, D)
        if self.training and self.cfg.dropout:
            h = F.dropout(h, self.cfg.dropout, training=True)
        for layer in self.layers:
            h, aux = layer(h, cos, sin, cache, step, doc_BT, routing)
            auxes += aux
        h = self.norm(h)
        gate = self.output.gate_input(h, cache, step, doc_BT) \
            if isinstance(self.output, RoutedHead) and routing is None else None
        if last_only:
            if step is not None and step.n_valid is not None:  # right-padded rows end at different places
                last_B = torch.tensor(step.n_valid, device=h.device) - 1
                pick = lambda t: t[torch.arange(B, device=t.device), last_B][:, None]  # noqa: E731 (B, 1, D)
            else:
                pick = lambda t: t[:, -1:]  # noqa: E731
            h, gate = pick(h), (pick(gate) if gate is not None else None)
            if routing is not None:  # (N, .) rows of the tokens kept
                routing = routing.rows(lambda r: pick(r.view(B, T, -1)).reshape(-1, r.shape[-1]))
        # (B, T or 1, V); a routed head gives log-probs
        logits = self.output(h, gate, routing) if isinstance(self.output, RoutedHead) else self.output(h)
        if isinstance(logits, tuple):
            logits, aux = logits
            auxes.append(aux)
        logits = logits.float()
        if cache is not None:
            cache.commit(step, doc_BT)
        if not auxes:
            zero = logits.new_zeros(())
            return ModelOutput(logits, zero, zero, None)
        return ModelOutput(logits, torch.stack([a.aux_loss for a in auxes]).mean(),
                           torch.stack([a.z_loss for a in auxes]).mean(),
                           torch.stack([a.counts for a in auxes]))
