"""The language-modelling task: next-token cross-entropy plus the MoE auxiliary losses.

One :class:`LMTask` trains an expert on one domain, or a generalist (dense or token-MoE) or the
seed LM on the union of several domains (batches cycle through the domains, so each sees an equal
share). With ``init_from`` the model starts from a finished checkpoint's weights (an expert branched
from the seed) instead of a random initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experts.checkpoint import CheckpointError, load_lm, save_lm
from experts.config import ModelConfig
from training.data.sft import IGNORE

Batch = tuple[torch.Tensor, ...]  # (x (B, T), y (B, T)[, opening (B, W)]) int64


class MixedBatches:
    """Round-robin over several resumable iterators (batch ``k`` comes from source ``k % n``)."""

    def __init__(self, sources: Sequence[Any]) -> None:
        if not sources:
            raise ValueError("MixedBatches needs at least one source")
        self.sources, self.k = list(sources), 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = next(self.sources[self.k % len(self.sources)])
        self.k += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"MixedBatches state has {len(state['sources'])} sources, this one {len(self.sources)}")
        self.k = int(state["k"])
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)


def eval_windows(path: str | Path, batch_size: int, seq_len: int, max_batches: int,
                 opening_window: int = 0, doc_start_id: int = 1) -> list[Batch]:
    """Deterministic, evenly spaced, non-overlapping windows of a packed split (for val / test);
    with ``opening_window`` each batch carries its windows' document openings, as ``TokenBatches``."""
    from training.data.packing import load_tokens, window_openings

    tokens = load_tokens(path)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{path}: {len(tokens)} tokens, too few for one window of {seq_len + 1}")
    take = min(n_windows, batch_size * max_batches)
    idx = np.linspace(0, n_windows - 1, take).astype(np.int64)
    w = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in idx]).astype(np.int64)  # (N, T+1)
    w = torch.from_numpy(w)
    if opening_window:
        op = window_openings(tokens, idx * seq_len, opening_window, doc_start_id)
        return [(w[i:i + batch_size, :-1], w[i:i + batch_size, 1:], op[i:i + batch_size])
                for i in range(0, take, batch_size)]
    return [(w[i:i + batch_size, :-1], w[i:i + batch_size, 1:]) for i in range(0, take, batch_size)]


class SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) whose backward is one pass: (softmax - onehot) / N.

    The same value and gradient as ``F.cross_entropy``, without its zero-filled (N, V) gradient
    and separate log-softmax backward: on this CPU those two took ~20% of a training step of the
    benchmark model (vocab 8192).
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
        lse_N = torch.logsumexp(logits_NV, dim=-1)
        ctx.save_for_backward(logits_NV, lse_N, target_N)
        return (lse_N - logits_NV.gather(1, target_N[:, None]).squeeze(1)).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits_NV, lse_N, target_N = ctx.saved_tensors
        g_NV = torch.sub(logits_NV, lse_N[:, None]).exp_()  # softmax, one (N, V) allocation
        g_NV[torch.arange(len(target_N), device=g_NV.device), target_N] -= 1.0
        return g_NV.mul_(grad / len(target_N)), None


