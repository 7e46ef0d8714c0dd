"""Export a dense expert as a Hugging Face ``LlamaForCausalLM`` (or ``Qwen3ForCausalLM``) directory.

A model trained with ``qk_norm=True`` (RMSNorm over head_dim on q and k before RoPE) exports as
``Qwen3ForCausalLM``, which is a Llama with exactly that per-head ``q_norm``/``k_norm``.

The hmoe decoder is a Llama: same RMSNorm, SwiGLU, GQA and RoPE in the HF "rotate_half" layout,
so export is a rename of the weights plus a ``config.json`` and the tokenizer files. Nothing
here imports ``transformers``: the output is plain files that ``AutoModelForCausalLM`` and
``AutoTokenizer`` read.

An MoE model without shared experts (the Branch-Train-MiX merge, ``training.merge``) computes
what Mixtral does: softmax over every expert's router logit, top-k, the k weights renormalised to
sum to 1, SwiGLU experts. It exports as ``MixtralForCausalLM``, or with qk_norm as
``Qwen3MoeForCausalLM`` (``norm_topk_prob: true``), in the per-expert weight layout of their
published checkpoints. The token-level MoE generalist has a shared expert added unweighted; no
transformers architecture matches that exactly (Mixtral has none, Qwen2-MoE gates its shared
expert with a sigmoid), so exporting it raises ``ExportError`` rather than writing a model that
computes something else.
"""

from __future__ import annotations

import json
from pathlib import Path

from experts.atomic import atomic_dir
from experts.checkpoint import TOKENIZER, load_lm
from safetensors.torch import save_file

# hmoe name (after "layers.N.") -> HF name (after "model.layers.N.")
# (the fused ``attention.wqkv.weight`` is split by rows into q_proj, k_proj, v_proj)
_LAYER_NAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # qk_norm models (Qwen3)
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# a routed expert's SwiGLU (after "feed_forward.experts.E."): Mixtral's names, then Qwen3-MoE's
_EXPERT_NAMES = {"w1.weight": ("w1.weight", "gate_proj.weight"), "w2.weight": ("w2.weight", "down_proj.weight"),
                 "w3.weight": ("w3.weight", "up_proj.weight")}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format."""


def hf_name(name: str, *, qwen3: bool = False) -> str:
    """Map one hmoe parameter name to its ``LlamaForCausalLM`` name (of the matching Mixtral or
    Qwen3-MoE block for a routed-expert MoE layer)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, layer, rest = name.split(".", 2)
    block = "mlp" if qwen3 else "block_sparse_moe"
    if prefix == "layers" and rest == "feed_forward.gate.weight":
        return f"model.layers.{layer}.{block}.gate.weight"
    if prefix == "layers" and rest.startswith("feed_forward.experts."):
        e, w = rest.removeprefix("feed_forward.experts.").split(".", 1)
        if w in _EXPERT_NAMES:
            return f"model.layers.{layer}.{block}.experts.{e}.{_EXPERT_NAMES[w][qwen3]}"
    if prefix != "layers" or rest not in _LAYER_NAMES:
        raise ExportError(f"parameter {name!r} has no LlamaForCausalLM equivalent")
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def hf_state_dict(model) -> dict:
    """The transformers state dict of an hmoe ``Transformer`` (tied lm_head omitted)."""
    cfg = model.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().clone()
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # tied: transformers re-ties lm_head to embed_tokens
        if name.endswith("attention.wqkv.weight"):
            layer = name.split(".")[1]
            for proj, part in zip("qkv", t.split([q, kv, kv])):  # rows: (H + 2 Hkv) * Dh
                out[f"model.layers.{layer}.self_attn.{proj}_proj.weight"] = part.contiguous()
            continue
        out[hf_name(name, qwen3=cfg.qk_norm)] = t
    return out


def hf_config(cfg, *, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> dict:
    """The ``config.json`` shaped as ``cfg``: ``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with qk_norm;
    for routed experts without shared ones ``MixtralForCausalLM``, or ``Qwen3MoeForCausalLM`` with qk_norm."""
    qwen3, moe = cfg.qk_norm, cfg.ffn == "moe"
    if moe:
        m = cfg.moe
        arch = ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": m.n_experts,
                 "moe_intermediate_size": cfg.expert_hidden_dim, "norm_topk_prob": True, "decoder_sparse_step": 1,
                 "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None,
                 "max_window_layers": cfg.n_layers} if qwen3 else
                {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": m.n_experts,
                 "sliding_window": None})
        arch |= {"num_experts_per_tok": m.top_k, "output_router_logits": False, "router_aux_loss_coef": 0.0}
    else:
        arch = ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                 "sliding_window": None, "max_window_layers": cfg.n_layers} if qwen3 else
                {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False})
    return {
        **arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.expert_hidden_dim if moe else cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "dtype": "float32",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "use_cache": True,
    }


def write_hf_tokenizer(tokenizer_file: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write the files ``AutoTokenizer.from_pretrained(out_dir)`` reads; return the special ids."""
    from experts.tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, Tokenizer

    tok, out = Tokenizer.load(tokenizer_file), Path(out_dir)
    names = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": None,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
              **names}
    (out / TOKENIZER).write_bytes(Path(tokenizer_file).read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2))
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (atomically) so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
    ckpt = Path(ckpt_dir)
    model, cfg, _ = load_lm(ckpt)
    if cfg.ffn == "moe" and cfg.moe.n_shared:
        raise ExportError(
            f"{ckpt}: an MoE with {cfg.moe.n_shared} shared expert(s) added unweighted to the renormalised "
            "top-k experts matches no transformers architecture exactly (Mixtral has no shared expert, "
            "Qwen2-MoE gates it with a sigmoid); only dense models and MoEs without shared experts "
            "(hmoe merge) export")
    if cfg.routed_attention or cfg.routed_head:
        raise ExportError(
            f"{ckpt}: its attention projections and LM head are routed experts too (a merge with "
            "merge.route: all); transformers' MoE architectures route only the FFN. Merge with "
            "`hmoe merge RUN --route ffn` for a model that exports as Mixtral or Qwen3-MoE")
    if cfg.model_router:
        raise ExportError(
            f"{ckpt}: one router chooses every layer's experts (moe.gate_scope 'model'); transformers' MoE "
            "layers each have their own. Merge with `hmoe merge RUN --route ffn --gate-context token "
            "--gate-scope layer` for a model that exports")
    if cfg.ffn == "moe" and cfg.moe.gate_context != "token":
        raise ExportError(
            f"{ckpt}: its routers read a running mean of the sequence's inputs (moe.gate_context "
            f"{cfg.moe.gate_context!r}); transformers' MoE routers read each token's own input. Merge with "
            "`hmoe merge RUN --route ffn --gate-context token` for a model that exports")
    if not (ckpt / TOKENIZER).is_file():
        raise ExportError(f"{ckpt / TOKENIZER}: missing; the export needs the checkpoint's tokenizer")
    tensors = hf_state_dict(model)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        ids = write_hf_tokenizer(ckpt / TOKENIZER, tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(
            hf_config(cfg, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"]), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}, indent=2))
    return out
