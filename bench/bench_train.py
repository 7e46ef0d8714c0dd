"""Training throughput (forward + backward + AdamW step) vs this machine's fp32 matmul throughput."""

from __future__ import annotations

import logging
from typing import Any

import torch

from bench.common import matmul_gflops, median_time, setup
from experts.config import ModelConfig
from experts.model import Transformer
from training.tasks import lm_loss

log = logging.getLogger(__name__)

SEQ, BATCH, VOCAB = 256, 16, 8192
PRESETS = ("small", "small-moe")


def train_step_seconds(cfg: ModelConfig, *, batch: int = BATCH, seq: int = SEQ, repeats: int = 5) -> float:
    """Median seconds of one full optimiser step on random tokens (after two warm-up steps)."""
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))

    def step() -> None:
        out = model(x[:, :-1])
        loss = lm_loss(out.logits, x[:, 1:])  # the training loop's loss
        loss = loss + cfg.moe.aux_loss_coef * out.aux_loss + cfg.moe.z_loss_coef * out.z_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return median_time(step, repeats=repeats, warmup=2)


def main() -> dict[str, Any]:
    env = setup()
    peak = matmul_gflops()
    result: dict[str, Any] = {"env": env, "matmul_gflops_1024": round(peak, 2), "seq": SEQ, "batch": BATCH,
                              "models": {}}
    for name in PRESETS:
        cfg = ModelConfig.preset(name, vocab_size=VOCAB, max_seq_len=SEQ)
        before = matmul_gflops(repeats=7)
        sec = train_step_seconds(cfg)
        local = (before + matmul_gflops(repeats=7)) / 2  # the machine's speed around this model's run
        tok_s = BATCH * SEQ / sec
        gflops = tok_s * cfg.flops_per_token(SEQ) / 1e9
        result["models"][name] = {
            "step_s": round(sec, 4), "tokens_per_s": round(tok_s, 1), "gflops": round(gflops, 2),
            "ratio_to_matmul": round(gflops / peak, 3),
            "matmul_gflops_adjacent": round(local, 2), "ratio_to_adjacent_matmul": round(gflops / local, 3),
            "params": cfg.num_params(), "active_params": cfg.num_params(active=True)}
        log.info("%s: %.0f tok/s, %.1f GFLOP/s (%.0f%% of matmul %.1f; %.0f%% of adjacent %.1f)", name, tok_s,
                 gflops, 100 * gflops / peak, peak, 100 * gflops / local, local)
    result["goal"] = "dense ratio_to_matmul >= 0.70 (on a quiet machine; compare the adjacent ratio when noisy)"
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(main())
