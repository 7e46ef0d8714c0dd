"""Eval-only natural-text sets: non-empty, deterministic, and sharing no text with training."""

from __future__ import annotations

import pytest

from router.domains import DOMAINS
from training.data import SourceUnavailable
from training.data import evalsets
from training.data.evalsets import NATURAL_EVAL_SOURCES, natural_eval_docs
from training.data.sources import load_builtin
from training.data.spec import DEFAULT_SOURCES

WINDOW = 200
# built-in training sources that are cheap to read whole (the generated ones are only checked
# through the tiny corpus); read with stride STRIDE, which finds any shared run >= WINDOW+STRIDE-1
WHOLE_SOURCES = {"conversation": ("chitchat", "alice"), "knowledge": ("factbook",), "code": ("stdlib", "codeio")}
STRIDE = 50


def _docs(domain: str) -> list[dict]:
    try:
        return natural_eval_docs(domain)
    except SourceUnavailable as e:
        pytest.skip(str(e))


def _norm(text: str) -> str:
    return " ".join(text.split())


def _eval_windows(docs: list[dict]) -> dict[int, tuple[str, str]]:
    """Hash of every WINDOW-char window (whitespace-normalised) -> (doc key, window)."""
    out: dict[int, tuple[str, str]] = {}
    for d in docs:
        t = _norm(d["text"])
        for i in range(max(1, len(t) - WINDOW + 1)):
            w = t[i:i + WINDOW]
            out.setdefault(hash(w), (d["key"], w))
    return out


def _shared(windows: dict[int, tuple[str, str]], texts, stride: int = 1) -> list[tuple[str, str]]:
    """(eval key, training key) pairs that share a window; training windows start every ``stride``."""
    hits = []
    for key, text in texts:
        t = _norm(text)
        for i in range(0, max(1, len(t) - WINDOW + 1), stride):
            w = t[i:i + WINDOW]
            found = windows.get(hash(w))
            if found and found[1] == w:
                hits.append((found[0], key))
                break
    return hits


def test_sources_cover_every_domain() -> None:
    assert set(NATURAL_EVAL_SOURCES) == set(DOMAINS)
    assert all(s.install.startswith("pip install ") for s in NATURAL_EVAL_SOURCES.values())
    with pytest.raises(ValueError):
        natural_eval_docs("poetry")


@pytest.mark.parametrize("domain", DOMAINS)
def test_eval_docs_nonempty_and_deterministic(domain: str) -> None:
    docs = _docs(domain)
    assert len(docs) >= 15
    assert all(set(d) == {"key", "source", "text"} and d["text"].strip() for d in docs)
    assert len({d["key"] for d in docs}) == len(docs)
    assert 50_000 <= sum(len(d["text"].encode("utf-8")) for d in docs) <= evalsets.EVAL_BUDGET
    evalsets._cached.cache_clear()  # re-read the package files
    assert natural_eval_docs(domain) == docs


def test_window_check_finds_copied_text() -> None:
    eval_docs = [{"key": "e", "text": "x" * 50 + "".join(chr(65 + i % 26) for i in range(400))}]
    copied = "prefix " + eval_docs[0]["text"][120:380] + " suffix"
    windows = _eval_windows(eval_docs)
    assert _shared(windows, [("t", copied)]) == [("e", "t")]
    assert _shared(windows, [("t", copied[:WINDOW])]) == []


@pytest.mark.parametrize("domain", DOMAINS)
def test_eval_text_not_in_training_corpus(domain: str, tiny_corpus) -> None:
    windows = _eval_windows(_docs(domain))
    corpus = [(r["key"], r["text"]) for s in ("train", "val", "test") for r in tiny_corpus.docs(domain, s)]
    assert corpus and not _shared(windows, corpus)
    built_in = {name for name, _ in DEFAULT_SOURCES[domain]}
    for name in WHOLE_SOURCES.get(domain, ()):
        assert name in built_in
        try:
            records = load_builtin(name, 10**9, seed=0)
        except SourceUnavailable:
            continue
        assert not _shared(windows, ((r["key"], r["text"]) for r in records), stride=STRIDE), name
