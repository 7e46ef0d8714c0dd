"""Packed token arrays (one per domain and split) and a resumable random-window batch iterator.

``<name>.bin`` holds the tokens back to back, each document as ``<|bos|> ... <|eos|>``;
``<name>.json`` holds dtype, token and document counts. Arrays are read as ``np.memmap``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experts.atomic import atomic_write_bytes, atomic_write_json
from experts.tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def pack(texts: Sequence[str], tokenizer: Tokenizer, path: str | Path, *, chunk: int = 2048) -> dict[str, Any]:
    """Tokenize ``texts`` into ``path.bin`` (+ ``path.json``); returns the metadata written."""
    path = Path(path)
    dtype = token_dtype(tokenizer.vocab_size)
    parts = []
    for i in range(0, len(texts), chunk):
        for ids in tokenizer.encode_batch(texts[i:i + chunk]):
            parts.append(np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype))
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    atomic_write_bytes(path.with_suffix(".bin"), arr.tobytes())
    meta = {"dtype": dtype.name, "n_tokens": int(arr.size), "n_docs": len(texts),
            "n_chars": sum(len(t) for t in texts), "vocab_size": tokenizer.vocab_size}
    atomic_write_json(path.with_suffix(".json"), meta)
    return meta


def load_tokens(path: str | Path) -> np.memmap:
    """The packed tokens at ``path`` (``.bin``/``.json`` pair) as a read-only memmap."""
    path = Path(path)
    meta_path, bin_path = path.with_suffix(".json"), path.with_suffix(".bin")
    if not (meta_path.is_file() and bin_path.is_file()):
        raise FileNotFoundError(f"{bin_path}: packed tokens missing; run `hmoe data build`")
    meta = json.loads(meta_path.read_text())
    if meta["n_tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])  # np.memmap refuses empty files
    return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))


class SeededBatches:
    """A batch iterator whose batch ``k`` depends only on ``(seed, k)``: its state is the counter."""

    path: str
    seed: int
    batch_size: int
    seq_len: int
    step: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"path": self.path, "seed": self.seed, "step": self.step,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "batch_size", "seq_len"):
            if state[k] != getattr(self, k):
                raise ValueError(f"{type(self).__name__} state has {k}={state[k]!r}, this iterator "
                                 f"{getattr(self, k)!r}")
        self.step = int(state["step"])


def window_openings(tokens: np.ndarray, starts: Sequence[int], window: int, doc_start_id: int,
                    marks: np.ndarray | None = None) -> torch.Tensor:
    """``(B, window)`` int64: for windows of ``tokens`` beginning at ``starts``, the opening of the
    document each one begins in the middle of (``experts.moe.document_opening``; -1 pads), what a
    model router (``moe.gate_scope: model``) reads for it. ``marks``: where ``doc_start_id`` is."""
    from experts.moe import document_opening

    if marks is None:
        marks = np.flatnonzero(np.asarray(tokens) == doc_start_id)
    return torch.tensor([document_opening(tokens, int(s), window, doc_start_id, marks) for s in starts],
                        dtype=torch.long).view(len(starts), window)


class TokenBatches(SeededBatches):
    """Random windows of one packed split: yields ``(x, y)`` int64 tensors of shape (B, T).

    Batch ``k`` depends only on ``(seed, k)``, so ``state_dict()`` is the step counter and a
    restored iterator yields exactly the batches the original would have. ``opening_window`` > 0
    (a model with a model router) yields ``(x, y, opening)``: each window's document opening
    (:func:`window_openings`), so that a window that starts mid-document is routed from it.
    """

    def __init__(self, path: str | Path, batch_size: int, seq_len: int, seed: int = 0,
                 opening_window: int = 0, doc_start_id: int = 1) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        self.tokens = load_tokens(path)
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.path, self.batch_size, self.seq_len, self.seed = str(path), batch_size, seq_len, seed
        self.opening_window, self.doc_start_id = opening_window, doc_start_id
        self.marks = np.flatnonzero(self.tokens == doc_start_id) if opening_window else None
        self.step = 0

    def __next__(self) -> tuple[torch.Tensor, ...]:
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        self.step += 1
        w = torch.from_numpy(windows)
        if self.opening_window:
            opening = window_openings(self.tokens, starts, self.opening_window, self.doc_start_id, self.marks)
            return w[:, :-1], w[:, 1:], opening
        return w[:, :-1], w[:, 1:]  # (B, T), (B, T)

