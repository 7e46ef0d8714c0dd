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

from experts.scoring import token_logprobs
from router.policy import Decision, check_policy_args, decide, default_decision


def _max_len(model: nn.Module) -> int:
    return int(getattr(getattr(model, "cfg", None), "max_seq_len", 512))


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
            scores = token_logprobs(model, seqs, batch_size=self.batch_size, pad_id=pad)
            cols.append(torch.stack([s.logprobs.sum() for s in scores]) if scores else torch.zeros(0))
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
