"""Evaluation-only routing prompts: deterministic, five labelled domains, none seen in training."""

from __future__ import annotations

import re

import pytest

from router.domains import DOMAINS
from tests.data.test_evalsets import WHOLE_SOURCES
from training.data import SourceUnavailable, router_examples
from training.data import eval_prompts as ep
from training.data.sources import load_builtin

LONG = 40  # normalised characters from which a prompt is also looked for inside training text


def _prompts(domain: str) -> list[dict]:
    try:
        return ep.eval_prompts(domain)
    except SourceUnavailable as e:
        pytest.skip(str(e))


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@pytest.mark.parametrize("domain", DOMAINS)
def test_prompts_deterministic_and_labelled(domain: str) -> None:
    prompts = _prompts(domain)
    assert 50 <= len(prompts) <= ep.PER_DOMAIN
    assert all(set(p) == {"key", "domain", "prompt", "half"} and p["domain"] == domain for p in prompts)
    assert all(p["prompt"].strip() and p["half"] in ep.HALVES for p in prompts)
    assert len({p["key"] for p in prompts}) == len({_norm(p["prompt"]) for p in prompts}) == len(prompts)
    assert {p["half"] for p in prompts} == set(ep.HALVES)
    ep._cached.cache_clear()  # re-read the package files
    assert ep.eval_prompts(domain) == prompts


def test_every_domain_and_no_prompt_with_two_labels() -> None:
    examples, skipped = ep.eval_prompt_examples()
    if skipped:
        pytest.skip("; ".join(skipped))
    assert {d for _, d in examples} == set(DOMAINS)
    assert len({_norm(p) for p, _ in examples}) == len(examples)
    dev, _ = ep.eval_prompt_examples(half="dev")
    test, _ = ep.eval_prompt_examples(half="test")
    assert sorted(dev + test) == sorted(examples) and dev and test
    with pytest.raises(ValueError, match="half"):
        ep.eval_prompt_examples(half="train")


def test_labelling_rules() -> None:
    assert ep.is_factual("who invented the steam engine") and ep.is_factual("tell me about venus")
    assert ep.is_factual("What does YOLO mean?")
    assert not ep.is_factual("What is your favorite book?") and not ep.is_factual("tell me about your dreams")
    assert not ep.is_factual("What's up?") and not ep.is_factual("I love baseball")
    assert ep.is_chat("do you ever get bored", "emotion") and ep.is_chat("Greetings!", "greetings")
    assert not ep.is_chat("stock market", "money") and not ep.is_chat("what is money", "money")


def _training_prompts(corpus) -> set[str]:
    """Every router training prompt (all splits, with rephrasings and router-only prompts) and every
    record's own prompt."""
    out = {_norm(p) for s in ("train", "val", "test")
           for p, _ in router_examples(corpus, s, per_domain=None, view_share=0.5, router_only=True)}
    return out | {_norm(r["prompt"]) for d in corpus.domains for s in ("train", "val", "test")
                  for r in corpus.docs(d, s)}


def _training_texts(corpus):
    yield from (r["text"] for d in corpus.domains for s in ("train", "val", "test") for r in corpus.docs(d, s))
    for name in sorted({n for names in WHOLE_SOURCES.values() for n in names}):
        try:
            yield from (r["text"] for r in load_builtin(name, 10**9, seed=0))
        except SourceUnavailable:
            continue


def test_no_prompt_in_training(tiny_corpus) -> None:
    examples, _ = ep.eval_prompt_examples()
    if not examples:
        pytest.skip("no evaluation-only prompt source installed")
    normed = {_norm(p) for p, _ in examples}
    assert not normed & _training_prompts(tiny_corpus)
    long = [p for p in normed if len(p) >= LONG]
    text = "\n".join(_norm(t) for t in _training_texts(tiny_corpus))
    assert long and not [p for p in long if p in text]
    chatter = [p for d in ("conversation", "knowledge") for p in ep.eval_prompts(d)]
    assert not [p for p in chatter if ep.in_conversation_training(p["prompt"])]
    seen = sorted(ep._training_turns()[0], key=len)[-1]  # the check finds what training has
    assert ep.in_conversation_training(seen.upper()) and ep.in_conversation_training(f"{seen[5:40]}!")
