"""Deterministic splits by a hash of a document's split key, and exact-duplicate removal."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLITS: tuple[str, ...] = ("train", "val", "test")


def split_of(split_key: str, *, val: float, test: float, salt: str = "hmoe") -> str:
    """``train``/``val``/``test`` from a hash of ``split_key``: stable, never by position."""
    h = int.from_bytes(hashlib.sha256(f"{salt}:{split_key}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < test else "val" if h < test + val else "train"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(records: Iterable[dict], *, val: float, test: float,
                  salt: str = "hmoe") -> dict[str, list[dict]]:
    """Split records and drop exact duplicates: a text kept in train never appears in val/test."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in records:
        out[split_of(r["split_key"], val=val, test=test, salt=salt)].append(r)
    seen: set[str] = set()
    for split in SPLITS:  # train first: a duplicate is removed from the held-out side
        kept = []
        for r in out[split]:
            h = text_hash(r["text"])
            if h not in seen:
                seen.add(h)
                kept.append(r)
        out[split] = kept
    return out
