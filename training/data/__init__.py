"""Corpora: offline sources, typed specs, hash splits, manifests, tokenizer, packed tokens."""

from training.data.build import (CorpusSet, DataError, build_corpora, cache_root, load_corpora,
                                 load_source, verify)
from training.data.packing import TokenBatches, load_tokens, pack
from training.data.router_data import qa_items, router_examples
from training.data.sources import BUILTINS, SourceUnavailable
from training.data.spec import CorpusSpec, DomainSpec, SourceSpec, default_spec
from training.data.splits import SPLITS, assign_splits, split_of

__all__ = ["BUILTINS", "SPLITS", "CorpusSet", "CorpusSpec", "DataError", "DomainSpec", "SourceSpec",
           "SourceUnavailable", "TokenBatches", "assign_splits", "build_corpora", "cache_root",
           "default_spec", "load_corpora", "load_source", "load_tokens", "pack", "qa_items",
           "router_examples", "split_of", "verify"]
