"""Router training prompts and Q/A evaluation items, drawn from a built corpus."""

from __future__ import annotations

import random

from training.data.build import CorpusSet
from training.data.prompt_views import prompt_views
from training.data.router_prompts import SHARES, router_prompts

QA_DOMAINS = ("math", "reasoning")
# labels that data sets and people put before a question of any domain ("Problem: ...", "Q: ...").
# A router never trained on them reads them as noise: a label it has no example of moved a third
# of the openings of one natural-text set to other experts. Led by them at random in every domain,
# they carry no domain, so the router learns to read past them.
LABELS = ("Problem:", "Question:", "Q:", "Task:", "Exercise:", "Query:", "Input:", "Prompt:", "Example:")


def router_examples(corpus: CorpusSet, split: str, per_domain: int | None = 500, seed: int = 0,
                    view_share: float = 0.0, router_only: bool = False) -> list[tuple[str, str]]:
    """A balanced, shuffled list of ``(prompt, domain)``: each record's own prompt, plus (with
    ``view_share`` > 0) up to ``view_share * per_domain`` user-style rephrasings per domain
    (``training.data.prompt_views``) drawn from the same split's records, plus (with ``router_only``)
    ``SHARES[domain] * per_domain`` prompts of ``training.data.router_prompts``, which no expert
    trains on. Test prompts (the report's in-distribution figures) are the records' own prompts only."""
    out = []
    for domain in corpus.domains:
        docs = corpus.docs(domain, split)
        prompts = sorted({r["prompt"].strip() for r in docs if r["prompt"].strip()})
        rng = random.Random(f"{seed}:{domain}")
        rng.shuffle(prompts)
        out.extend((p, domain) for p in prompts[:per_domain])
        if view_share > 0:
            n = int(view_share * (len(prompts) if per_domain is None else min(per_domain, len(prompts))))
            out.extend((v, domain) for v in _views(docs, domain, n, seed))
        if router_only and SHARES.get(domain):
            n = int(SHARES[domain] * (len(prompts) if per_domain is None else per_domain))
            out.extend((p, domain) for p in router_prompts(corpus, domain, split, n, seed))
    random.Random(seed).shuffle(out)
    return out


def with_labels(examples: list[tuple[str, str]], share: float, seed: int = 0) -> list[tuple[str, str]]:
    """``examples`` with a seeded ``share`` of their prompts led by one of :data:`LABELS`, chosen
    without regard to the domain."""
    rng = random.Random(f"labels:{seed}")
    return [(f"{rng.choice(LABELS)} {p}", d) if rng.random() < share else (p, d) for p, d in examples]


def _views(docs: list[dict], domain: str, n: int, seed: int) -> list[str]:
    """Up to ``n`` distinct rephrasings, from records visited in a seeded order."""
    rng = random.Random(f"views:{seed}:{domain}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    seen: set[str] = set()
    for i in order:
        if len(seen) >= n:
            break
        seen.update(v.strip() for v in prompt_views(docs[i], domain, rng)[:2])
    return sorted(seen)[:n]


def qa_items(corpus: CorpusSet, domain: str, split: str = "test") -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of a math or reasoning split, for exact-match evaluation."""
    if domain not in QA_DOMAINS:
        raise ValueError(f"qa_items: domain {domain!r} has no Q/A items; use one of {QA_DOMAINS}")
    return [(r["question"], r["answer"]) for r in corpus.docs(domain, split) if r["question"]]
