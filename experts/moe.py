"""Token-level mixture-of-experts FFN: a drop-in for the dense SwiGLU (``ModelConfig.ffn == "moe"``).

Shape-suffix legend (torchtitan style):
    B batch, T sequence, D d_model, H expert hidden size,
    N = B*T tokens, E routed experts, K experts per token (top_k), A = N*K token-assignments.

Routing choices, so a reader need not guess:
- Router logits and probabilities are computed in fp32 whatever the activation dtype.
- Gating is "softmax then top-k": the softmax runs over *all* experts (so the load-balancing
  loss sees a proper distribution), then the top-k probabilities are renormalised to sum to 1.
  With ``top_k == 1`` a token's single expert therefore gets weight exactly 1.0.
- Dispatch is dropless: every assignment is computed. Assignments are sorted by expert and
  each expert runs once on its contiguous group (a loop over experts, never over tokens).
- Shared experts (``n_shared``) run on every token and are added unweighted (DeepSeekMoE);
  ``n_shared`` shared experts of width H are stored as one SwiGLU of width ``n_shared * H``,
  which is the same function as their sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experts.classifier import RouterConfig, RouterModel, hierarchical_log_probs
from experts.config import ModelConfig
from experts.domains import DOMAINS
from experts.tokenizer import SPECIALS


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``; names match HF Llama (gate_proj=w1, down_proj=w2, up_proj=w3)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class MoEAux:
    """Unweighted auxiliary outputs of one MoE layer."""

    aux_loss: torch.Tensor  # scalar: Switch load-balancing loss, 1.0 when perfectly balanced
    z_loss: torch.Tensor  # scalar: ST-MoE router z-loss
    counts: torch.Tensor  # (E,) long: token-assignments per routed expert


def load_balancing_loss(probs_NE: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
    """Switch loss ``E * sum_i f_i * P_i``: f_i the fraction of assignments to expert i, P_i its mean prob.

    Perfectly uniform routing (f_i = P_i = 1/E) gives exactly 1.0, whatever E and K.
    """
    n_experts = probs_NE.shape[-1]
    counts_E = torch.bincount(experts_NK.flatten(), minlength=n_experts)
    f_E = counts_E.to(probs_NE.dtype) / experts_NK.numel()
    P_E = probs_NE.mean(dim=0)
    return n_experts * torch.sum(f_E * P_E)


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of ``logsumexp(logits)^2`` (keeps router logits small)."""
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


# a router's choice for N tokens: (logits_NE, probs_NE, weights_NK, experts_NK)
Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Chosen(tuple):
    """The model router's :data:`Routing` (it unpacks as one), handed to every routed module with
    what they share: ``aux``, its auxiliary outputs (computed once, not once per module), and
    ``single``, the one expert every token goes to (top-1), if there is one. A routed module then
    runs that expert alone, on all its tokens, without dispatching them: the same numbers, the cost
    of a dense module (a served request decodes its document's tokens this way, one expert for all)."""

    aux: MoEAux
    single: int | None

    @classmethod
    def of(cls, routing: Routing, aux: MoEAux) -> Chosen:
        out = cls(routing)
        experts_NK = routing[3]
        out.aux = aux
        out.single = int(experts_NK[0, 0]) if experts_NK.shape[1] == 1 and len(experts_NK) and \
            bool((experts_NK == experts_NK[0, 0]).all()) else None
        return out

    def rows(self, pick: Any) -> Chosen:
        """The same choice for the rows ``pick`` keeps of each ``(N, .)`` tensor."""
        out = Chosen(pick(r) for r in self)
        out.aux, out.single = self.aux, self.single
        return out


