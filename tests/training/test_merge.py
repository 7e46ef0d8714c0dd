"""training.merge (Branch-Train-MiX): the merged MoE computes what its parts compute."""

from __future__ import annotations

import pytest
import torch

from experts.checkpoint import CheckpointError, load_lm, save_lm
from experts.config import ModelConfig
from experts.generate import generate
from experts.model import Transformer
from experts.sampling import SamplingParams
from training.merge import forced_route, freeze_all_but_routers, merge_models, routing_shares

CFG = ModelConfig.preset("tiny", max_seq_len=32, qk_norm=True)


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_merging_identical_experts_gives_the_same_logits(top_k):
    one = _model(0)
    merged = merge_models([one] * 5, top_k).eval()
    assert merged.cfg.ffn == "moe" and merged.cfg.moe.n_experts == 5 and merged.cfg.moe.n_shared == 0
    with torch.no_grad():
        torch.testing.assert_close(merged(_tokens()).logits, one(_tokens()).logits, atol=1e-5, rtol=0)


def _always(expert: int, n_experts: int):
    """A ``MoEFFN.route`` that sends every token to ``expert`` with weight 1."""
    def route(x_ND):
        n = len(x_ND)
        probs = torch.zeros(n, n_experts)
        probs[:, expert] = 1.0
        return probs, probs, torch.ones(n, 1), torch.full((n, 1), expert, dtype=torch.long)
    return route


def test_each_routed_expert_is_its_domains_ffn_and_the_rest_is_averaged():
    a, b = _model(0), _model(1)
    merged = merge_models([a, b], top_k=1).eval()
    pa, pb, pm = (dict(m.named_parameters()) for m in (a, b, merged))
    for name, p in pm.items():
        if ".experts.1." in name:
            torch.testing.assert_close(p, pb[name.replace("experts.1.", "")])
        elif "feed_forward" not in name:
            torch.testing.assert_close(p, (pa[name] + pb[name]) / 2)
    b_with_a = _model(1)  # b's FFNs, a's everything else: what routing every token to expert 1 computes
    with torch.no_grad():
        for name, p in b_with_a.named_parameters():
            if "feed_forward" not in name:
                p.copy_(pa[name])
        merged = merge_models([a, b_with_a], top_k=1).eval()
        routed = merged(_tokens()).logits
        with forced_route(merged, 1):
            torch.testing.assert_close(merged(_tokens()).logits, b_with_a(_tokens()).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(_tokens()).logits, routed)  # its own routers again


def test_the_merged_checkpoint_loads_and_generates_like_any_other(tmp_path):
    dirs = []
    for i in range(3):
        dirs.append(save_lm(tmp_path / f"e{i}", _model(i), CFG))
    direct = merge_models([load_lm(d)[0] for d in dirs], top_k=2).eval()
    save_lm(tmp_path / "merged", direct, direct.cfg, meta={"merged_from": ["e0", "e1", "e2"]})
    model, loaded_cfg, meta = load_lm(tmp_path / "merged")
    assert loaded_cfg == direct.cfg and meta["merged_from"] == ["e0", "e1", "e2"]
    params = SamplingParams(temperature=0, max_new_tokens=6)
    assert list(generate(model.eval(), [[1, 2, 3]], params)) == list(generate(direct, [[1, 2, 3]], params))


def test_routers_only_training_freezes_everything_else():
    merged = merge_models([_model(0), _model(1)], top_k=1)
    n = freeze_all_but_routers(merged)
    trainable = [name for name, p in merged.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith("feed_forward.gate.weight") for name in trainable)
    assert n == CFG.n_layers * 2 * CFG.d_model


def test_experts_of_different_shapes_are_refused():
    other = Transformer(CFG.replace(d_model=32, n_heads=2, n_kv_heads=2))
    with pytest.raises(CheckpointError, match="one model config"):
        merge_models([_model(0), other], top_k=1)
    with pytest.raises(CheckpointError, match="dense"):
        merge_models([merge_models([_model(0)], top_k=1)], top_k=1)


