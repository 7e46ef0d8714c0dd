"""Instruction items as token rows with a loss mask, and the resumable batches of the instruction stage.

Each item is encoded in the chat format (``<|bos|><|user|>q<|end|><|assistant|>a<|end|>``); only
the assistant turns' tokens and their closing ``<|end|>`` are trained on (the target of every other
position is :data:`IGNORE`). Rows of ``seq_len + 1`` tokens are filled with whole items drawn at
random (the last one cut at the row's end), so short items share a row instead of padding it.

Items are drawn in proportion to their ``weight`` (default 1), so a family of short items can get
the share of the tokens it needs.

Stored once per run (``<run>/instruct/<domain>.npz``: ids, mask, offsets, levels, weights), by
:func:`write_items`, so every task that trains on a domain reads the same encoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experts.atomic import atomic_write_bytes
from experts.tokenizer import Tokenizer
from training.data.packing import SeededBatches

IGNORE = -100  # target id of a position the loss skips


def answer_mask(ids: Sequence[int], tok: Tokenizer) -> list[bool]:
    """True at the tokens of assistant turns (after ``<|assistant|>``, through its ``<|end|>``)."""
    mask, inside = [], False
    for t in ids:
        mask.append(inside)
        if t == tok.assistant_id:
            inside = True
        elif t == tok.end_id:
            inside = False
    return mask


def untrain_tool_outputs(ids: Sequence[int], mask: list[bool], tool: Any) -> list[bool]:
    """``mask`` with the tokens a ``tool`` writes at generation (``experts.calculator``: the value
    after ``345 + 278 = ``) left out of the loss, as a tool's output is: the model learns to make the
    call, and its gradient is not spent on values it is never asked to produce."""
    out, start = list(mask), None
    for i, m in enumerate(mask):
        if not m:
            start = None
            continue
        start = i if start is None else start
        forced = tool(list(ids[start:i + 1]))
        if forced and list(ids[i + 1:i + 1 + len(forced)]) == forced:
            out[i + 1:i + 1 + len(forced)] = [False] * len(forced)
    return out


def encode_items(tok: Tokenizer, items: Sequence[dict[str, Any]], max_len: int, *,
                 tool: Any = None) -> dict[str, np.ndarray]:
    """Ids, answer mask, offsets and curriculum levels of the ``items`` that fit in ``max_len`` tokens
    (a longer one is left out: cut, it would lose its answer); with a ``tool``, what it would write
    is not trained on (:func:`untrain_tool_outputs`)."""
    encoded = tok.chat_batch([it["messages"] for it in items])
    fits = [len(e) <= max_len for e in encoded]
    encoded = [e for e, f in zip(encoded, fits) if f]
    items = [it for it, f in zip(items, fits) if f]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(offsets[-1]))
    masks = (answer_mask(e, tok) for e in encoded)
    if tool is not None:
        masks = (untrain_tool_outputs(e, m, tool) for e, m in zip(encoded, masks))
    mask = np.fromiter((m for ms in masks for m in ms), dtype=bool, count=int(offsets[-1]))
    levels = np.array([int(it.get("level", 0)) for it in items], dtype=np.int16)
    weights = np.array([float(it.get("weight", 1.0)) for it in items], dtype=np.float64)
    return {"ids": ids, "mask": mask, "offsets": offsets, "levels": levels, "weights": weights}


def write_items(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write encoded items as one ``.npz``, atomically."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_items(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: instruction items missing; re-run `hmoe train` to write them")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def count_items(path: str | Path) -> int:
    """How many items an instruction file holds."""
    return len(load_items(path)["levels"])


class InstructBatches(SeededBatches):
    """Random rows of packed instruction items: ``(x, y)`` with ``y == IGNORE`` off the answers.

    Batch ``k`` depends only on ``(seed, k)``, so ``state_dict()`` is the batch counter. With a
    curriculum (items with ``level`` > 0), batch ``k`` of ``total`` draws only items of level at most
    ``ceil(max_level * (k + 1) / (ramp * total))``: the hardest level is reached after ``ramp`` of the
    stage, and items of level 0 are drawn throughout.
    """

    def __init__(self, path: str | Path, batch_size: int, seq_len: int, seed: int = 0, *,
                 total: int = 0, ramp: float = 0.5) -> None:
        arr = load_items(path)
        self.ids, self.mask, self.offsets, self.levels = arr["ids"], arr["mask"], arr["offsets"], arr["levels"]
        if len(self.levels) == 0:
            raise ValueError(f"{path}: no instruction items")
        weights = arr.get("weights", np.ones(len(self.levels)))
        self.path, self.batch_size, self.seq_len, self.seed = str(path), batch_size, seq_len, seed
        self.total, self.ramp, self.step = total, ramp, 0
        self.max_level = int(self.levels.max())
        self._order = np.argsort(self.levels, kind="stable")  # items by level, for the curriculum
        self._count_upto = np.searchsorted(self.levels[self._order], np.arange(self.max_level + 1), side="right")
        self._cum_weight = np.cumsum(weights[self._order])  # draws are weighted: a search in this

    def _eligible(self) -> int:
        """How many items (a prefix of ``_order``) batch ``step`` may draw from."""
        if self.max_level == 0 or not self.total:
            return len(self._order)
        level = math.ceil(self.max_level * (self.step + 1) / max(1.0, self.ramp * self.total))
        return int(self._count_upto[min(self.max_level, max(1, level))])

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step])
        n, width = self._eligible(), self.seq_len + 1
        total_w = self._cum_weight[n - 1]
        tokens = np.zeros((self.batch_size, width), dtype=np.int64)
        keep = np.zeros((self.batch_size, width), dtype=bool)
        for row in range(self.batch_size):
            filled = 0
            while filled < width:
                i = self._order[min(n - 1, int(np.searchsorted(self._cum_weight, rng.random() * total_w, side="right")))]
                a, b = self.offsets[i], self.offsets[i + 1]
                take = min(b - a, width - filled)
                tokens[row, filled:filled + take] = self.ids[a:a + take]
                keep[row, filled:filled + take] = self.mask[a:a + take]
                filled += take
        self.step += 1
        y = np.where(keep[:, 1:], tokens[:, 1:], IGNORE)
        return torch.from_numpy(tokens[:, :-1]), torch.from_numpy(y)


class StagedBatches:
    """The pretraining batches for the first ``switch`` batches, then the instruction batches."""

    def __init__(self, first: Any, then: Any, switch: int) -> None:
        self.first, self.then, self.switch, self.k = first, then, switch, 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = next(self.first if self.k < self.switch else self.then)
        self.k += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "switch": self.switch, "first": self.first.state_dict(),
                "then": self.then.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["switch"] != self.switch:
            raise ValueError(f"StagedBatches state switches at batch {state['switch']}, this one at {self.switch}")
        self.k = int(state["k"])
        self.first.load_state_dict(state["first"])
        self.then.load_state_dict(state["then"])


class ReplayBatches:
    """``main``'s batches with a share ``replay`` of them replaced by ``other``'s: batch ``k`` comes
    from ``other`` when ``floor((k + 1) * replay) > floor(k * replay)`` (evenly spread, no RNG)."""

    def __init__(self, main: Any, other: Any, replay: float) -> None:
        if not 0 <= replay < 1:
            raise ValueError(f"replay={replay!r} must be in [0, 1)")
        self.main, self.other, self.replay, self.k = main, other, replay, 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        k, r = self.k, self.replay
        self.k += 1
        return next(self.other if math.floor((k + 1) * r) > math.floor(k * r) else self.main)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "replay": self.replay, "main": self.main.state_dict(), "other": self.other.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["replay"] != self.replay:
            raise ValueError(f"ReplayBatches state has replay={state['replay']}, this one {self.replay}")
        self.k = int(state["k"])
        self.main.load_state_dict(state["main"])
        self.other.load_state_dict(state["other"])