class Routed(nn.Module):
    """A module that sends each token to ``top_k`` of its ``n_experts`` through a linear ``gate``.

    The gate reads the token's input (``context="token"``), the mean of the inputs of the token and
    all before it in its row (``"mean"``: ``moe.gate_context``), or that mean over the token's own
    document only (``"doc"``: from ``doc_BT``, the position where each token's document starts);
    with a KV cache those inputs are kept in it under ``key``, so decoding one token at a time
    routes as the full forward does. ``gated=False``: no router of its own; the model's one router
    (``moe.gate_scope == "model"``) hands every forward its ``routing``."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, *, context: str = "token", key: str = "",
                 gated: bool = True):
        super().__init__()
        self.n_experts, self.top_k, self.context, self.key = n_experts, top_k, context, key
        # router (HF Mixtral name)
        self.gate = nn.Linear(d_model, n_experts, bias=False) if gated else None

    def gate_input(self, x_BTD: torch.Tensor, cache: Any = None, step: Any = None,
                   doc_BT: torch.Tensor | None = None) -> torch.Tensor:
        """What the gate reads at every position, ``(B, T, D)``. ``doc_BT`` (``"doc"`` only): each
        token's document start, an absolute position like the cache's (``Transformer.doc_starts``)."""
        if self.context == "token":
            return x_BTD
        if self.context == "doc" and doc_BT is None:
            raise ValueError("a router with gate_context 'doc' needs each token's document start (doc_BT)")
        B, T, D = x_BTD.shape
        if cache is None:
            sums_BSD, pos_BT = x_BTD.float().cumsum(1), torch.arange(T, device=x_BTD.device).expand(B, T)
            sums_BTD = sums_BSD
        else:
            sums_BSD = cache.update_inputs(self.key, step, x_BTD).float().cumsum(1)
            pos_BT = torch.tensor(step.starts, device=x_BTD.device)[:, None] + torch.arange(T, device=x_BTD.device)
            sums_BTD = sums_BSD.gather(1, pos_BT[..., None].expand(B, T, D))
        if self.context == "mean":
            return (sums_BTD / (pos_BT + 1)[..., None]).to(x_BTD.dtype)
        # the document's mean: the running sum less the sum of everything before its start
        before_BTD = sums_BSD.gather(1, (doc_BT - 1).clamp(min=0)[..., None].expand(B, T, D))
        before_BTD = before_BTD * (doc_BT > 0)[..., None]
        return ((sums_BTD - before_BTD) / (pos_BT - doc_BT + 1)[..., None]).to(x_BTD.dtype)

    def decide(self, x_BTD: torch.Tensor, cache: Any = None, step: Any = None, doc_BT: torch.Tensor | None = None,
               routing: Routing | None = None) -> Routing:
        """:meth:`route` on what the gate reads at every position, unless the model's router already
        chose (``routing``)."""
        if routing is not None:
            return routing
        if self.gate is None:
            raise ValueError(f"routed module {self.key!r} has no router of its own: pass the model router's routing")
        return self.route(self.gate_input(x_BTD, cache, step, doc_BT).reshape(-1, x_BTD.shape[-1]))

    def route(self, x_ND: torch.Tensor) -> Routing:
        """Return ``(logits_NE, probs_NE, weights_NK, experts_NK)``, all routing maths in fp32."""
        logits_NE = F.linear(x_ND.float(), self.gate.weight.float())
        probs_NE = logits_NE.softmax(dim=-1)
        weights_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return logits_NE, probs_NE, weights_NK, experts_NK

    def aux(self, logits_NE: torch.Tensor, probs_NE: torch.Tensor, experts_NK: torch.Tensor,
            routing: Routing | None = None) -> MoEAux:
        if isinstance(routing, Chosen):  # the model router's, the same for every module
            return routing.aux
        return MoEAux(aux_loss=load_balancing_loss(probs_NE, experts_NK), z_loss=router_z_loss(logits_NE),
                      counts=torch.bincount(experts_NK.flatten(), minlength=self.n_experts))


class DocRouter(Routed):
    """The one router of a model with ``moe.gate_scope == "model"``: a prompt classifier
    (``experts.classifier.RouterModel``, the run's router) that reads, for every token, the first
    ``moe.router_window`` tokens of the token's document (after its ``<|bos|>``) that are not after
    the token itself (special tokens, ids below ``len(SPECIALS)``, are not read). Its expert probabilities are P(group) x P(expert | group); a token's top-k
    experts compute it in every routed module. From the window's last token on, every token of a
    document goes where its opening is sent, as the served router sends a prompt. With a KV cache
    the tokens are kept in it under ``"router"``, so decoding routes as the full forward does."""

    def __init__(self, cfg: ModelConfig):
        m = cfg.moe
        if m.n_experts != len(DOMAINS):
            raise ValueError(f"moe.gate_scope 'model' routes over the router's {len(DOMAINS)} domains "
                             f"{list(DOMAINS)}; this model has {m.n_experts} experts")
        super().__init__(cfg.d_model, m.n_experts, m.top_k, context="doc", key="router", gated=False)
        self.window, self.doc_start_id, self.n_specials = m.router_window, m.doc_start_id, len(SPECIALS)
        self.classifier = RouterModel(RouterConfig(vocab_size=cfg.vocab_size, d_embed=m.router_embed,
                                                   n_bigram_buckets=m.router_buckets, hidden=m.router_hidden,
                                                   dropout=0.0, max_len=m.router_window, fold_caps=False))

    def openings(self, tokens_BT: torch.Tensor, cache: Any, step: Any, doc_BT: torch.Tensor,
                 opening_BW: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, W)``: each token's document opening as far as the token has seen it (-1: not yet).

        ``opening_BW`` (:func:`document_opening`; left-aligned ids, -1 pads): what is known in
        advance of the opening of each row's first document, read by all of that document's tokens;
        the rest of its opening they read from the row as they reach it. For a row that starts at
        ``<|bos|>`` (without a cache, or the prefill of empty slots): its known opening (a prompt,
        the report's routing prefix). For a row that starts mid-document (without a cache): the
        document's ids before the row."""
        B, T = tokens_BT.shape
        if cache is None:
            ids_BS, pos_BT = tokens_BT, torch.arange(T, device=tokens_BT.device).expand(B, T)
        else:
            ids_BS = cache.update_inputs(self.key, step, tokens_BT[..., None])[..., 0]
            pos_BT = torch.tensor(step.starts, device=tokens_BT.device)[:, None] + \
                torch.arange(T, device=tokens_BT.device)
        last = ids_BS.shape[1] - 1
        first_BT = doc_BT + (ids_BS.gather(1, doc_BT.clamp(max=last)) == self.doc_start_id).long()
        idx_BTW = first_BT[..., None] + torch.arange(self.window, device=tokens_BT.device)
        mask_BTW = idx_BTW <= pos_BT[..., None]
        ids_BTW = ids_BS.gather(1, idx_BTW.clamp(max=last).reshape(B, -1)).view(B, T, self.window)
        ids_BTW = ids_BTW.masked_fill(~mask_BTW, -1)
        if opening_BW is not None:
            if cache is not None and any(step.starts):
                raise ValueError("a document opening goes with a forward without a cache, or the prefill of empty slots")
            if opening_BW.shape != (B, self.window):
                raise ValueError(f"opening has shape {tuple(opening_BW.shape)}, expected {(B, self.window)}")
            w_W, t_T = torch.arange(self.window, device=tokens_BT.device), torch.arange(T, device=tokens_BT.device)
            have_B = (opening_BW >= 0).sum(1)
            at_bos_B = tokens_BT[:, 0] == self.doc_start_id
            # where the row holds its first document's w-th id: after its <|bos|>, or `have` ids
            # before the row (a row that continues a document)
            base_B = torch.where(at_bos_B, 1, -have_B)
            j_B1W = (w_W + base_B[:, None])[:, None, :]
            row_BTW = tokens_BT.gather(1, j_B1W.clamp(0, T - 1).expand(B, T, -1).reshape(B, -1)).view(B, T, -1)
            row_BTW = row_BTW.masked_fill((j_B1W < 0) | (j_B1W > t_T[:, None]), -1)
            known_BTW = torch.where(w_W < have_B[:, None, None], opening_BW[:, None, :].expand(B, T, -1), row_BTW)
            ids_BTW = torch.where((doc_BT == 0)[..., None], known_BTW, ids_BTW)
        # the chat template's role markers are not text it was trained on
        return ids_BTW.masked_fill(ids_BTW < self.n_specials, -1).reshape(B * T, -1)

    def choose(self, tokens_BT: torch.Tensor, cache: Any, step: Any, doc_BT: torch.Tensor,
               opening_BW: torch.Tensor | None = None) -> Routing:
        """Every token's routing, for all routed modules (an empty opening, a ``<|bos|>`` alone, reads
        as no tokens: the classifier's zero features)."""
        return self.route(self.openings(tokens_BT, cache, step, doc_BT, opening_BW))

    def route(self, opening_NW: torch.Tensor) -> Routing:
        """``opening_NW`` (:meth:`openings`) -> ``(log P(expert), P(expert), top-k weights renormalised,
        top-k experts)``."""
        out = self.classifier(opening_NW.clamp(min=0), opening_NW >= 0)
        _, logp_NE = hierarchical_log_probs(out.group_logits, out.expert_logits)
        probs_NE = logp_NE.exp()
        weights_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        return logp_NE, probs_NE, weights_NK / weights_NK.sum(dim=-1, keepdim=True), experts_NK


def document_opening(ids: Any, start: int, window: int, doc_start_id: int,
                     marks: np.ndarray | None = None, known: bool = False) -> list[int]:
    """What :meth:`DocRouter.openings` is given for a row of ``ids`` that begins at ``start``, padded
    with -1 to ``window``. A row that begins mid-document: that document's ids before the row (after
    its latest ``doc_start_id``, else from ``ids[0]``), at most ``window``. A row that begins at
    ``doc_start_id``: nothing, or with ``known`` the document's first ``window`` ids (a prompt, or the
    report's routing prefix: known before anything is generated or scored). ``marks``: the sorted
    positions of ``doc_start_id`` in ``ids``, if known (a long packed array)."""
    if marks is None:
        marks = np.flatnonzero(np.asarray(ids[:start + 1]) == doc_start_id)
    i = int(np.searchsorted(marks, start, side="right")) - 1
    if i >= 0 and int(marks[i]) == start:  # the row starts a document
        taken = []
        for t in (ids[start + 1:start + 1 + window] if known else ()):
            if int(t) == doc_start_id:  # the next document
                break
            taken.append(int(t))
    else:
        first = 0 if i < 0 else int(marks[i]) + 1
        taken = [int(t) for t in ids[first:min(first + window, start)]]
    return taken + [-1] * (window - len(taken))


def dense_gates(weights_NK: torch.Tensor, experts_NK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``(N, E)``: each token's weight on every expert, zero off its top-k."""
    return torch.zeros(len(weights_NK), n_experts, dtype=weights_NK.dtype,
                       device=weights_NK.device).scatter_(1, experts_NK, weights_NK)


class RoutedEmbedding(Routed):
    """Input embeddings that are ``n_experts`` experts (``moe.routed_embeddings``); returns ``(h, MoEAux)``.

    The router reads (through ``gate_context``) ``shared``, one more embedding of the tokens; a
    token's input is its top-k experts' rows weighted by the gate. With one expert per token it is
    that expert's embedding exactly. ``weight`` is the shared matrix (where a caller asks an
    embedding for its device or dtype)."""

    def __init__(self, vocab_size: int, d_model: int, n_experts: int, top_k: int, *, context: str = "token",
                 gated: bool = True):
        super().__init__(d_model, n_experts, top_k, context=context, key="embed", gated=gated)
        self.shared = nn.Embedding(vocab_size, d_model)
        self.experts = nn.ModuleList(nn.Embedding(vocab_size, d_model) for _ in range(n_experts))

    @property
    def weight(self) -> torch.Tensor:
        return self.shared.weight

    def forward(self, tokens_BT: torch.Tensor, cache: Any = None, step: Any = None,
                doc_BT: torch.Tensor | None = None, routing: Routing | None = None) -> tuple[torch.Tensor, MoEAux]:
        B, T = tokens_BT.shape
        if isinstance(routing, Chosen) and routing.single is not None:
            return self.experts[routing.single](tokens_BT), routing.aux
        shared_BTD = self.shared(tokens_BT) if routing is None else None
        logits_NE, probs_NE, weights_NK, experts_NK = self.decide(shared_BTD, cache, step, doc_BT, routing)
        g_NE = dense_gates(weights_NK, experts_NK, self.n_experts).to(self.shared.weight.dtype)
        ids_N = tokens_BT.reshape(-1)
        h_ND = sum(g_NE[:, e, None] * self.experts[e](ids_N) for e in experts_NK.unique().tolist())
        return h_ND.view(B, T, -1), self.aux(logits_NE, probs_NE, experts_NK, routing)


class RoutedHead(Routed):
    """An LM head of ``n_experts`` output matrices; returns ``(log-probs (B, T, V), MoEAux)``.

    A token's next-token distribution is the mixture of its top-k experts' softmaxes,
    ``log sum_k w_k softmax(W_k x)`` (a "mixture of softmaxes"), computed per expert on the tokens
    routed to it. With one expert per token it is that expert's head exactly. Log-probabilities
    are valid logits (their softmax is the mixture), so sampling and scoring need nothing else."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.moe.n_experts, cfg.moe.top_k, context=cfg.moe.gate_context, key="head",
                         gated=not cfg.model_router)
        self.experts = nn.ModuleList(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
                                     for _ in range(cfg.moe.n_experts))

    def forward(self, x_BTD: torch.Tensor, gate_BTD: torch.Tensor | None = None,
                routing: Routing | None = None) -> tuple[torch.Tensor, MoEAux]:
        """``gate_BTD``: what the gate reads, when not ``x_BTD`` itself (:meth:`gate_input`);
        ``routing``: the model router's choice instead."""
        B, T, D = x_BTD.shape
        if isinstance(routing, Chosen) and routing.single is not None:
            return self.experts[routing.single](x_BTD).float().log_softmax(-1), routing.aux
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE, probs_NE, weights_NK, experts_NK = routing if routing is not None else \
            self.route(x_ND if gate_BTD is None else gate_BTD.reshape(B * T, D))
        V = self.experts[0].out_features
        logp_NKV = x_ND.new_empty(B * T, experts_NK.shape[1], V, dtype=torch.float32)
        for e in range(self.n_experts):
            tok, k = (experts_NK == e).nonzero(as_tuple=True)
            if len(tok):
                logp_NKV[tok, k] = self.experts[e](x_ND[tok]).float().log_softmax(-1)
        logp_NV = torch.logsumexp(logp_NKV + weights_NK.log().unsqueeze(-1), dim=1)
        return logp_NV.view(B, T, V), self.aux(logits_NE, probs_NE, experts_NK, routing)


class MoEFFN(Routed):
    """Top-k routed SwiGLU experts plus optional shared experts; returns ``(y, MoEAux)``."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        m = cfg.moe
        super().__init__(cfg.d_model, m.n_experts, m.top_k, context=m.gate_context, key=f"ffn{layer_id}",
                         gated=not cfg.model_router)
        hidden = cfg.expert_hidden_dim
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, hidden) for _ in range(m.n_experts))
        self.shared_expert = SwiGLU(cfg.d_model, m.n_shared * hidden) if m.n_shared else None

    def forward(self, x_BTD: torch.Tensor, cache: Any = None, step: Any = None,
                doc_BT: torch.Tensor | None = None, routing: Routing | None = None) -> tuple[torch.Tensor, MoEAux]:
        B, T, D = x_BTD.shape
        if isinstance(routing, Chosen) and routing.single is not None and self.shared_expert is None:
            return self.experts[routing.single](x_BTD), routing.aux
        x_ND = x_BTD.reshape(B * T, D)  # (N, D)
        logits_NE, probs_NE, weights_NK, experts_NK = self.decide(x_BTD, cache, step, doc_BT, routing)

        # dispatch: sort the N*K assignments by expert so each expert sees one contiguous group
        experts_A = experts_NK.flatten()  # (A,)
        order_A = torch.argsort(experts_A, stable=True)
        token_A = order_A // experts_NK.shape[1]  # the token each sorted assignment came from
        counts_E = torch.bincount(experts_A, minlength=self.n_experts)
        x_AD = x_ND[token_A]  # (A, D) gathered tokens, grouped by expert
        out_AD = torch.empty_like(x_AD)
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                out_AD[start:start + n] = self.experts[e](x_AD[start:start + n])
            start += n
        out_AD = out_AD * weights_NK.flatten()[order_A].unsqueeze(-1).to(out_AD.dtype)
        y_ND = torch.zeros_like(x_ND).index_add_(0, token_A, out_AD)  # combine the K outputs per token

        if self.shared_expert is not None:
            y_ND = y_ND + self.shared_expert(x_ND)
        aux = routing.aux if isinstance(routing, Chosen) else MoEAux(
            aux_loss=load_balancing_loss(probs_NE, experts_NK), z_loss=router_z_loss(logits_NE), counts=counts_E)
        return y_ND.view(B, T, D), aux  # (B, T, D)
