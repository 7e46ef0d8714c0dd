"""The documented weight mapping to HF ``LlamaForCausalLM`` reproduces our logits (RoPE layout, names)."""

from __future__ import annotations

import pytest
import torch

from experts.config import ModelConfig
from experts.model import Transformer

transformers = pytest.importorskip("transformers")


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Rename our weights to HF Llama's (the fused qkv is split by rows; no RoPE permutation)."""
    cfg, sd = model.cfg, model.state_dict()
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attention.wqkv.weight"].split([q, kv, kv])
        out |= {h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk,
                h + "self_attn.v_proj.weight": wv, h + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
                h + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"],
                h + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
                h + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"],
                h + "input_layernorm.weight": sd[p + "attention_norm.weight"],
                h + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"]}
    return out


def test_logits_match_hf_llama_with_renamed_weights():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")  # GQA: 4 heads, 2 kv heads
    model = Transformer(cfg).eval()
    for p in model.parameters():  # non-trivial norms too
        p.data.add_(0.01 * torch.randn_like(p))
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits.float(), atol=1e-4, rtol=1e-4)
