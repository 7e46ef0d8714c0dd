"""Evaluation helpers, the likelihood (BTM) reference router and routed perplexity."""

from __future__ import annotations


import pytest
import torch

from experts.config import ModelConfig
from experts.model import Transformer
from experts.scoring import token_logprobs
from router import load_router
from router.domains import DOMAINS
from router.evaluate import compare_with_likelihood, evaluate_router, plot_confusion
from router.likelihood import LikelihoodRouter


@pytest.fixture(scope="module")
def experts(tokenizer) -> dict[str, Transformer]:
    out = {}
    for i, d in enumerate(DOMAINS):
        torch.manual_seed(i)
        out[d] = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=32)).eval()
    return out


def test_evaluate_router_metrics_and_plot(trained_router_dir, router_data, tmp_path):
    router = load_router(trained_router_dir[0])
    m = evaluate_router(router, router_data["test"])
    assert m["n"] == len(router_data["test"])
    assert sum(map(sum, m["confusion"])) == m["n"]
    diag = sum(m["confusion"][i][i] for i in range(len(DOMAINS)))
    assert m["expert_accuracy"] == pytest.approx(diag / m["n"])
    assert m["group_accuracy"] >= m["expert_accuracy"] >= 0.9
    assert 0.0 <= m["ece"] <= 0.2 and m["labels"] == list(DOMAINS)
    png = plot_confusion(m["confusion"], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_likelihood_router_is_the_posterior_of_summed_loglik(experts, tokenizer):
    ref = LikelihoodRouter(experts, tokenizer, max_tokens=32)
    prompt = "What is 12 + 30?"
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    ll = torch.stack([token_logprobs(m, [ids])[0].logprobs.sum() for m in experts.values()]).double()
    probs = ref.expert_probs([prompt])[0]
    assert list(probs.values()) == pytest.approx(torch.softmax(ll, 0).tolist(), abs=1e-4)
    d = ref.route(prompt)
    assert d.expert_probs[d.experts[0]] == pytest.approx(max(probs.values()))
    assert ref.route("  ").mode == "default"


def test_likelihood_router_picks_the_expert_that_fits(tokenizer):
    """An expert trained a few steps on one prompt style wins on that style."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=32)
    fitted = {d: Transformer(cfg) for d in ("math", "code")}
    texts = {"math": "What is 12 + 34? Compute 56 * 7.", "code": "def f(x):\n    return [y for y in x]"}
    for d, model in fitted.items():
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(texts[d])]])
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:])
            opt.zero_grad(), loss.backward(), opt.step()
        model.eval()
    ref = LikelihoodRouter(fitted, tokenizer)
    assert ref.route("What is 13 + 35?").expert == "math"
    assert ref.route("def g(x):\n    return [z for z in x]").expert == "code"


def test_compare_with_likelihood_shapes(trained_router_dir, router_data, experts, tokenizer):
    router = load_router(trained_router_dir[0])
    out = compare_with_likelihood(router, experts, tokenizer, router_data["test"][:20], max_tokens=32)
    assert out["n"] == 20
    for name in ("learned", "likelihood"):
        assert 0.0 <= out[name]["accuracy"] <= 1.0 and set(out[name]["by_domain"]) == set(DOMAINS)
    assert out["learned"]["accuracy"] >= 0.9
