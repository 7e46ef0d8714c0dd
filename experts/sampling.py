"""Sampling: pure functions over one row of logits ``(V,)`` with an explicit ``torch.Generator``.

Layered like litgpt: ``apply_repetition_penalty -> top_k_filter -> top_p_filter -> sample``.
``temperature == 0`` is greedy (argmax; top-k / top-p do not matter then, the penalty does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each new token, and when to stop."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; CTRL-style over every id seen so far
    frequency_penalty: float = 0.0  # OpenAI's: minus this times an id's count in the generated ids
    presence_penalty: float = 0.0  # OpenAI's: minus this for an id that was generated at all
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 = greedy)")
        _check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0")
        for name in ("frequency_penalty", "presence_penalty"):
            _check(-2 <= getattr(self, name) <= 2, name, getattr(self, name), "must be in [-2, 2] (0 = off)")
        _check(self.max_new_tokens >= 0, "max_new_tokens", self.max_new_tokens, "must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Some penalty changes the logits (so greedy is not simply their argmax)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {rule}")


def apply_repetition_penalty(logits: torch.Tensor, seen: Iterable[int], penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): divide positive logits of seen ids by ``penalty``, multiply negative ones."""
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    if penalty == 1.0 or ids.numel() == 0:
        return logits
    picked = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_frequency_penalty(logits: torch.Tensor, generated: Sequence[int], frequency: float,
                            presence: float) -> torch.Tensor:
    """OpenAI's penalties: subtract ``frequency`` times each id's count in ``generated``, and
    ``presence`` once for every id in it (a loop costs more the longer it runs)."""
    if not generated or (frequency == 0 and presence == 0):
        return logits
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long, device=logits.device),
                            minlength=logits.shape[-1]).to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (ties at the threshold are kept), set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely ids whose probability reaches ``p`` (always >= 1 id)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = (probs.cumsum(-1) - probs) >= p  # the mass *before* this id already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _filtered(logits: torch.Tensor, params: SamplingParams, seen: Iterable[int],
              generated: Sequence[int]) -> torch.Tensor:
    """The logits a choice is made from: penalties, then (when sampling) temperature, top-k, top-p."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = apply_frequency_penalty(logits, generated, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return logits
    return top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: Iterable[int] = (), generated: Sequence[int] = ()) -> int:
    """Pick one id from ``logits (V,)``: penalties (over the ``seen`` ids: prompt and reply; over the
    ``generated`` ones: the reply), then greedy or temperature / top-k / top-p sampling."""
    logits = _filtered(logits, params, seen, generated)
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def sample_allowed(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                   seen: Iterable[int], generated: Sequence[int], allows: Callable[[int], bool],
                   max_tries: int) -> int:
    """``sample`` restricted to ids that ``allows`` accepts, trying at most ``max_tries`` of them in the
    order the sampler would take them (greedy: by logit; sampled: redrawn without the refused id).
    When none of them is accepted the first one is returned: a guard steers, it never blocks."""
    logits = _filtered(logits, params, seen, generated)
    if params.greedy:
        order = torch.topk(logits, min(max_tries, logits.shape[-1])).indices.tolist()
        return next((t for t in order if allows(t)), order[0])
    probs = torch.softmax(logits, dim=-1)
    first = None
    for _ in range(max_tries):
        t = int(torch.multinomial(probs, 1, generator=generator))
        if allows(t):
            return t
        first = t if first is None else first
        probs[t] = 0.0
        if not bool(probs.any()):
            break
    return first


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` (or a fresh random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
