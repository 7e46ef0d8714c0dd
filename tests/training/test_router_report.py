"""training.router_report: the routed rows of the report matrix, on the report's own test documents."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from experts.checkpoint import save_lm
from experts.config import ModelConfig
from experts.model import Transformer
from router.domains import DOMAINS
from router.policy import decide
from tests.router.fixtures import HELD_OUT, make_examples
from training import scoring
from training.router_report import report_rows



def _docs(tokenizer, n: int = 3, max_doc_tokens: int = 40) -> dict:
    """Per domain a few documents: templated prompts, each domain's held-out prompt repeated (long)."""
    texts = {d: [p for p, dd in make_examples(n, seed=7) if dd == d] + [(HELD_OUT[d] + "\n") * 4] for d in DOMAINS}
    return {d: scoring.select_docs(texts[d], tokenizer, budget=None, max_doc_tokens=max_doc_tokens) for d in DOMAINS}


def _ctx(run_dir, tokenizer, models, window=16):
    return scoring.ReportContext(run_dir, None, tokenizer, DOMAINS, _docs(tokenizer), torch.device("cpu"), window,
                                dict(models))


def _run_with_router(trained_router_dir, tmp_path, models: dict) -> object:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_router_dir[0], run_dir / "router")
    for d, (model, cfg) in models.items():
        save_lm(run_dir / "experts" / d, model, cfg)
    return run_dir


def _tiny(tokenizer, seed: int) -> tuple[Transformer, ModelConfig]:
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=32)
    torch.manual_seed(seed)
    return Transformer(cfg).eval(), cfg


def test_routed_rows_match_a_single_expert_when_all_experts_are_equal(trained_router_dir, tokenizer, tmp_path):
    model, cfg = _tiny(tokenizer, 0)
    run_dir = _run_with_router(trained_router_dir, tmp_path, {d: (model, cfg) for d in DOMAINS})
    ctx = _ctx(run_dir, tokenizer, {d: model for d in DOMAINS})
    rows = report_rows(ctx)
    assert set(rows) == {"router-top1", "router-mixture"}
    ref_cells = ctx.score("math")  # every expert is this model
    for d in DOMAINS:
        ref = ref_cells[d]
        for name in rows:
            assert rows[name][d].tokens == ref.tokens == ctx.docs[d].tokens > 0
            assert rows[name][d].bytes == ref.bytes
            assert rows[name][d].nats == pytest.approx(ref.nats, rel=1e-4)
    section = ctx.sections["router"]
    assert section["scored_documents"] == sum(len(ctx.docs[d].ids) for d in DOMAINS)
    assert set(section["routed_accuracy"]["by_domain"]) == set(DOMAINS)
    # no corpus: the openings of the scored documents are evaluated
    assert section["opening_accuracy"]["n"] == section["scored_documents"]
    saved = json.loads((run_dir / "metrics" / "router_eval.json").read_text())
    assert saved["test_openings"]["n"] == section["scored_documents"]
    # the out-of-distribution probes are always evaluated (12 and 15 per domain)
    assert saved["probes"]["n"] == 60 and saved["probes_heldout"]["n"] == 75
    assert section["heldout_probe_accuracy"]["all"] == saved["probes_heldout"]["expert_accuracy"]
    # the evaluation-only prompts, when their packages are installed: figures, confusion, failures
    if "eval_prompts" in saved:
        ev = section["eval_prompts"]
        assert ev["n"] == saved["eval_prompts"]["n"] == sum(ev["n_by_domain"].values()) > 0
        assert sum(sum(row.values()) for row in ev["confusion"].values()) == ev["n"]
        assert section["eval_prompt_accuracy"]["all"] == ev["expert_accuracy"]
        assert set(ev["halves"]) == {"dev", "test"} and len(ev["failures"]) <= 10
        assert all(f["true"] != f["routed"] for f in ev["failures"])


def test_routed_rows_use_the_chosen_experts(trained_router_dir, tokenizer, tmp_path):
    from training.router_report import report_rows, route_all

    models = {d: _tiny(tokenizer, i) for i, d in enumerate(DOMAINS)}
    run_dir = _run_with_router(trained_router_dir, tmp_path, models)
    ctx = _ctx(run_dir, tokenizer, {d: m for d, (m, _) in models.items()})
    rows = report_rows(ctx)
    from router.router import load_router

    router = load_router(run_dir / "router", tokenizer=tokenizer)
    for d in DOMAINS:
        decisions = route_all(router, ctx.docs[d].openings)
        lp = {e: ctx.scored(e)[d] for e in DOMAINS}
        top1 = sum(-float(lp[m.experts[0]][i].sum()) for i, m in enumerate(decisions))
        assert rows["router-top1"][d].nats == pytest.approx(top1, rel=1e-5)
        mix = 0.0
        for i, m in enumerate(decisions):
            probs = torch.stack([lp[e][i].exp() * w for e, w in zip(m.experts, m.weights)]).sum(0)
            mix -= float(probs.log().sum())
        assert rows["router-mixture"][d].nats == pytest.approx(mix, rel=1e-4)
        assert decisions[0] == decide(decisions[0].expert_probs, threshold=1.0, top_k=router.top_k)


