"""Router training prompts and Q/A evaluation items, drawn from a built corpus."""

from __future__ import annotations

import random

from training.data.build import CorpusSet

QA_DOMAINS = ("math", "reasoning")


def router_examples(corpus: CorpusSet, split: str, per_domain: int = 500, seed: int = 0) -> list[tuple[str, str]]:
    """A balanced, shuffled list of ``(prompt, domain)``; prompts look like what users type."""
    out = []
    for domain in corpus.domains:
        prompts = sorted({r["prompt"].strip() for r in corpus.docs(domain, split) if r["prompt"].strip()})
        rng = random.Random(f"{seed}:{domain}")
        rng.shuffle(prompts)
        out.extend((p, domain) for p in prompts[:per_domain])
    random.Random(seed).shuffle(out)
    return out


def qa_items(corpus: CorpusSet, domain: str, split: str = "test") -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of a math or reasoning split, for exact-match evaluation."""
    if domain not in QA_DOMAINS:
        raise ValueError(f"qa_items: domain {domain!r} has no Q/A items; use one of {QA_DOMAINS}")
    return [(r["question"], r["answer"]) for r in corpus.docs(domain, split) if r["question"]]
