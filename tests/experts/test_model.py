"""Transformer: causality, KV-cache parity, GQA vs a reference, overfitting, config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experts.config import ModelConfig, MoEConfig
from experts.model import KVCache, Transformer
from experts.moe import document_opening

ROOT = Path(__file__).resolve().parents[2]


# "routed": an MoE whose attention projections and LM head are routed experts too (training.merge)
ROUTED = {"tie_embeddings": False, "moe": MoEConfig(n_experts=4, top_k=2, routed_attention=True, routed_head=True)}
# "routed-mean": the same, its routers reading the running mean of their inputs (moe.gate_context)
MEAN = {"tie_embeddings": False, "moe": MoEConfig(n_experts=4, top_k=2, routed_attention=True, routed_head=True,
                                                  gate_context="mean")}
# "routed-doc": that mean restarted at every <|bos|> (token 1): each packed document routed on its own
DOC = {**MEAN, "moe": MoEConfig(**{**MEAN["moe"].__dict__, "gate_context": "doc"})}
# "routed-full": the input embeddings routed too (a route="full" merge)
FULL = {**DOC, "moe": MoEConfig(**{**DOC["moe"].__dict__, "routed_embeddings": True})}
# "model-router": one router for the whole model (moe.gate_scope "model"), of a route="full" merge
# ("model-router-all": of a route="all" one, reading the averaged input embeddings)
_ONE = {"n_experts": 5, "gate_scope": "model", "router_embed": 8, "router_buckets": 64, "router_hidden": 16,
        "router_window": 4}
ONE = {**FULL, "moe": MoEConfig(**{**FULL["moe"].__dict__, **_ONE})}
ONE_ALL = {**DOC, "moe": MoEConfig(**{**DOC["moe"].__dict__, **_ONE})}
PRESETS = {"routed": ROUTED, "routed-mean": MEAN, "routed-doc": DOC, "routed-full": FULL, "model-router": ONE,
           "model-router-all": ONE_ALL}
EVERY = ["tiny", "tiny-moe", *PRESETS]


def _config(preset: str, **kw) -> ModelConfig:
    extra = PRESETS.get(preset)
    return ModelConfig.preset("tiny-moe", **{**extra, **kw}) if extra else ModelConfig.preset(preset, **kw)


def _model(preset: str, **kw) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(_config(preset, **kw)).eval()
    with torch.no_grad():  # non-trivial q/k norm weights (qk_norm), so a path that skipped them would show
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("preset", EVERY)
def test_changing_a_later_token_never_changes_earlier_logits(preset):
    model = _model(preset)
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 512
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    # exact for a dense model; an MoE groups tokens by expert, so a later token can change the size
    # of an expert's matmul, and with it the rounding (never more than ~1e-6)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0 if preset == "tiny" else 1e-5, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("preset", EVERY)
def test_kv_cache_decoding_equals_full_forward(preset, qk_norm):
    """Prefill slots with prompts of different lengths, then batched decode at different positions."""
    model = _model(preset, qk_norm=qk_norm)
    x = torch.randint(0, 512, (3, 24))
    lens, slots = [4, 9, 13], [2, 0, 3]  # non-contiguous slots, different lengths
    cache = KVCache(model.cfg, max_batch=4, max_len=64)
    with torch.no_grad():
        full = model(x).logits
        got = {}
        for b, (slot, n) in enumerate(zip(slots, lens)):
            cache.bind([slot])
            got[b] = [model(x[b:b + 1, :n], cache=cache).logits[0]]
        for t in range(8):
            cache.bind(slots)
            tok = torch.stack([x[b, lens[b] + t] for b in range(3)])[:, None]  # (B, 1)
            out = model(tok, cache=cache).logits
            for b in range(3):
                got[b].append(out[b])
    for b in range(3):
        torch.testing.assert_close(torch.cat(got[b]), full[b, :lens[b] + 8], atol=1e-5, rtol=0)
    assert [cache.lengths[s] for s in slots] == [n + 8 for n in lens]


def test_kv_cache_chunked_prefill_and_contiguous_batch():
    model = _model("tiny")
    x = torch.randint(0, 512, (2, 20))
    cache = KVCache(model.cfg, max_batch=2, max_len=32)
    with torch.no_grad():
        full = model(x).logits
        cache.bind([0, 1])
        first = model(x[:, :7], cache=cache).logits  # same-length batched prefill
        second = model(x[:, 7:20], cache=cache).logits  # a chunk after a prefix (needs a mask)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)


def test_padded_prefill_lengths_apply_to_one_forward_only_and_bad_ones_raise():
    model = _model("tiny")
    x = torch.randint(0, 512, (2, 6))
    cache = KVCache(model.cfg, max_batch=2, max_len=8)
    with torch.no_grad():
        cache.bind([0, 1], valid=[3, 6])
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(torch.randint(0, 512, (2, 9)), cache=cache)  # fails before it uses the lengths
        model(x, cache=cache)  # the same slots, no new bind: nothing padded is left over
        assert cache.lengths[:2] == [6, 6]
        with pytest.raises(ValueError, match="one valid length per slot, and empty slots"):
            cache.bind([0, 1], valid=[1, 1])  # the slots are no longer empty
        cache.reset(0), cache.reset(1)
        cache.bind([0, 1], valid=[3, 7])
        with pytest.raises(ValueError, match=r"valid lengths \[3, 7\] must be in \[1, 6\]"):
            model(x, cache=cache)


def test_kv_cache_overflow_and_bad_sizes_raise():
    cfg = ModelConfig.preset("tiny")
    model = _model("tiny")
    cache = KVCache(cfg, max_batch=1, max_len=8)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(cfg, max_batch=1, max_len=cfg.max_seq_len + 1)


def _reference_mha(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head causal attention written out, on the first layer's attention module."""
    attn = model.layers[0].attention
    B, T, D = x.shape
    H, Dh = attn.n_heads, attn.head_dim
    wq, wk, wv = attn.wqkv.weight.split([H * Dh, H * Dh, H * Dh])  # the documented HF mapping
    q = (x @ wq.T).view(B, T, H, Dh).transpose(1, 2)
    k = (x @ wk.T).view(B, T, H, Dh).transpose(1, 2)
    v = (x @ wv.T).view(B, T, H, Dh).transpose(1, 2)
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / model.cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.outer(pos, inv)  # (T, Dh/2)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(t):  # rotate pairs (i, i + Dh/2): the HF rotate_half convention
        a, b = t[..., :Dh // 2], t[..., Dh // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    q, k = rope(q), rope(k)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, D)
    return y @ attn.wo.weight.T


def test_attention_with_kv_heads_equal_heads_matches_reference_mha():
    model = _model("tiny", n_kv_heads=4)
    x = torch.randn(2, 12, model.cfg.d_model)
    cos, sin = model._rope(2, 12, None, None)
    with torch.no_grad():
        got = model.layers[0].attention(x, cos, sin, None, None)
        torch.testing.assert_close(got, _reference_mha(model, x), atol=1e-5, rtol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with 2 kv heads is MHA whose k/v weights repeat each kv head for its query group."""
    gqa = _model("tiny")  # 4 heads, 2 kv heads
    mha = _model("tiny", n_kv_heads=4)
    sd = gqa.state_dict()
    Dh = gqa.cfg.head_dim
    for name in list(sd):
        if name.endswith("wqkv.weight"):  # k, v: (Hkv*Dh, D) -> (H*Dh, D), each kv head repeated
            q, k, v = sd[name].split([4 * Dh, 2 * Dh, 2 * Dh])
            k, v = (w.view(2, Dh, -1).repeat_interleave(2, dim=0).reshape(4 * Dh, -1) for w in (k, v))
            sd[name] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    x = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=0)


def test_output_contract_dense_and_moe():
    x = torch.randint(0, 512, (2, 8))
    dense = _model("tiny")(x)
    assert dense.logits.shape == (2, 8, 512) and dense.logits.dtype == torch.float32
    assert dense.aux_loss.item() == 0 and dense.z_loss.item() == 0 and dense.expert_counts is None
    moe = _model("tiny-moe")(x)
    cfg = ModelConfig.preset("tiny-moe")
    assert moe.expert_counts.shape == (cfg.n_layers, cfg.moe.n_experts)
    assert moe.expert_counts.sum(1).tolist() == [2 * 8 * cfg.moe.top_k] * cfg.n_layers
    assert moe.aux_loss.item() >= 1.0 - 1e-6  # the Switch loss is minimised (1.0) by uniform routing
    routed = _model("routed")(x)  # one router per attention and FFN of every layer, and the head's
    assert routed.expert_counts.shape == (2 * cfg.n_layers + 1, 4)
    assert routed.expert_counts.sum(1).tolist() == [2 * 8 * 2] * (2 * cfg.n_layers + 1)
    torch.testing.assert_close(routed.logits.exp().sum(-1), torch.ones(2, 8))  # the head's mixture: log-probs
    routed_cfg = _config("routed")
    assert routed_cfg.num_params() == sum(p.numel() for p in Transformer(routed_cfg).parameters())
    with pytest.raises(ValueError, match="tie_embeddings"):
        ModelConfig.preset("tiny-moe", moe=ROUTED["moe"])


def test_tied_embeddings_and_scaled_init():
    model = _model("small")
    assert model.output.weight is model.tok_embeddings.weight
    n = model.cfg.n_layers
    wo = model.layers[0].attention.wo.weight.std().item()
    wq = model.layers[0].attention.wqkv.weight.std().item()
    assert wo == pytest.approx(0.02 / math.sqrt(2 * n), rel=0.05)
    assert wq == pytest.approx(0.02, rel=0.05)
    assert "rope_cos" not in model.state_dict()  # non-persistent buffers
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "routed"])
def test_tiny_model_overfits_one_batch(preset):
    torch.manual_seed(0)
    model = Transformer(_config(preset, vocab_size=64, max_seq_len=32)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 17))
    for _ in range(160 if preset == "routed" else 80):  # a mixture of heads starts flatter
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 64), x[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + 0.01 * out.aux_loss + 0.001 * out.z_loss).backward()
        opt.step()
    assert loss.item() < 0.1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig.preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig.preset("tiny", dropout=1.0)
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig.preset("tiny", d_model=66)
    with pytest.raises(ValueError, match="moe.top_k"):
        ModelConfig.from_dict({**ModelConfig.preset("tiny-moe").to_dict(), "moe": {"n_experts": 2, "top_k": 3}})
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
    assert ModelConfig.from_dict(ModelConfig.preset("tiny-moe").to_dict()) == ModelConfig.preset("tiny-moe")


def test_rope_is_relative_shifting_all_positions_keeps_logits():
    model = _model("tiny")
    x = torch.randint(0, 512, (2, 12))
    shifted = (torch.arange(12) + 37).expand(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x, positions=shifted).logits, model(x).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=torch.arange(5)[None])


@pytest.mark.parametrize("preset", EVERY)
def test_last_only_logits_equal_the_last_row_of_the_full_logits(preset):
    torch.manual_seed(0)
    model = Transformer(_config(preset)).eval()
    x = torch.randint(0, model.cfg.vocab_size, (3, 9))
    with torch.inference_mode():
        full, last = model(x).logits, model(x, last_only=True).logits
    assert last.shape == (3, 1, model.cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_a_mean_context_router_reads_the_running_mean_of_its_inputs_and_a_padded_prefill_agrees():
    from experts.moe import MoEFFN

    cfg = _config("routed-mean")
    ffn = MoEFFN(cfg, 0)
    x = torch.randn(2, 5, cfg.d_model)
    want = torch.stack([x[:, :t + 1].mean(1) for t in range(5)], 1)
    torch.testing.assert_close(ffn.gate_input(x), want, atol=1e-6, rtol=0)
    model = _model("routed-mean")
    x = torch.randint(0, 512, (2, 7))
    cache = KVCache(model.cfg, max_batch=2, max_len=16)
    with torch.no_grad():
        cache.bind([0, 1], valid=[4, 7])  # right-padded prefill: row 0 has 4 tokens, 3 of padding
        last = model(x, cache=cache, last_only=True).logits[:, 0]
        cache.bind([0, 1])
        nxt = model(x[:, 4:5], cache=cache).logits[:, 0]  # row 0's 5th token overwrites the padding
        torch.testing.assert_close(last[0], model(x[:1, :4]).logits[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(last[1], model(x[1:, :7]).logits[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(nxt[0], model(x[:1, :5]).logits[0, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="moe.gate_context"):
        MoEConfig(gate_context="sentence")


def _no_bos(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 1, 7, x)


def test_a_doc_context_router_reads_only_its_own_documents_inputs():
    """In a row packed with two documents, a router's mean restarts at the second one's <|bos|>: the
    first layer's attention router (which reads normed embeddings) reads what it reads alone."""
    from experts.moe import MoEFFN

    cfg = _config("routed-doc")
    ffn = MoEFFN(cfg, 0)
    x = torch.randn(1, 9, cfg.d_model)
    doc = torch.tensor([[0, 0, 0, 0, 4, 4, 4, 4, 4]])  # a document starts at position 4
    want = torch.cat([torch.stack([x[:, :t + 1].mean(1) for t in range(4)], 1),
                      torch.stack([x[:, 4:t + 1].mean(1) for t in range(4, 9)], 1)], 1)
    torch.testing.assert_close(ffn.gate_input(x, doc_BT=doc), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="document start"):
        ffn.gate_input(x)
    model = _model("routed-doc")
    first, second = _no_bos(torch.randint(0, 512, (1, 6))), _no_bos(torch.randint(0, 512, (1, 7)))
    first[0, 0] = second[0, 0] = 1  # each document opens with <|bos|>
    row = torch.cat([first, second], 1)
    torch.testing.assert_close(model.doc_starts(row), torch.tensor([[0] * 6 + [6] * 7]))
    seen = []
    gate = model.layers[0].attention
    gate.gate_input = lambda *a, read=gate.gate_input: seen.append(read(*a)) or seen[-1]
    with torch.no_grad():
        model(row), model(second)
    torch.testing.assert_close(seen[0][:, 6:], seen[1], atol=1e-5, rtol=0)
    mean = _model("routed-mean")  # the sequence-wide mean mixes the first document in
    mean.load_state_dict(model.state_dict())
    assert not torch.allclose(model(row).logits[:, 6:], mean(row).logits[:, 6:])


def test_a_doc_context_cache_carries_the_document_start_across_decode_steps():
    model = _model("routed-doc")
    x = _no_bos(torch.randint(0, 512, (1, 14)))
    x[0, 0], x[0, 5] = 1, 1  # a second document starts inside the prompt
    cache = KVCache(model.cfg, max_batch=2, max_len=32)
    with torch.no_grad():
        full = model(x).logits[0]
        cache.bind([1])
        got = [model(x[:, :8], cache=cache).logits[0]]
        assert cache.doc_starts[1] == 5
        for t in range(8, 14):
            got.append(model(x[:, t:t + 1], cache=cache).logits[0])
    torch.testing.assert_close(torch.cat(got), full, atol=1e-5, rtol=0)
    cache.reset(1)
    assert cache.doc_starts[1] == 0


@pytest.mark.parametrize("preset", ["model-router", "model-router-all"])
def test_a_model_router_chooses_once_for_every_routed_module(preset):
    """Every routed module follows the model's router, which reads each token's document opening: the
    tokens of a document past its opening (router_window tokens after <|bos|>) go where it sends it."""
    model = _model(preset)
    assert not [n for n, _ in model.named_parameters() if n.endswith("gate.weight")]  # no per-module routers
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())
    x = torch.randint(2, 512, (2, 24))
    x[:, 0], x[1, 9] = 1, 1  # documents start at <|bos|>
    with torch.no_grad():
        out = model(x)
        chosen = model.router.choose(x, None, None, model.doc_starts(x))[3].view(2, 24, -1)
    counts = out.expert_counts  # (routed modules, E): every one sent the same tokens to the same experts
    assert counts.shape[0] == 2 * model.cfg.n_layers + 2 - (preset == "model-router-all")
    assert (counts == counts[0]).all() and counts[0].sum() == x.numel() * model.cfg.moe.top_k
    w = model.cfg.moe.router_window
    assert (chosen[0, w:] == chosen[0, w]).all() and (chosen[1, 9 + w:] == chosen[1, 9 + w]).all()
    alone = model.router.choose(x[1:, 9:], None, None, model.doc_starts(x[1:, 9:]))[3]
    assert torch.equal(alone.view(1, -1, chosen.shape[-1])[0], chosen[1, 9:])  # the packed document as alone



@pytest.mark.parametrize("start", [2, 5, 14, 16, 25])  # in an opening, past it, at a <|bos|>, after it, past it
def test_a_row_given_its_documents_opening_is_routed_as_in_the_whole_sequence(start):
    """A row that starts mid-document (a long document scored in windows, a random training window)
    carries the document's opening (``document_opening``): the model router routes its tokens exactly
    as with the whole sequence in the row. Without it they are routed from the row's own ids."""
    model = _model("model-router")
    w = model.cfg.moe.router_window
    torch.manual_seed(3)
    x = torch.randint(2, 512, (1, 32))
    x[0, 0], x[0, 14] = 1, 1  # a second document starts at 14
    row = x[:, start:]
    opening = torch.tensor([document_opening(x[0].tolist(), start, w, 1)])
    read = min(w, start - 1) if start < 14 else min(w, start - 15) if start > 14 else 0
    first = 1 if start < 14 else 15  # the document's first id after its <|bos|>
    assert opening[0, :read].tolist() == x[0, first:first + read].tolist()
    assert (opening[0, read:] == -1).all()
    with torch.no_grad():
        whole = model.router.choose(x, None, None, model.doc_starts(x))[2:]
        got = model.router.choose(row, None, None, model.doc_starts(row), opening)[2:]
        with_it, without = model(row, opening=opening).logits, model(row).logits
    for a, b in zip(got, whole):
        assert torch.equal(a, b.view(32, -1)[start:])
    if start in (5, 25):  # the opening lies wholly before the row: the row alone reads other ids
        assert not torch.equal(with_it, without)
    with pytest.raises(ValueError, match="model router"):
        _model("routed-doc")(row, opening=opening)
    with pytest.raises(ValueError, match="expected"):
        model(row, opening=opening[:, :2])


def test_a_prompt_is_routed_from_its_whole_opening_with_or_without_the_cache():
    """A ``<|bos|>``-led prompt's opening is known before anything is generated (``Transformer.known_openings``):
    each of its tokens and of its answer is routed from it, as the served router routes a prompt;
    where the prompt is shorter than the router's window the answer's first ids complete it. The
    KV-cache engine and the full forward generate the same tokens."""
    from experts.generate import generate
    from experts.sampling import SamplingParams

    model = _model("model-router")
    w, k = model.cfg.moe.router_window, model.cfg.moe.top_k

    def by_sum(opening_NW):  # a router whose choice moves with every id it reads
        logp = (torch.nn.functional.one_hot(opening_NW.clamp(min=0).sum(-1) % 5, 5) * 4.0).log_softmax(-1)
        weights, experts = logp.exp().topk(k, dim=-1)
        return logp, logp.exp(), weights / weights.sum(-1, keepdim=True), experts

    model.router.route = by_sum
    torch.manual_seed(5)
    long, short = [1, *torch.randint(2, 512, (9,)).tolist()], [1, 77]
    opening = model.known_openings([long, short, [9, 10]])
    assert opening.tolist() == [long[1:1 + w], [77] + [-1] * (w - 1), [-1] * w]
    x = torch.tensor([long])
    with torch.no_grad():
        alone = model.router.choose(x, None, None, model.doc_starts(x))[3]
        known = model.router.choose(x, None, None, model.doc_starts(x), opening[:1])[3]
    assert (known == alone[w]).all()  # every token where the whole opening sends the prompt
    assert not (alone == alone[w]).all()  # without it, the first tokens went elsewhere
    params = SamplingParams(temperature=0, max_new_tokens=8)
    assert list(generate(model, [long, short], params)) == list(generate(model, [long, short], params, use_cache=False))
    assert _model("routed-doc").known_openings([long]) is None


@pytest.mark.parametrize("preset", ["model-router", "model-router-all"])
def test_one_expert_for_every_token_runs_alone_and_computes_the_same(preset, monkeypatch):
    """Top-1, when the model router sends every token to one expert (a served request's decode
    steps), each routed module runs that expert alone instead of dispatching the tokens: the same
    logits and auxiliary outputs, prefill and decode, as the general path."""
    from experts.moe import Chosen

    model = _model(preset, moe=MoEConfig(**{**_config(preset).moe.__dict__, "top_k": 1, "n_shared": 0}))  # as merged

    def to_three(opening_NW):
        probs = torch.nn.functional.one_hot(torch.full((len(opening_NW),), 3), 5).float()
        return probs.log(), probs, torch.ones(len(probs), 1), torch.full((len(probs), 1), 3)

    model.router.route = to_three
    x = torch.randint(2, 512, (2, 10))
    x[:, 0] = 1

    def run():
        cache = KVCache(model.cfg, max_batch=2, max_len=16)
        with torch.no_grad():
            full = model(x)
            cache.bind([0, 1])
            pre = model(x[:, :6], cache=cache).logits
            steps = [model(x[:, t:t + 1], cache=cache).logits for t in range(6, 10)]
        return full, torch.cat([pre, *steps], dim=1)

    fast, fast_cached = run()
    plain = Chosen.of
    singles = []
    monkeypatch.setattr(Chosen, "of", classmethod(lambda cls, r, aux: singles.append(1) or
                                                  setattr(o := plain(r, aux), "single", None) or o))
    slow, slow_cached = run()
    assert singles  # the general path ran
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast_cached, slow_cached, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast_cached, fast.logits, atol=1e-5, rtol=0)
    assert torch.equal(fast.expert_counts, slow.expert_counts) and fast.expert_counts[:, 3].eq(20).all()
    torch.testing.assert_close(fast.aux_loss, slow.aux_loss)
