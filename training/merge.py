"""Branch-Train-MiX: merge the domain experts into one token-level mixture-of-experts LM.

Following Sukhbaatar et al. (2024), "Branch-Train-MiX": every layer's FFN becomes an MoE layer
whose routed experts are the domain experts' FFNs (expert *i* of every layer is domain *i*'s FFN),
and everything else (embeddings, attention, norms, the LM head) is the average of the experts'.
The per-layer routers (``gate``) start at zero (``gate_init: zero``, as in the paper: before any
fine-tuning every expert is equally likely and the top-k are the first k), or as nearest-centroid
classifiers of the domains (``gate_init: centroids``, :func:`centroid_gates`); a short fine-tune on
the mixed corpus then learns them (``train: routers``) or everything (``train: all``).

Embedding rows (and an untied LM head's) are averaged per token, weighted by how often each expert
saw that token in its training data (``token_weights``): branched at a high learning rate, an
expert's rows for its own domain's tokens move far from the seed's (by 60-95% of their norm on
``standard``), and a plain mean hands every domain-specific token a blend dominated by experts
that never trained it. On ``standard`` that plain mean alone cost the math expert 0.82 nats per
token of its own test text; the per-token weighting cost it 0.07 (``bench.merge_diagnosis``).

``route: all`` goes further than the paper: each layer's attention projections and the LM head
become routed experts as well (``MoEConfig.routed_attention``, ``routed_head``; a token's next-token
distribution is the mixture of its top-k heads' softmaxes), the weight of every RMSNorm is folded
into the projection after it, and only the input embeddings are averaged (per token, weighted).
At this scale the averaged parts hold most of what a branch learnt: on ``standard`` the tied
embedding/head matrix is three quarters of an expert's weights, and as the output head its
weighted mean cost the experts 0.06-0.33 nats per token, as the input embedding 0.01-0.07.

``route: full`` routes the input embeddings as well (``MoEConfig.routed_embeddings``): their router
reads the running mean (``gate_context``) of the per-token weighted mean embedding, and a token's
input is its top-k experts' own rows, so that every weight of every expert is kept and a merged
model that sends all tokens to expert ``i`` computes expert ``i`` exactly.

``gate_scope: model`` takes the routers out of the routed modules: the run's trained router
(``experts.moe.DocRouter``, frozen) reads the opening of each token's document, as the served router
reads a prompt, and chooses the token's experts once for every routed module, as DEMix layers route
by domain (Gururangan et al. 2021). With ``route: full`` and top-1 a document is computed by its own
expert alone until the fine-tune moves the weights; on ``standard`` that merge, not fine-tuned, scored a
mixed-test perplexity of 26.04 against 42.55 for per-layer routers fitted to the domain
(``bench.merge_variants``). A prompt is routed from its whole opening, known before anything is
generated (``Transformer.known_openings``), and a window that starts mid-document (in the
fine-tune, or a long document scored in windows) from its document's opening
(``Transformer.forward(opening=...)``).

The merged model is an ordinary ``experts.model.Transformer`` with ``ffn="moe"``, ``n_shared=0``
and expert width = the dense FFN's: it loads, trains and generates like any LM checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from experts.checkpoint import CheckpointError
from experts.config import ModelConfig, MoEConfig
from experts.model import Transformer
from experts.moe import Routed

_FFN = re.compile(r"^layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight$")
_PER_TOKEN = ("tok_embeddings.weight", "output.weight")  # (V, D): one row per token


ROUTES = ("ffn", "all", "full")


def merged_config(cfg: ModelConfig, n_experts: int, top_k: int, route: str = "ffn",
                  gate_context: str = "token", doc_start_id: int = 1, gate_scope: str = "layer") -> ModelConfig:
    """The MoE config whose routed experts are ``n_experts`` copies of ``cfg``'s dense FFN (and with
    ``route="all"`` of its attention projections and LM head too), routed by ``gate_context``
    (``"doc"``: documents start at ``doc_start_id``, the tokenizer's ``<|bos|>``)."""
    if cfg.ffn != "dense":
        raise CheckpointError(f"only dense experts can be merged (this one has ffn={cfg.ffn!r})")
    if route not in ROUTES:
        raise ValueError(f"merge route={route!r} is invalid: choose one of {list(ROUTES)}")
    every = route in ("all", "full")
    from router.prefix import ROUTING_PREFIX_TOKENS  # the model router reads what the report's router reads

    return cfg.replace(ffn="moe", tie_embeddings=cfg.tie_embeddings and not every,
                       moe=MoEConfig(n_experts=n_experts, top_k=top_k, n_shared=0, expert_hidden=cfg.hidden_dim,
                                     routed_attention=every, routed_head=every, routed_embeddings=route == "full",
                                     gate_context=gate_context, doc_start_id=doc_start_id, gate_scope=gate_scope,
                                     router_window=ROUTING_PREFIX_TOKENS))


def route_of(cfg: ModelConfig) -> str:
    """The ``route`` that :func:`merged_config` gave a merged model of this config."""
    return "full" if cfg.routed_embeddings else "all" if cfg.routed_head else "ffn"


def token_weights(token_paths: Sequence[str], vocab_size: int) -> torch.Tensor:
    """``(E, V)``: each expert's share of every token's occurrences in the experts' training tokens
    (``token_paths[i]``: expert i's packed tokens), with add-one smoothing so that a token nobody saw
    gets the plain mean."""
    from training.data.packing import load_tokens

    counts = torch.stack([torch.bincount(torch.from_numpy(np.asarray(load_tokens(p), dtype=np.int64)),
                                         minlength=vocab_size)[:vocab_size].double() for p in token_paths]) + 1.0
    return (counts / counts.sum(0, keepdim=True)).float()


def weighted_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    """The plain mean, or with ``weights (E, V)`` the per-row weighted mean of ``(V, D)`` tensors."""
    stacked = torch.stack([t.float() for t in tensors])
    return stacked.mean(0) if weights is None else (stacked * weights[:, :, None]).sum(0)


def _routed_all(states: Sequence[dict[str, torch.Tensor]], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, value)`` of a ``route="all"`` merge for everything routed: every expert's attention,
    FFN and head, with the weight of the RMSNorm in front of each folded into it
    (``W diag(g) x̂ = W (g ⊙ x̂)``), so that the merged norms hold ones and lose nothing."""
    for i, sd in enumerate(states):
        for layer in range(cfg.n_layers):
            pre = f"layers.{layer}."
            g_attn, g_ffn = sd[pre + "attention_norm.weight"], sd[pre + "ffn_norm.weight"]
            att = f"{pre}attention.experts.{i}."
            yield att + "wqkv.weight", sd[pre + "attention.wqkv.weight"] * g_attn[None, :]
            yield att + "wo.weight", sd[pre + "attention.wo.weight"]
            for norm in ("q_norm", "k_norm") if cfg.qk_norm else ():
                yield att + f"{norm}.weight", sd[pre + f"attention.{norm}.weight"]
            ffn = f"{pre}feed_forward.experts.{i}."
            yield ffn + "w1.weight", sd[pre + "feed_forward.w1.weight"] * g_ffn[None, :]
            yield ffn + "w3.weight", sd[pre + "feed_forward.w3.weight"] * g_ffn[None, :]
            yield ffn + "w2.weight", sd[pre + "feed_forward.w2.weight"]
        head = sd["tok_embeddings.weight"] if cfg.tie_embeddings else sd["output.weight"]
        yield f"output.experts.{i}.weight", head * sd["norm.weight"][None, :]
        yield f"tok_embeddings.experts.{i}.weight", sd["tok_embeddings.weight"]  # used by route="full"


@torch.no_grad()
def merge_models(models: Sequence[Transformer], top_k: int, token_weights: torch.Tensor | None = None,
                 route: str = "ffn", gate_context: str = "token", doc_start_id: int = 1,
                 gate_scope: str = "layer", router: torch.nn.Module | None = None) -> Transformer:
    """One MoE Transformer from dense ``models`` of one config (see the module docstring); embedding
    rows are weighted per token by ``token_weights`` ``(E, V)`` (columns sum to 1), else a plain mean.

    ``route="ffn"`` (Branch-Train-MiX as published): the FFNs become routed experts and the rest is
    averaged. ``route="all"``: the attention projections and the LM head are routed experts too, the
    norms are folded into them, and only the input embeddings are averaged; sending every token to
    expert ``i`` then computes expert ``i`` up to those embeddings. ``route="full"``: the input
    embeddings are routed experts too, and their router reads the weighted mean embedding; expert
    ``i`` alone then computes expert ``i`` exactly.

    ``gate_scope="model"``: no routed module has a router; ``router`` (the run's trained
    ``router.model.RouterModel``, over the five domains in order) chooses each token's experts for all
    of them from its document's opening (``experts.moe.DocRouter``)."""
    if not models:
        raise ValueError("merge_models needs at least one expert")
    cfg = models[0].cfg
    if any(m.cfg != cfg for m in models):
        raise CheckpointError("the experts to merge must share one model config")
    merged = Transformer(merged_config(cfg, len(models), top_k, route, gate_context, doc_start_id, gate_scope))
    states = [m.state_dict() for m in models]
    target = merged.state_dict()
    if route in ("all", "full"):
        for name, value in _routed_all(states, cfg):
            if name in target:
                target[name].copy_(value.to(target[name].dtype))
        mean = "tok_embeddings.shared.weight" if route == "full" else "tok_embeddings.weight"
        target[mean].copy_(weighted_mean([sd["tok_embeddings.weight"] for sd in states], token_weights))
        for name, p in target.items():
            if name.endswith("norm.weight") and ".experts." not in name:
                p.fill_(1.0)
    else:
        for name in states[0]:
            ffn = _FFN.match(name)
            if ffn:
                layer, w = ffn.groups()
                for i, sd in enumerate(states):
                    target[f"layers.{layer}.feed_forward.experts.{i}.{w}.weight"].copy_(sd[name])
            else:
                weights = token_weights if name in _PER_TOKEN else None
                target[name].copy_(weighted_mean([sd[name] for sd in states], weights).to(target[name].dtype))
    for name, p in target.items():
        if name.endswith("gate.weight"):
            p.zero_()
    if merged.router is not None:
        if router is None:
            raise ValueError("a merge with gate_scope 'model' needs the run's trained router (router=)")
        mine = merged.router.classifier
        if any(getattr(router.cfg, k) != getattr(mine.cfg, k) for k in ("vocab_size", "d_embed", "n_bigram_buckets", "hidden")):
            raise CheckpointError(f"the router ({router.cfg}) differs in size from the merged model's ({mine.cfg})")
        for name, value in router.state_dict().items():
            target[f"router.classifier.{name}"].copy_(value)
    merged.load_state_dict(target)
    return merged


@contextmanager
def shadowed(modules: Sequence[torch.nn.Module], name: str,
             make: Callable[[int, Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Within the block, method ``name`` of ``modules[i]`` is ``make(i, the method as it was)``: an
    instance attribute that shadows it (and whatever shadowed it before), restored afterwards."""
    before = [m.__dict__.get(name) for m in modules]
    for i, m in enumerate(modules):
        setattr(m, name, make(i, getattr(m, name)))
    try:
        yield
    finally:
        for m, old in zip(modules, before):
            delattr(m, name)
            if old is not None:
                setattr(m, name, old)


@contextmanager
def forced_route(model: Transformer, expert: int) -> Iterator[Transformer]:
    """Within the block, every routed module of ``model`` (FFNs, and attention and head when they are
    routed) sends every token to ``expert`` alone."""
    n = model.cfg.moe.n_experts

    def route(x: torch.Tensor):
        probs = torch.zeros(len(x), n, device=x.device)
        probs[:, expert] = 1.0
        return (torch.zeros_like(probs), probs, torch.ones(len(x), 1, device=x.device),
                torch.full((len(x), 1), expert, device=x.device))

    with shadowed([m for m in model.modules() if isinstance(m, Routed)], "route", lambda _i, _own: route):
        yield model


@torch.no_grad()
def _domain_inputs(model: Transformer, texts: Sequence[torch.Tensor]) -> list[tuple[Routed, list[torch.Tensor]]]:
    """Every routed module with what its gate reads, ``(N, D)`` per domain, when ``texts[i]`` (token
    windows ``(B, T)`` of expert ``i``'s training text) runs through the merged model with its tokens
    sent to their own expert (:func:`forced_route`)."""
    routed = [m for m in model.modules() if isinstance(m, Routed) and m.gate is not None]
    seen: list[list[torch.Tensor]] = [[] for _ in routed]  # per module: one (N, D) block per domain

    def recording(i: int, read: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def gate_input(*args: Any) -> torch.Tensor:
            out = read(*args)
            seen[i].append(out.reshape(-1, out.shape[-1]).float())
            return out
        return gate_input

    with shadowed(routed, "gate_input", recording):
        for e, x in enumerate(texts):
            with forced_route(model, e):
                model(x.to(model.tok_embeddings.weight.device))
    return list(zip(routed, seen))


@torch.no_grad()
def centroid_gates(model: Transformer, texts: Sequence[torch.Tensor], spread: float = 2.0) -> None:
    """Start every router as a nearest-centroid classifier of the experts' domains.

    ``texts[i]``: token windows of expert ``i``'s training text (:func:`_domain_inputs`). Gate row
    ``i`` of a module is the unit direction from the mean input over all domains to the mean input
    of domain ``i``, scaled so that the logits of the collected inputs have standard deviation
    ``spread``: from its first step the merged model sends most of a domain's tokens to that
    domain's expert, instead of the zero gates' first k experts."""
    for f, xs in _domain_inputs(model, texts):
        c = torch.stack([x.mean(0) for x in xs])  # (E, D): each domain's mean input
        dirs = c - c.mean(0, keepdim=True)
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp(min=1e-8)
        scale = spread / (torch.cat(xs) @ dirs.T).std().clamp(min=1e-8)
        f.gate.weight.copy_((scale * dirs).to(f.gate.weight.dtype))


def fitted_gates(model: Transformer, texts: Sequence[torch.Tensor], l2: float = 1e-3, iters: int = 100) -> None:
    """Start every router as a linear classifier of the experts' domains, fitted to what it reads.

    The inputs are collected as for :func:`centroid_gates`; each gate is then the multinomial
    logistic regression (no bias, as the gate has none; ``l2`` times the squared norm of the weights
    added to the mean cross-entropy) of the domain from the input, fitted by L-BFGS. Unlike the
    centroids it weighs the directions in which domains differ against how much each varies, and its
    probabilities are fitted too, which matters where the top-k outputs are mixed by them."""
    for f, xs in _domain_inputs(model, texts):
        x = torch.cat(xs)
        y = torch.cat([torch.full((len(b),), e, dtype=torch.long) for e, b in enumerate(xs)])
        w = torch.zeros(len(xs), x.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=iters, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w.T, y) + l2 * w.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            f.gate.weight.copy_(w.detach().to(f.gate.weight.dtype))


GATE_INITS = {"centroids": centroid_gates, "fitted": fitted_gates}  # merge.gate_init -> how (besides "zero")
# the training windows each start reads per domain, (count, length; None: the run's seq_len). A fitted
# gate reading the running mean sees nearly one input per window, so it needs many: on standard,
# 256 x 64 tokens per domain gave mean test nats 3.80, 64 x 256 gave 3.82 and 8 x 256 gave 3.99
GATE_WINDOWS = {"centroids": (8, None), "fitted": (256, 64)}


def start_gates(model: Transformer, init: str, token_paths: Sequence[str], seq_len: int, seed: int = 0) -> None:
    """Set the routers of a fresh merge as ``init`` (``merge.gate_init``) says, from windows of each
    expert's training tokens (``token_paths[i]``: expert ``i``'s)."""
    if init == "zero" or model.router is not None:  # a model router comes trained
        return
    count, length = GATE_WINDOWS[init]
    GATE_INITS[init](model, [sample_windows(str(p), count, length or seq_len, seed=seed + i)
                             for i, p in enumerate(token_paths)])


def sample_windows(token_path: str, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``(n, length)`` token windows at seeded random places of a packed token file."""
    from training.data.packing import load_tokens

    tokens = load_tokens(token_path)
    starts = np.random.default_rng(seed).integers(0, max(1, len(tokens) - length), n)
    return torch.tensor(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


def freeze_all_but_routers(model: torch.nn.Module) -> int:
    """``train: routers``: only the MoE gates learn. Returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("gate.weight"))
        n += p.numel() if p.requires_grad else 0
    return n


@torch.no_grad()
def routing_shares(model: Transformer, docs: dict[str, list[list[int]]], experts: Sequence[str],
                   device: torch.device | str = "cpu") -> dict:
    """How the merged model's token-level routers spread each domain's tokens over the experts.

    ``docs``: domain -> token ids of its test documents; ``experts``: the domain each routed expert
    came from (``merged_from``). Per layer and domain, ``top_k[layer][domain][expert]`` is the share
    of the domain's tokens whose top-k includes that expert, and ``own[layer][domain]`` the share
    sent to the domain's own expert (chance: ``top_k / n_experts``). Under a model router
    (``moe.gate_scope == "model"``) every layer's row is that router's."""
    ffns = [layer.feed_forward for layer in model.layers]
    routers = [model.router] if model.router is not None else ffns
    picked: list[list[torch.Tensor]] = [[] for _ in routers]

    def keep(i: int, route: Callable[[torch.Tensor], tuple]) -> Callable[[torch.Tensor], tuple]:
        def recorded(x_ND: torch.Tensor) -> tuple:  # what the gate read (its context included)
            out = route(x_ND)
            picked[i].append(out[3].cpu())  # (N, K) experts chosen
            return out
        return recorded

    top_k: list[dict[str, dict[str, float]]] = [{} for _ in routers]
    with shadowed(routers, "route", keep):
        for d, seqs in docs.items():
            for p in picked:
                p.clear()
            for ids in seqs:  # a model router reads each document's opening before its tokens, as scoring does
                ids = ids[: model.cfg.max_seq_len]
                model(torch.tensor([ids], device=device), opening=model.known_openings([ids]))
            for i, p in enumerate(picked):
                chosen = torch.cat(p) if p else torch.zeros(0, model.cfg.moe.top_k, dtype=torch.long)
                hits = torch.zeros(len(experts)).index_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
                top_k[i][d] = {e: round(float(h) / max(1, len(chosen)), 4) for e, h in zip(experts, hits)}
    top_k = top_k * (len(ffns) // len(routers))
    own = [{d: shares[d].get(d) for d in shares} for shares in top_k]
    k = model.cfg.moe.top_k
    return {"experts": list(experts), "top_k": k, "chance": round(k / len(experts), 4), "top_k_share": top_k,
            "own": own}