def test_no_router_checkpoint_means_no_rows(tmp_path, tokenizer):
    ctx = SimpleNamespace(run_dir=tmp_path, corpus=None, tokenizer=tokenizer, domains=DOMAINS, docs={},
                          device=torch.device("cpu"))
    assert report_rows(ctx) == {}


def test_document_openings_are_router_examples(tokenizer):
    from router.prefix import ROUTING_PREFIX_TOKENS, prefix_text
    from training.router_train import RouterTrainConfig, document_openings

    code = "# license header\nimport os\n" + "x = 1\n" * 100
    docs = {"code": [{"text": code}, {"text": "  "}], "math": [{"text": "What is 2 + 2?\n4"}]}
    corpus = SimpleNamespace(domains=tuple(docs), docs=lambda d, split: docs[d])
    out = document_openings(corpus, tokenizer, "train", None)
    assert sorted(out) == [(prefix_text(tokenizer, code), "code"), (prefix_text(tokenizer, "What is 2 + 2?\n4"), "math")]
    assert prefix_text(tokenizer, code) == tokenizer.decode(tokenizer.encode(code)[:ROUTING_PREFIX_TOKENS])
    assert code.startswith(prefix_text(tokenizer, code)) and len(prefix_text(tokenizer, code)) < len(code) / 10
    assert document_openings(corpus, tokenizer, "train", 0) == []
    with pytest.raises(ValueError, match="opening_share"):
        RouterTrainConfig(opening_share=-1)


def test_no_row_scores_the_routing_prefix(trained_router_dir, tokenizer, tmp_path):
    """Prefix tokens get log-prob -1000 and the rest -1: a row that scored any prefix token would show it."""
    models = {d: _tiny(tokenizer, i) for i, d in enumerate(DOMAINS)}
    run_dir = _run_with_router(trained_router_dir, tmp_path, models)
    ctx = _ctx(run_dir, tokenizer, {d: m for d, (m, _) in models.items()})
    k = ctx.prefix_tokens
    for e in DOMAINS:
        ctx._cache[e] = {d: [torch.cat([torch.full((min(k, len(ids) - 1),), -1000.0),
                                        torch.full((len(ids) - 1 - k,), -1.0)]) for ids in ctx.docs[d].ids]
                         for d in DOMAINS}
    rows = {**{e: ctx.score(e) for e in DOMAINS}, **report_rows(ctx)}
    assert {"router-top1", "router-mixture"} <= set(rows)
    for d in DOMAINS:
        scored = sum(len(ids) - 1 - k for ids in ctx.docs[d].ids)
        assert ctx.docs[d].tokens == scored > 0
        assert all(len(ids) >= k + 2 for ids in ctx.docs[d].ids)  # every kept document has a token to score
        for name, cells in rows.items():
            assert cells[d].tokens == scored
            assert cells[d].nats == pytest.approx(scored, rel=1e-5), (name, d)
    # what the router read is the prefix that nobody scored: the text of ids 1..k, no further
    for d in DOMAINS:
        for ids, opening in zip(ctx.docs[d].ids, ctx.docs[d].openings):
            assert opening == tokenizer.decode(ids[1:k + 1], skip_special=False)
            assert tokenizer.decode(ids[1:], skip_special=False).startswith(opening)


def test_eval_prompt_figures_and_markdown(trained_router_dir):
    from router.router import load_router
    from training.report_render import _router_markdown
    from training.router_report import eval_prompt_figures, eval_prompt_summary

    router = load_router(trained_router_dir[0])
    examples = [(HELD_OUT[d], d) for d in DOMAINS] + [("xyzzy plugh", d) for d in DOMAINS]
    figs = eval_prompt_figures(eval_prompt_summary(router, examples))
    assert figs["n"] == 10 and figs["n_by_domain"] == {d: 2 for d in DOMAINS} and figs["halves"] == {}
    assert sum(figs["confusion"][d].get(d, 0) for d in DOMAINS) == round(figs["expert_accuracy"] * 10)
    assert len(figs["failures"]) == 10 - round(figs["expert_accuracy"] * 10)
    acc = {"n": figs["n"], "all": figs["expert_accuracy"], "by_domain": figs["by_domain"]}
    md = "\n".join(_router_markdown({"eval_prompt_accuracy": acc, "eval_prompts": figs}, list(DOMAINS)))
    assert "third-party evaluation-only prompts" in md and "### Router on evaluation-only prompts" in md
    assert md.count("| xyzzy plugh |") == sum(f["prompt"] == "xyzzy plugh" for f in figs["failures"])
