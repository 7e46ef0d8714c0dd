"""Branch-Train-MiX: merge the domain experts into one token-level mixture-of-experts LM.

Following Sukhbaatar et al. (2024), "Branch-Train-MiX": every layer's FFN becomes an MoE layer
whose routed experts are the domain experts' FFNs (expert *i* of every layer is domain *i*'s FFN),
and everything else (embeddings, attention, norms, the LM head) is the average of the experts'.
The per-layer routers (``gate``) start at zero, so before any fine-tuning every expert is
equally likely and the top-k are the first k; a short fine-tune on the mixed corpus then learns
them (``train: routers``) or everything (``train: all``).

Embedding rows (and an untied LM head's) are averaged per token, weighted by how often each expert
saw that token in its training data (``token_weights``): branched at a high learning rate, an
expert's rows for its own domain's tokens move far from the seed's (by 60-95% of their norm on
``standard``), and a plain mean hands every domain-specific token a blend dominated by experts
that never trained it. On ``standard`` that plain mean alone cost the math expert 0.82 nats per
token of its own test text; the per-token weighting cost it 0.07 (``bench.merge_diagnosis``).

The merged model is an ordinary ``experts.model.Transformer`` with ``ffn="moe"``, ``n_shared=0``
and expert width = the dense FFN's: it loads, trains and generates like any LM checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from experts.checkpoint import CheckpointError
from experts.config import ModelConfig, MoEConfig
from experts.model import Transformer

_FFN = re.compile(r"^layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight$")
_PER_TOKEN = ("tok_embeddings.weight", "output.weight")  # (V, D): one row per token


def merged_config(cfg: ModelConfig, n_experts: int, top_k: int) -> ModelConfig:
    """The MoE config whose routed experts are ``n_experts`` copies of ``cfg``'s dense FFN."""
    if cfg.ffn != "dense":
        raise CheckpointError(f"only dense experts can be merged (this one has ffn={cfg.ffn!r})")
    return cfg.replace(ffn="moe", moe=MoEConfig(n_experts=n_experts, top_k=top_k, n_shared=0,
                                                expert_hidden=cfg.hidden_dim))


def token_weights(token_paths: Sequence[str], vocab_size: int) -> torch.Tensor:
    """``(E, V)``: each expert's share of every token's occurrences in the experts' training tokens
    (``token_paths[i]``: expert i's packed tokens), with add-one smoothing so that a token nobody saw
    gets the plain mean."""
    from training.data.packing import load_tokens

    counts = torch.stack([torch.bincount(torch.from_numpy(np.asarray(load_tokens(p), dtype=np.int64)),
                                         minlength=vocab_size)[:vocab_size].double() for p in token_paths]) + 1.0
    return (counts / counts.sum(0, keepdim=True)).float()


@torch.no_grad()
def merge_models(models: Sequence[Transformer], top_k: int, token_weights: torch.Tensor | None = None) -> Transformer:
    """One MoE Transformer from dense ``models`` of one config (see the module docstring); embedding
    rows are weighted per token by ``token_weights`` ``(E, V)`` (columns sum to 1), else a plain mean."""
    if not models:
        raise ValueError("merge_models needs at least one expert")
    cfg = models[0].cfg
    if any(m.cfg != cfg for m in models):
        raise CheckpointError("the experts to merge must share one model config")
    merged = Transformer(merged_config(cfg, len(models), top_k))
    states = [m.state_dict() for m in models]
    target = merged.state_dict()
    for name in states[0]:
        ffn = _FFN.match(name)
        if ffn:
            layer, w = ffn.groups()
            for i, sd in enumerate(states):
                target[f"layers.{layer}.feed_forward.experts.{i}.{w}.weight"].copy_(sd[name])
        elif name in _PER_TOKEN and token_weights is not None:
            stacked = torch.stack([sd[name].float() for sd in states])  # (E, V, D)
            target[name].copy_((stacked * token_weights[:, :, None]).sum(0).to(target[name].dtype))
        else:
            target[name].copy_(torch.stack([sd[name].float() for sd in states]).mean(0).to(target[name].dtype))
    for name, p in target.items():
        if name.endswith("feed_forward.gate.weight"):
            p.zero_()
    merged.load_state_dict(target)
    return merged


def freeze_all_but_routers(model: torch.nn.Module) -> int:
    """``train: routers``: only the MoE gates learn. Returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("feed_forward.gate.weight"))
        n += p.numel() if p.requires_grad else 0
    return n


@torch.no_grad()
def routing_shares(model: Transformer, docs: dict[str, list[list[int]]], experts: Sequence[str],
                   device: torch.device | str = "cpu") -> dict:
    """How the merged model's token-level routers spread each domain's tokens over the experts.

    ``docs``: domain -> token ids of its test documents; ``experts``: the domain each routed expert
    came from (``merged_from``). Per layer and domain, ``top_k[layer][domain][expert]`` is the share
    of the domain's tokens whose top-k includes that expert, and ``own[layer][domain]`` the share
    sent to the domain's own expert (chance: ``top_k / n_experts``)."""
    ffns = [layer.feed_forward for layer in model.layers]
    picked: list[list[torch.Tensor]] = [[] for _ in ffns]

    def keep(i: int):
        def hook(mod, inp, _out):
            x = inp[0]
            picked[i].append(mod.route(x.reshape(-1, x.shape[-1]))[3].cpu())  # (N, K) experts chosen
        return hook

    handles = [f.register_forward_hook(keep(i)) for i, f in enumerate(ffns)]
    top_k: list[dict[str, dict[str, float]]] = [{} for _ in ffns]
    try:
        for d, seqs in docs.items():
            for p in picked:
                p.clear()
            for ids in seqs:
                model(torch.tensor([ids[: model.cfg.max_seq_len]], device=device))
            for i, p in enumerate(picked):
                chosen = torch.cat(p) if p else torch.zeros(0, model.cfg.moe.top_k, dtype=torch.long)
                hits = torch.zeros(len(experts)).index_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
                top_k[i][d] = {e: round(float(h) / max(1, len(chosen)), 4) for e, h in zip(experts, hits)}
    finally:
        for h in handles:
            h.remove()
    own = [{d: shares[d].get(d) for d in shares} for shares in top_k]
    k = model.cfg.moe.top_k
    return {"experts": list(experts), "top_k": k, "chance": round(k / len(experts), 4), "top_k_share": top_k,
            "own": own}
