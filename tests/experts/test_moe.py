"""MoE FFN: parity with dense and with the mean of experts, balanced loss == 1, router gradients."""

from __future__ import annotations

import torch

from experts.config import MoEConfig, ModelConfig
from experts.moe import MoEFFN, SwiGLU, load_balancing_loss, router_z_loss


def _cfg(**moe) -> ModelConfig:
    return ModelConfig.preset("tiny", ffn="moe", moe=MoEConfig(**moe))


def test_one_expert_top1_no_shared_equals_dense_ffn():
    cfg = _cfg(n_experts=1, top_k=1, n_shared=0, expert_hidden=96)
    torch.manual_seed(0)
    moe, dense = MoEFFN(cfg), SwiGLU(cfg.d_model, 96)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 7, cfg.d_model)
    y, aux = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-6, rtol=0)
    assert aux.counts.tolist() == [14]


def test_equal_router_logits_with_top_k_all_equals_mean_of_experts():
    cfg = _cfg(n_experts=4, top_k=4, n_shared=0)
    torch.manual_seed(0)
    moe = MoEFFN(cfg)
    torch.nn.init.zeros_(moe.gate.weight)  # equal logits for every token
    x = torch.randn(3, 5, cfg.d_model)
    y, aux = moe(x)
    mean = torch.stack([e(x) for e in moe.experts]).mean(0)
    torch.testing.assert_close(y, mean, atol=1e-6, rtol=1e-5)
    assert aux.aux_loss.item() == 1.0  # uniform probabilities, every expert used equally


def test_shared_expert_is_added_to_every_token():
    cfg = _cfg(n_experts=4, top_k=2, n_shared=1)
    torch.manual_seed(0)
    moe = MoEFFN(cfg)
    x = torch.randn(2, 6, cfg.d_model)
    y, _ = moe(x)
    shared = moe.shared_expert
    moe.shared_expert = None
    routed, _ = moe(x)
    torch.testing.assert_close(y, routed + shared(x), atol=1e-6, rtol=0)


def test_perfectly_balanced_routing_gives_exactly_one():
    for n_experts, top_k in [(4, 1), (4, 2), (8, 2), (2, 2)]:
        N = 6 * n_experts
        probs = torch.full((N, n_experts), 1.0 / n_experts)
        experts = (torch.arange(N * top_k) % n_experts).view(N, top_k)  # every expert equally often
        assert load_balancing_loss(probs, experts).item() == 1.0
    probs = torch.full((9, 3), 1.0 / 3)  # 1/3 is not exact in binary: equal up to rounding
    assert abs(load_balancing_loss(probs, (torch.arange(9) % 3).view(9, 1)).item() - 1.0) < 1e-6


def test_collapsed_routing_gives_n_experts():
    probs = torch.zeros(10, 4)
    probs[:, 0] = 1
    experts = torch.zeros(10, 1, dtype=torch.long)
    assert load_balancing_loss(probs, experts).item() == 4.0


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    assert router_z_loss(logits).item() == expected.item()


def test_gradients_reach_the_router_and_experts():
    cfg = _cfg(n_experts=4, top_k=2, n_shared=1)
    torch.manual_seed(0)
    moe = MoEFFN(cfg)
    y, aux = moe(torch.randn(2, 16, cfg.d_model))
    (y.square().mean() + aux.aux_loss + aux.z_loss).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    used = [e for e, n in enumerate(aux.counts.tolist()) if n]
    assert all(moe.experts[e].w1.weight.grad.abs().sum() > 0 for e in used)


def test_router_is_fp32_and_topk_weights_sum_to_one():
    cfg = _cfg(n_experts=4, top_k=2, n_shared=0)
    moe = MoEFFN(cfg)
    logits, probs, weights, experts = moe.route(torch.randn(9, cfg.d_model).to(torch.bfloat16))
    assert logits.dtype == probs.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    assert experts.shape == (9, 2) and (experts[:, 0] != experts[:, 1]).all()
