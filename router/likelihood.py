"""A reference router of the Branch-Train-Merge kind (Li et al., 2022): ask every expert LM.

P(expert | prompt) is proportional to P(prompt | expert) x P(expert); with a uniform prior that is
the softmax over experts of the prompt's summed token log-likelihood. It needs one forward pass
of every expert per prompt, which is what the learned router avoids; it is the yardstick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from router.policy import Decision, check_policy_args, decide, default_decision


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_len(model: nn.Module) -> int:
    return int(getattr(getattr(model, "cfg", None), "max_seq_len", 512))


@torch.no_grad()
def token_logprobs(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..n-1 (n-1 values, fp32, on CPU).

    Long sequences are scored in windows of the model's ``max_seq_len`` that overlap by one token,
    so every token is scored exactly once (with the context of its own window).
    """
    window = _max_len(model)
    out = []
    for start in range(0, max(0, len(ids) - 1), window - 1):
        chunk = torch.tensor([list(ids[start: start + window])], device=_device(model))  # (1, W)
        logits = model(chunk).logits[0, :-1].float()  # (W-1, V)
        out.append(torch.log_softmax(logits, -1).gather(-1, chunk[0, 1:, None])[:, 0].cpu())  # (W-1,)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def batch_loglik(model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Summed log-likelihood (N,) of each sequence after its first token; right-padded, one forward pass."""
    t = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), t), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)  # (N, T)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = torch.tensor(list(s)), True
    tokens = tokens.to(_device(model))
    logp = torch.log_softmax(model(tokens).logits[:, :-1].float(), -1)  # (N, T-1, V)
    lp = logp.gather(-1, tokens[:, 1:, None])[..., 0].cpu()  # (N, T-1)
    return (lp * mask[:, 1:]).sum(-1)  # causal: padding on the right never affects earlier tokens


class LikelihoodRouter:
    """Route by the posterior over experts of the prompt's likelihood (uniform prior)."""

    def __init__(self, experts: Mapping[str, nn.Module], tokenizer: Any, *, max_tokens: int = 256,
                 threshold: float = 0.5, top_k: int = 2, batch_size: int = 16) -> None:
        check_policy_args(threshold, top_k)
        if not experts:
            raise ValueError("LikelihoodRouter needs at least one expert model")
        self.experts, self.tokenizer = dict(experts), tokenizer
        self.max_tokens = min([max_tokens, *(_max_len(m) for m in experts.values())])
        self.threshold, self.top_k, self.batch_size = threshold, top_k, batch_size

    def _ids(self, prompt: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_id", None)
        ids = self.tokenizer.encode(prompt[: 16 * self.max_tokens])
        return ([bos] if bos is not None else []) + ids[: self.max_tokens - (bos is not None)]

    def log_likelihoods(self, prompts: Sequence[str]) -> torch.Tensor:
        """Summed prompt log-likelihood (N, n_experts) under each expert, columns in ``self.experts`` order."""
        seqs = [self._ids(p) for p in prompts]
        pad = getattr(self.tokenizer, "pad_id", 0)
        cols = []
        for model in self.experts.values():
            chunks = [batch_loglik(model, seqs[i: i + self.batch_size], pad)
                      for i in range(0, len(seqs), self.batch_size)]
            cols.append(torch.cat(chunks) if chunks else torch.zeros(0))
        return torch.stack(cols, dim=1)  # (N, n_experts)

    def expert_probs(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """Posterior over experts: softmax of the summed log-likelihoods."""
        post = torch.softmax(self.log_likelihoods(prompts).double(), dim=-1)  # (N, n_experts)
        return [dict(zip(self.experts, row)) for row in post.tolist()]

    def route_batch(self, prompts: Sequence[str]) -> list[Decision]:
        live = [i for i, p in enumerate(prompts) if p and p.strip()]
        out: list[Decision] = [default_decision()] * len(prompts)
        for i, probs in zip(live, self.expert_probs([prompts[i] for i in live]) if live else []):
            out[i] = decide(probs, threshold=self.threshold, top_k=self.top_k)
        return out

    def route(self, prompt: str) -> Decision:
        return self.route_batch([prompt])[0]
