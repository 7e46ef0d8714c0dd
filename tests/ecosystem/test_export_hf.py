"""Exported models load in transformers (Llama, Qwen3, Mixtral, Qwen3-MoE) and give the same logits."""

from __future__ import annotations

import pytest
import torch

from experts.checkpoint import save_lm
from experts.config import ModelConfig, MoEConfig
from experts.export import ExportError, export_hf, hf_name
from experts.model import Transformer
from experts.tokenizer import Tokenizer

import transformers

TEXTS = ["def add(a, b):\n\treturn a + b  \n", "The capital of France is Paris.",
         "What is 12 + 30? 42", "สวัสดีครับ 🙂", "user: hi there! how are you?"] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(TEXTS, vocab_size=300).save(path)
    return path


def _checkpoint(tmp_path, tokenizer_file, **overrides):
    tok = Tokenizer.load(tokenizer_file)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms so a wrong mapping of them would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model, save_lm(tmp_path / "ckpt", model, cfg, tokenizer_file=tokenizer_file)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "n_kv_heads": 4}])
def test_logits_match_transformers_llama(tmp_path, tokenizer_file, overrides):
    model, ckpt = _checkpoint(tmp_path, tokenizer_file, **overrides)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompts = ["def add(a, b):", "The capital of 12345", "สวัสดี 🙂 tabs\tand  spaces  "]
    ours = Tokenizer.load(tokenizer_file)
    for p in prompts:
        assert hf_tok(p, add_special_tokens=False)["input_ids"] == ours.encode(p)
        assert hf_tok.decode(ours.encode(p)) == p
    batch = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(batch).logits
        got = hf(input_ids=batch).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_shared_expert_moe_export_is_refused_with_a_clear_error(tmp_path, tokenizer_file):
    _, ckpt = _checkpoint(tmp_path, tokenizer_file, ffn="moe", moe=MoEConfig(n_experts=4, top_k=2, n_shared=1))
    with pytest.raises(ExportError, match="shared expert.*matches no transformers architecture"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_merge_that_routes_attention_and_head_is_refused_with_a_clear_error(tmp_path, tokenizer_file):
    moe = MoEConfig(n_experts=2, top_k=1, n_shared=0, routed_attention=True, routed_head=True)
    _, ckpt = _checkpoint(tmp_path, tokenizer_file, ffn="moe", tie_embeddings=False, moe=moe)
    with pytest.raises(ExportError, match="route only the FFN.*--route ffn"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    moe = MoEConfig(n_experts=2, top_k=1, n_shared=0, gate_context="mean")  # routers reading a running mean
    _, ckpt = _checkpoint(tmp_path / "mean", tokenizer_file, ffn="moe", moe=moe)
    with pytest.raises(ExportError, match="running mean.*--gate-context token"):
        export_hf(ckpt, tmp_path / "hf")
    moe = MoEConfig(n_experts=5, top_k=1, n_shared=0, gate_scope="model", gate_context="doc",
                    router_embed=8, router_buckets=64, router_hidden=16)  # one router for every layer
    _, ckpt = _checkpoint(tmp_path / "one", tokenizer_file, ffn="moe", moe=moe)
    with pytest.raises(ExportError, match="one router chooses every layer's experts.*--gate-scope layer"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unknown_parameter_name_is_an_error():
    with pytest.raises(ExportError, match="no LlamaForCausalLM equivalent"):
        hf_name("layers.0.feed_forward.router.weight")


@pytest.mark.parametrize("overrides", [{"qk_norm": True}, {"qk_norm": True, "tie_embeddings": False}])
def test_qk_norm_exports_as_qwen3_with_matching_logits(tmp_path, tokenizer_file, overrides):
    model, ckpt = _checkpoint(tmp_path, tokenizer_file, **overrides)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    batch = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(batch).logits
        got = hf(input_ids=batch).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize(("qk_norm", "arch"), [(False, "MixtralForCausalLM"), (True, "Qwen3MoeForCausalLM")])
def test_routed_expert_moe_exports_with_matching_logits(tmp_path, tokenizer_file, qk_norm, arch):
    """A merged model (routed experts, no shared one: ``hmoe merge``) is a Mixtral, or with qk_norm a
    Qwen3-MoE: same softmax-top-k-renormalise gating; trained-looking router weights so top-k varies."""
    model, ckpt = _checkpoint(tmp_path, tokenizer_file, ffn="moe", qk_norm=qk_norm, tie_embeddings=False,
                              moe=MoEConfig(n_experts=5, top_k=2, n_shared=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("feed_forward.gate.weight"):
                p.normal_(0, 0.5)
    save_lm(tmp_path / "ckpt", model, model.cfg, tokenizer_file=tokenizer_file)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    batch = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(batch).logits
        got = hf(input_ids=batch).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
