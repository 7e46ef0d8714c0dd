"""What every row of the run report is scored on, and how a row becomes a cell.

Every row of the matrix is scored on the same test *tokens*: per domain a seeded sample of whole
documents (``<|bos|>`` text ``<|eos|>`` truncated to the report's ``max_doc_tokens``, chunked to the
model context). The first ``router.prefix.ROUTING_PREFIX_TOKENS`` text tokens of each document are
the routing prefix: the router reads them to choose an expert, and no row scores them. So every
cell, the pooled *mixed test* column and the ratios to the dense generalist are like for like. Each
model scores all documents once (``experts.scoring.token_logprobs``); the per-token log-probs are
cached in the :class:`ReportContext` so that rows combining experts (the router's) cost no extra
forward pass.

Rows that combine models (the router's, ``training.router_report``) come from *row providers*:
callables ``provider(ctx: ReportContext) -> dict[row_name, dict[domain, Cell]]``; more can be
passed as ``write_report(extra_rows=[...])``. A provider may add a report section in
``ctx.sections[name]``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experts.scoring import token_logprobs
from router.domains import DOMAINS
from router.prefix import ROUTING_PREFIX_TOKENS, prefix_ids, scored_targets, unscored

SCORE_BATCH = 32  # chunks per forward pass when scoring
RATIO_ROWS = ("router-top1", "router-mixture", "merged", "baseline-moe", "seed")  # mixed-test ratios to baseline-dense


@dataclass
class Cell:
    """One (model, domain) entry: totals and the derived perplexity and bits per byte."""

    nats: float
    tokens: int
    bytes: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nats / max(1, self.tokens))

    @property
    def bpb(self) -> float:
        return self.nats / (math.log(2) * max(1, self.bytes))

    def to_dict(self) -> dict[str, float]:
        return {"ppl": round(self.ppl, 4), "bpb": round(self.bpb, 4), "nats": round(self.nats, 3),
                "tokens": self.tokens, "bytes": self.bytes}


@dataclass
class DocSet:
    """The test documents of one domain that every row is scored on (identical tokens for every row)."""

    ids: list[list[int]]  # <|bos|> + text (+ <|eos|>), truncated to the report's max_doc_tokens
    openings: list[str]  # each document's routing prefix as text (what the router reads)
    n_bytes: list[int]  # UTF-8 bytes of each document's scored text (after the prefix; specials excluded)
    prefix_tokens: int = ROUTING_PREFIX_TOKENS

    @property
    def tokens(self) -> int:
        """Scored tokens: every target after the routing prefix."""
        return sum(scored_targets(len(i), self.prefix_tokens) for i in self.ids)


@dataclass
class ReportContext:
    """What row providers get: the run, its corpus and tokenizer, the test documents and the loaded models.

    Every row is scored on the tokens of ``docs`` after their routing prefix: ``scored(name)`` gives
    each model's log-probs of exactly those tokens, ``prefix_logprobs(name)`` those of the prefix
    (for a likelihood router that reads it). Both slice one cached pass per model, so providers
    combine experts without re-scoring. Providers may put a JSON-able section of the report in
    ``sections[name]``.
    """

    run_dir: Path
    corpus: Any
    tokenizer: Any
    domains: tuple[str, ...]
    docs: dict[str, DocSet]
    device: torch.device
    window: int  # context length every document is chunked to (the smallest model context)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    name: str = "test"  # which document set: "test" (the corpus's test split) or "natural" (evaluation-only)
    batch_size: int = SCORE_BATCH
    _cache: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict, repr=False)

    @property
    def prefix_tokens(self) -> int:
        return next(iter(self.docs.values())).prefix_tokens if self.docs else ROUTING_PREFIX_TOKENS

    def logprobs(self, name: str, model: torch.nn.Module | None = None) -> dict[str, list[torch.Tensor]]:
        """Domain -> per-document log p(token_t | earlier tokens), t = 1..n-1, prefix included (cached)."""
        if name not in self._cache:
            model = model if model is not None else self.models[name]
            flat = [ids for d in self.domains for ids in self.docs[d].ids]
            lps = [s.logprobs for s in token_logprobs(model, flat, window=self.window, batch_size=self.batch_size)]
            out, i = {}, 0
            for d in self.domains:
                n = len(self.docs[d].ids)
                out[d], i = lps[i:i + n], i + n
            self._cache[name] = out
        return self._cache[name]

    def scored(self, name: str, model: torch.nn.Module | None = None) -> dict[str, list[torch.Tensor]]:
        """Domain -> per-document log-probs of the scored tokens (after the routing prefix)."""
        k = self.prefix_tokens
        return {d: [x[k:] for x in lps] for d, lps in self.logprobs(name, model).items()}

    def prefix_logprobs(self, name: str, model: torch.nn.Module | None = None) -> dict[str, list[torch.Tensor]]:
        """Domain -> per-document log-probs of the routing prefix's tokens (never scored in a row)."""
        k = self.prefix_tokens
        return {d: [x[:k] for x in lps] for d, lps in self.logprobs(name, model).items()}

    def cell(self, domain: str, nlls: Iterable[float]) -> Cell:
        """The Cell of ``domain`` from per-document NLLs of its scored tokens."""
        return Cell(sum(float(x) for x in nlls), self.docs[domain].tokens, sum(self.docs[domain].n_bytes))

    def score(self, name: str, model: torch.nn.Module | None = None) -> dict[str, Cell]:
        lp = self.scored(name, model)
        return {d: self.cell(d, (-float(x.sum()) for x in lp[d])) for d in self.domains}