def test_routing_shares_count_each_layers_top_k_per_domain():
    """Layer 0 sends every token to expert 1, layer 1 follows its (trained-looking) router: shares
    are exact where the choice is forced, and every layer's shares sum to top_k per domain."""
    merged = merge_models([_model(0), _model(1), _model(2)], top_k=1).eval()
    merged.layers[0].feed_forward.route = _always(1, 3)
    with torch.no_grad():
        for layer in merged.layers[1:]:
            layer.feed_forward.gate.weight.normal_(0, 1.0)
    docs = {"e0": [[1, 2, 3, 4], [5, 6]], "e1": [[7, 8, 9]]}
    out = routing_shares(merged, docs, ["e0", "e1", "e2"])
    assert out["top_k"] == 1 and out["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert out["top_k_share"][0] == {"e0": {"e0": 0.0, "e1": 1.0, "e2": 0.0}, "e1": {"e0": 0.0, "e1": 1.0, "e2": 0.0}}
    assert out["own"][0] == {"e0": 0.0, "e1": 1.0}
    for layer in out["top_k_share"]:
        for shares in layer.values():
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert merged.layers[0].feed_forward.route is not None and "route" not in merged.layers[1].feed_forward.__dict__


def test_routing_shares_count_what_a_context_reading_router_chose():
    """With ``gate_context`` mean or doc the shares are those of the running mean the gate reads."""
    merged = merge_models([_model(0), _model(1), _model(2)], top_k=1, gate_context="doc").eval()
    with torch.no_grad():
        for layer in merged.layers:
            layer.feed_forward.gate.weight.normal_(0, 1.0)
    docs = {"e0": [[1, 9, 3, 4, 8, 2], [1, 6, 5]], "e1": [[1, 8, 9, 7]]}
    seen = []
    f = merged.layers[-1].feed_forward
    f.gate_input = lambda *a, read=f.gate_input: seen.append(read(*a)) or seen[-1]
    out = routing_shares(merged, docs, ["e0", "e1", "e2"])
    del f.gate_input
    chosen = torch.cat([f.route(g.reshape(-1, g.shape[-1]))[3] for g in seen[:2]]).flatten()
    assert out["top_k_share"][-1]["e0"] == {e: pytest.approx((chosen == i).float().mean().item(), abs=1e-4)
                                             for i, e in enumerate(["e0", "e1", "e2"])}


def test_embedding_rows_are_weighted_per_token_by_who_trained_them(tmp_path):
    """Each token's row comes from the experts in proportion to how often they saw the token:
    a token only expert 1 saw gets (nearly) expert 1's row; one nobody saw, the plain mean."""
    import json

    import numpy as np

    from training.merge import token_weights

    a, b = _model(0), _model(1)
    paths = []
    for i, ids in enumerate([[5] * 10 + [6], [7] * 10 + [6]]):  # packed tokens, as training.data.packing writes
        stem = tmp_path / f"e{i}"
        np.asarray(ids, dtype=np.uint16).tofile(stem.with_suffix(".bin"))
        stem.with_suffix(".json").write_text(json.dumps({"dtype": "uint16", "n_tokens": len(ids)}))
        paths.append(str(stem))
    w = token_weights(paths, CFG.vocab_size)
    assert w.shape == (2, CFG.vocab_size) and torch.allclose(w.sum(0), torch.ones(CFG.vocab_size))
    assert w[0, 5] > 0.9 and w[1, 7] > 0.9 and w[0, 6] == pytest.approx(0.5) and w[0, 9] == pytest.approx(0.5)
    merged = merge_models([a, b], top_k=1, token_weights=w)
    emb, ea, eb = (m.tok_embeddings.weight for m in (merged, a, b))
    torch.testing.assert_close(emb[9], (ea[9] + eb[9]) / 2)
    torch.testing.assert_close(emb[5], w[0, 5] * ea[5] + w[1, 5] * eb[5])
    assert (emb[7] - eb[7]).norm() < 0.1 * (ea[7] - eb[7]).norm()


@pytest.mark.parametrize("init", ["centroids", "fitted"])
@pytest.mark.parametrize("gate_context", ["token", "mean", "doc"])
def test_started_gates_route_each_domains_tokens_to_its_expert(gate_context, init):
    """Three domains with disjoint vocabularies whose embeddings share a per-domain direction: the
    nearest-centroid and the fitted gates send most of a domain's tokens to its own expert in every
    layer (zero gates: all to the first), whether the routers read each token or the running mean."""
    from training.merge import GATE_INITS

    merged = merge_models([_model(0), _model(1), _model(2)], top_k=1, gate_context=gate_context).eval()
    assert merged.cfg.moe.gate_context == gate_context
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lo in (0, 100, 200):
            merged.tok_embeddings.weight[lo:lo + 100] += 0.05 * torch.randn(CFG.d_model, generator=g)
    texts = [torch.randint(lo, lo + 100, (4, 16), generator=g) for lo in (0, 100, 200)]
    docs = {f"e{i}": [t.tolist() for t in torch.randint(lo, lo + 100, (3, 16), generator=g)]
            for i, lo in enumerate((0, 100, 200))}
    zero = routing_shares(merged, docs, ["e0", "e1", "e2"])
    assert all(layer["e1"] == 0.0 and layer["e2"] == 0.0 for layer in zero["own"])
    GATE_INITS[init](merged, texts)
    own = routing_shares(merged, docs, ["e0", "e1", "e2"])["own"]
    assert all(share > 0.9 for layer in own for share in layer.values()), own
    assert all(not f.feed_forward._forward_pre_hooks for f in merged.layers)  # hooks removed


def _with_norms(seed: int, embeddings_from: Transformer | None = None) -> Transformer:
    """A random expert with non-trivial norm weights (so folding them into the routed experts shows)."""
    model = _model(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        if embeddings_from is not None:
            model.tok_embeddings.weight.copy_(embeddings_from.tok_embeddings.weight)
    return model


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_merge_that_routes_everything_computes_each_expert_when_sent_to_it(top_k):
    """route="all": attention, FFN and head are routed experts with the norms folded in; only the
    input embeddings are averaged, so experts that share them are reproduced exactly."""
    from training.merge import forced_route

    first = _with_norms(0)
    experts = [first] + [_with_norms(i, embeddings_from=first) for i in (1, 2)]
    merged = merge_models(experts, top_k, route="all").eval()
    cfg = merged.cfg
    assert cfg.moe.routed_attention and cfg.moe.routed_head and not cfg.tie_embeddings
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in merged.named_parameters()
               if n.endswith("norm.weight") and ".experts." not in n)
    with torch.no_grad():
        for i, expert in enumerate(experts):
            with forced_route(merged, i):
                torch.testing.assert_close(merged(_tokens()).logits, expert(_tokens()).logits.log_softmax(-1),
                                           atol=1e-5, rtol=0)
        same = merge_models([first] * 3, top_k, route="all").eval()  # and its own routers mix equals
        torch.testing.assert_close(same(_tokens()).logits, first(_tokens()).logits.log_softmax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate_context,gate_scope", [("token", "layer"), ("doc", "layer"), ("doc", "model")])
def test_a_full_merge_computes_each_expert_exactly_even_with_its_own_embeddings(gate_context, gate_scope):
    """route="full": the input embeddings are routed experts too, so experts that differ everywhere
    are reproduced when every token is sent to one; the shared embedding the routers read is the
    (per-token weighted) mean; the config counts every parameter."""
    from training.merge import forced_route

    experts = [_with_norms(i) for i in range(5 if gate_scope == "model" else 3)]
    merged = merge_models(experts, 2, route="full", gate_context=gate_context, gate_scope=gate_scope,
                          router=_router() if gate_scope == "model" else None).eval()
    assert merged.cfg.routed_embeddings and merged.cfg.num_params() == sum(p.numel() for p in merged.parameters())
    torch.testing.assert_close(merged.tok_embeddings.shared.weight,
                               torch.stack([e.tok_embeddings.weight for e in experts]).mean(0))
    with torch.no_grad():
        for i, expert in enumerate(experts):
            with forced_route(merged, i):
                torch.testing.assert_close(merged(_tokens()).logits, expert(_tokens()).logits.log_softmax(-1),
                                           atol=1e-5, rtol=0)
        out = merged(_tokens())  # its own (zero) routers: one counts row per routed module, embeddings first
    assert out.expert_counts.shape[0] == 2 * CFG.n_layers + 2
    with pytest.raises(ValueError, match="route"):
        merge_models(experts, 2, route="every")


def test_a_fully_routed_merge_trains_its_heads_with_adamw_and_its_matrices_with_muon():
    from training import optim

    merged = merge_models([_model(0), _model(1)], 1, route="all")
    opt = optim.build_optimizer(merged, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                                device=torch.device("cpu"), optimizer="muon")
    names = {id(p): n for n, p in merged.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert any(".attention.experts.1.wqkv" in n for n in muon)
    assert not any(n.startswith("output.") or n.endswith("gate.weight") for n in muon)
    n = freeze_all_but_routers(merged)  # every router: attention, FFN and head
    assert n == (2 * CFG.n_layers + 1) * 2 * CFG.d_model


def _router():
    """A (random) router of the default size, as the merged config's model router has."""
    from router.model import RouterConfig, RouterModel

    torch.manual_seed(7)
    return RouterModel(RouterConfig(vocab_size=CFG.vocab_size)).eval()


def test_a_model_router_is_the_runs_router_and_a_token_it_sends_to_one_expert_is_that_expert():
    """gate_scope="model": the merged model's one router holds the run's router's weights and chooses
    what that router chooses for each token's document opening; top-1, a token goes through one
    expert's weights in every layer, so a document sent to expert i is computed by expert i; the
    routing shares are the router's, one row per layer."""
    from router.model import RouterConfig, RouterModel, hierarchical_log_probs

    experts, router = [_with_norms(i) for i in range(5)], _router()
    merged = merge_models(experts, 1, route="full", gate_context="doc", gate_scope="model", router=router).eval()
    assert merged.cfg.moe.router_window == 12 and not merged.router.classifier.training
    doc = torch.tensor([[1, *range(40, 60)]])  # <|bos|> and 20 tokens: the opening is the first 12 after it
    with torch.no_grad():
        chosen = merged.router.choose(doc, None, None, merged.doc_starts(doc))[3][:, 0]
        out = router(doc[:, 1:13])  # the router itself on the opening
    assert chosen[12:].tolist() == [int(hierarchical_log_probs(out.group_logits, out.expert_logits)[1].argmax())] * 9
    chat = torch.tensor([[1, 4, *range(40, 60)]])  # a role marker (<|user|>) is not read: 11 tokens of text
    with torch.no_grad():
        chosen = merged.router.choose(chat, None, None, merged.doc_starts(chat))[3][:, 0]
        out = router(chat[:, 2:13])
    assert chosen[12:].tolist() == [int(hierarchical_log_probs(out.group_logits, out.expert_logits)[1].argmax())] * 10
    merged.router.route = _always(2, 5)
    docs = {"e0": [[1, 5, 6, 7]], "e2": [[1, 8, 9]]}
    with torch.no_grad():
        torch.testing.assert_close(merged(_tokens()).logits, experts[2](_tokens()).logits.log_softmax(-1),
                                   atol=1e-5, rtol=0)
    shares = routing_shares(merged, docs, ["e0", "e1", "e2", "e3", "e4"])
    assert shares["own"] == [{"e0": 0.0, "e2": 1.0}] * CFG.n_layers
    with pytest.raises(ValueError, match="no router of its own"):
        merged.layers[0].feed_forward(torch.zeros(1, 2, CFG.d_model))
    with pytest.raises(ValueError, match="needs the run's trained router"):
        merge_models(experts, 1, route="full", gate_context="doc", gate_scope="model")
    small = RouterModel(RouterConfig(vocab_size=CFG.vocab_size, d_embed=8))
    with pytest.raises(CheckpointError, match="differs in size"):
        merge_models(experts, 1, route="full", gate_context="doc", gate_scope="model", router=small)


def test_a_long_document_scored_in_windows_is_the_chosen_experts_in_every_window():
    """A top-1 merge with the run's router, not fine-tuned, scores a document longer than the scoring
    window exactly as the expert its opening is sent to does (what the report's router-top1 row
    scores): a later window is routed from the document's opening, not from its own first ids."""
    from experts.scoring import chunk_spans, token_logprobs

    experts = [_with_norms(i) for i in range(5)]
    merged = merge_models(experts, 1, route="full", gate_context="doc", gate_scope="model", router=_router()).eval()

    def by_opening(opening_NW):  # the expert: the opening's first id mod 5 (expert 0 before any)
        expert_N = opening_NW[:, 0].clamp(min=0) % 5
        probs = torch.nn.functional.one_hot(expert_N, 5).float()
        return probs.log(), probs, torch.ones(len(probs), 1), expert_N[:, None]

    merged.router.route = by_opening
    doc = [1, *torch.randint(2, CFG.vocab_size, (80,), generator=torch.Generator().manual_seed(0)).tolist()]
    doc[1], doc[31], doc[62] = 15, 16, 17  # sent to expert 0; windows start at 31 and 62, read alone they'd go to 1, 2
    assert [s for s, _ in chunk_spans(len(doc), CFG.max_seq_len)] == [0, 31, 62]
    with torch.no_grad():
        got = token_logprobs(merged, [doc], window=CFG.max_seq_len)[0].logprobs
        want = token_logprobs(experts[0], [doc], window=CFG.max_seq_len)[0].logprobs
    assert len(got) == 80 > 2 * CFG.max_seq_len
    torch.testing.assert_close(got[12:], want[12:], atol=1e-4, rtol=0)  # past the routing prefix