def lm_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; logits (B, T, V), targets (B, T). Targets equal to ``IGNORE`` (the
    prompt of an instruction item) are left out of the loss and of the mean."""
    logits_NV, y_N = logits.reshape(-1, logits.size(-1)), y.reshape(-1)
    keep_N = y_N != IGNORE
    if not bool(keep_N.all()):
        if reduction != "mean":
            raise ValueError("lm_loss: targets with IGNORE need reduction='mean'")
        if not bool(keep_N.any()):
            return logits_NV.sum() * 0.0
        logits_NV, y_N = logits_NV[keep_N], y_N[keep_N]
    if reduction == "mean" and logits.requires_grad:
        return SoftmaxCrossEntropy.apply(logits_NV, y_N)
    return F.cross_entropy(logits_NV, y_N, reduction=reduction)


@dataclass
class LMTask:
    """Train a :class:`experts.model.Transformer` on packed token splits."""

    name: str
    out_dir: str
    model_cfg: ModelConfig
    train_paths: Sequence[str | Path]
    val_paths: Sequence[str | Path]
    batch_size: int
    seq_len: int
    seed: int = 0
    eval_batches: int = 10
    tokenizer_file: str | Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a finished LM checkpoint (same config) to start from
    merge_from: tuple[str, ...] = ()  # finished dense experts to merge into this MoE (training.merge)
    merge_tokens: tuple[str, ...] = ()  # each merged expert's training tokens (per-token embedding weights)
    trainable: str = "all"  # "routers": only a merged model's MoE gates learn
    gate_init: str = "zero"  # "centroids" | "fitted": training.merge.GATE_INITS, from the merge_tokens
    merge_router: str | None = None  # the run's trained router, the merged model's own (moe.gate_scope "model")
    # the instruction stage: after ``instruct_from`` batches, batches come from these encoded
    # instruction items (training.data.sft), ``instruct_batches`` of them in all
    instruct_paths: tuple[str, ...] = ()
    instruct_from: int = 0
    instruct_batches: int = 0
    instruct_replay: float = 0.0  # share of the instruction stage's batches that are pretraining batches
    # a branch's replay of the seed's corpus: this share of its pretraining batches from these splits
    replay_paths: tuple[str, ...] = ()
    replay: float = 0.0
    _val: list[Batch] | None = field(default=None, repr=False)

    def build_model(self) -> nn.Module:
        from experts.model import Transformer

        if self.merge_from:
            from training.merge import freeze_all_but_routers, merge_models, route_of, start_gates, token_weights

            weights = token_weights(self.merge_tokens, self.model_cfg.vocab_size) if self.merge_tokens else None
            moe = self.model_cfg.moe
            router = None
            if self.merge_router is not None:  # the classifier's weights: the merged model reads token ids
                from experts.classifier import load_classifier

                router = load_classifier(self.merge_router)[0]
            model = merge_models([load_lm(d)[0] for d in self.merge_from], moe.top_k, weights,
                                 route_of(self.model_cfg), moe.gate_context, moe.doc_start_id, moe.gate_scope, router)
            if model.cfg != self.model_cfg:
                raise CheckpointError(f"merging {list(self.merge_from)} gives {model.cfg}, not {self.name}'s "
                                      f"{self.model_cfg}")
            start_gates(model, self.gate_init, self.merge_tokens, self.seq_len, self.seed)
            if self.trainable == "routers":
                freeze_all_but_routers(model)
            if model.router is not None:  # the run's router, trained on the domains' openings, stays as it is
                model.router.requires_grad_(False)
            return model.train()
        if self.init_from is None:
            return Transformer(self.model_cfg)
        model, cfg, _ = load_lm(self.init_from)
        if cfg != self.model_cfg:
            raise CheckpointError(f"{self.init_from}: its config differs from {self.name}'s; a branch must "
                                  f"start from a checkpoint of the same model ({cfg} vs {self.model_cfg})")
        return model.train()

    def train_batches(self) -> MixedBatches | Any:
        from training.data.packing import TokenBatches
        from training.data.sft import InstructBatches, ReplayBatches, StagedBatches
        op = self._openings()
        pretrain = MixedBatches([TokenBatches(p, self.batch_size, self.seq_len, seed=self.seed + 1000 * i, **op)
                                 for i, p in enumerate(self.train_paths)])
        if self.replay and self.replay_paths:
            mixed = MixedBatches([TokenBatches(p, self.batch_size, self.seq_len, seed=self.seed + 700 + 1000 * i, **op)
                                  for i, p in enumerate(self.replay_paths)])
            pretrain = ReplayBatches(pretrain, mixed, self.replay)
        if not self.instruct_paths:
            return pretrain
        per = max(1, round(self.instruct_batches * (1 - self.instruct_replay) / len(self.instruct_paths)))
        instruct = MixedBatches([InstructBatches(p, self.batch_size, self.seq_len, seed=self.seed + 500 + 1000 * i,
                                                 total=per) for i, p in enumerate(self.instruct_paths)])
        if self.instruct_replay:  # the same pretraining stream continues between the instruction batches
            instruct = ReplayBatches(instruct, pretrain, self.instruct_replay)
        return StagedBatches(pretrain, instruct, self.instruct_from)

    def val_batches(self) -> list[Batch]:
        if self._val is None:  # the same windows every evaluation; spread over all val splits
            per = max(1, self.eval_batches // len(self.val_paths))
            self._val = [b for p in self.val_paths
                         for b in eval_windows(p, self.batch_size, self.seq_len, per, **self._openings())]
        return self._val

    def _openings(self) -> dict[str, int]:
        """A model router reads each window's document opening (``TokenBatches(opening_window=...)``)."""
        if not self.model_cfg.model_router:
            return {}
        return {"opening_window": self.model_cfg.moe.router_window, "doc_start_id": self.model_cfg.moe.doc_start_id}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        # a window's document opening, for a model router (an instruction batch's rows start documents)
        out = model(x, opening=batch[2].to(device)) if len(batch) > 2 else model(x)
        ce = lm_loss(out.logits, y)
        metrics = {"lm_loss": ce.item()}
        if self.model_cfg.ffn != "moe":
            return ce, metrics
        moe = self.model_cfg.moe
        total = ce + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
        metrics.update(aux_loss=out.aux_loss.item(), z_loss=out.z_loss.item())
        if out.expert_counts is not None:  # (routers, E): how unevenly tokens spread over experts
            c = out.expert_counts.float()
            metrics["max_load"] = float((c.max(-1).values / c.sum(-1).clamp(min=1)).mean())
        return total, metrics

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch[1].numel())

    def model_config(self) -> dict[str, Any]:
        return self.model_cfg.to_dict()

    def flops_per_token(self) -> float:
        return float(self.model_cfg.flops_per_token(self.seq_len))

    def save_model(self, model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
        extra = {"init_from": Path(self.init_from).name} if self.init_from else {}
        if self.replay and self.replay_paths:
            extra["replay"] = {"domains": [Path(p).parent.name for p in self.replay_paths], "share": self.replay}
        if self.merge_from:
            extra = {"init_from": "merge", "merged_from": [Path(d).name for d in self.merge_from],
                     "trainable": self.trainable, "gate_init": self.gate_init}
        if self.instruct_paths:
            extra["instruct"] = {"domains": [Path(p).stem for p in self.instruct_paths],
                                 "from_batch": self.instruct_from, "batches": self.instruct_batches,
                                 "replay": self.instruct_replay}
            if "math" in extra["instruct"]["domains"]:  # its math items write `expr = ` for the calculator
                extra["tools"] = ["calculator"]
        save_lm(path, model, self.model_cfg, tokenizer_file=self.tokenizer_file,
                meta={**self.meta, **extra, **meta})