# ---- the documents and the rows ------------------------------------------------------------------
MODEL_NAMES = (*DOMAINS, "seed", "merged", "baseline-dense", "baseline-moe")  # the LMs a run can hold


def model_dir(run_dir: str | Path, name: str) -> Path:
    """Where a run keeps the LM called ``name`` (one of ``MODEL_NAMES``): ``experts/<domain>``,
    ``seed``, ``merged`` (Branch-Train-MiX) or ``baselines/<dense|moe>``."""
    run_dir = Path(run_dir)
    if name in DOMAINS:
        return run_dir / "experts" / name
    if name in ("seed", "merged"):
        return run_dir / name
    if name in ("baseline-dense", "baseline-moe"):
        return run_dir / "baselines" / name.removeprefix("baseline-")
    raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")


def model_dirs(run_dir: Path) -> dict[str, Path]:
    """Row name -> finished LM checkpoint: experts in domain order, the seed, the merged model, the baselines."""
    return {n: model_dir(run_dir, n) for n in MODEL_NAMES if (model_dir(run_dir, n) / "meta.json").exists()}


def select_docs(texts: Iterable[str], tokenizer: Any, *, budget: int | None, max_doc_tokens: int,
                seed: int = 0, prefix_tokens: int = ROUTING_PREFIX_TOKENS) -> DocSet:
    """A seeded random sample of documents, each truncated to ``max_doc_tokens``, until ``budget``
    scored tokens. A document too short to have a token after its routing prefix is skipped."""
    from router.evaluate import doc_ids

    texts = [t for t in texts if t and t.strip()]
    random.Random(seed).shuffle(texts)
    ids_out, openings, n_bytes, total = [], [], [], 0
    for text in texts:
        if budget is not None and total >= budget:
            break
        ids = doc_ids(tokenizer, text[: 16 * max_doc_tokens], max_doc_tokens)
        if scored_targets(len(ids), prefix_tokens) < 1:
            continue
        ids_out.append(ids)
        openings.append(tokenizer.decode(prefix_ids(ids, prefix_tokens), skip_special=False))
        n_bytes.append(len(tokenizer.decode(ids[unscored(prefix_tokens):]).encode("utf-8")))
        total += scored_targets(len(ids), prefix_tokens)
    return DocSet(ids_out, openings, n_bytes, prefix_tokens)


def build_context(run_dir: Path, corpus: Any, models: dict[str, torch.nn.Module], budget: int | None,
             max_doc_tokens: int, device: torch.device,
             texts: dict[str, Iterable[str]] | None = None, name: str = "test") -> ReportContext:
    """The context of one document set: the corpus's test split, or ``texts`` per domain."""
    tok = corpus.tokenizer()
    if texts is None:
        texts = {d: (r["text"] for r in corpus.docs(d, "test")) for d in DOMAINS if d in corpus.domains}
    docs = {d: select_docs(t, tok, budget=budget, max_doc_tokens=max_doc_tokens) for d, t in texts.items()}
    window = min((m.cfg.max_seq_len for m in models.values()), default=max_doc_tokens)
    return ReportContext(run_dir, corpus, tok, tuple(docs), docs, device, window, models, name=name)


def external_rows(ctx: ReportContext, providers: Iterable[Callable]) -> dict[str, dict[str, Cell]]:
    """The rows of every provider (a provider that fails fails the report: a missing row would
    silently change what the report compares)."""
    rows: dict[str, dict[str, Cell]] = {}
    for fn in providers:
        rows.update(fn(ctx) or {})
    return rows


# ---- summaries of the matrix --------------------------------------------------------------------
def beats_dense(matrix: dict[str, dict[str, dict]], domains: tuple[str, ...],
                 base: str = "baseline-dense") -> dict[str, bool] | None:
    """Per domain: does the domain's own expert have a lower perplexity there than ``base``?"""
    if base not in matrix:
        return None
    return {d: matrix[d][d]["ppl"] < matrix[base][d]["ppl"] for d in domains if d in matrix}


def own_best(matrix: dict[str, dict[str, dict]], domains: tuple[str, ...]) -> bool | None:
    experts = [d for d in domains if d in matrix]
    if len(experts) < 2:
        return None
    return all(matrix[d][d]["ppl"] < min(matrix[e][d]["ppl"] for e in experts if e != d) for d in experts)


def mixed_rows(matrix: dict[str, dict[str, Cell]], domains: tuple[str, ...]) -> dict[str, dict]:
    """Every row with a cell on every domain: all domains' documents pooled (token-weighted)."""
    out = {}
    for name, cells in matrix.items():
        if all(d in cells for d in domains):
            out[name] = Cell(sum(cells[d].nats for d in domains), sum(cells[d].tokens for d in domains),
                             sum(cells[d].bytes for d in domains)).to_dict()
    return out


def ratios_to(mixed: dict[str, dict], base: str = "baseline-dense") -> dict[str, float]:
    if base not in mixed:
        return {}
    return {f"{n}/{base.removeprefix('baseline-')}": round(mixed[n]["ppl"] / mixed[base]["ppl"], 4)
            for n in RATIO_ROWS if n in mixed}
