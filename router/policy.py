"""The routing policy: a pure function from expert probabilities to a routing decision.

Confident prompts go to one expert (``mode="top1"``). When the top expert's probability is below
``threshold``, the ``top_k`` most probable experts are returned with their probabilities
renormalised to sum to one (``mode="ensemble"``); serving decodes with their weighted mixture.
An empty or whitespace-only prompt is not an error: it goes to ``DEFAULT_EXPERT``
(``mode="default"``), see :func:`default_decision`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from router.domains import DEFAULT_EXPERT, DOMAINS, GROUP_NAMES, GROUP_OF, check_domain

Mode = Literal["top1", "ensemble", "default"]


@dataclass(frozen=True)
class Decision:
    """Where a prompt goes: ``experts`` with mixture ``weights`` (summing to one)."""

    group: str  # the most probable group
    group_probs: dict[str, float]  # over GROUP_NAMES
    expert_probs: dict[str, float]  # over DOMAINS, sums to one
    experts: tuple[str, ...]  # most probable first
    weights: tuple[float, ...]
    mode: Mode

    @property
    def expert(self) -> str:
        """The top-1 expert."""
        return self.experts[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_policy_args(threshold: float, top_k: int) -> None:
    """Raise ValueError unless 0 <= threshold <= 1 and 1 <= top_k <= number of experts."""
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold={threshold!r} is invalid: must be a probability in [0, 1]")
    if not (isinstance(top_k, int) and 1 <= top_k <= len(DOMAINS)):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer in [1, {len(DOMAINS)}]")


def _normalise(probs: Mapping[str, float]) -> dict[str, float]:
    for name, p in probs.items():
        check_domain(name)
        if not (math.isfinite(p) and p >= 0.0):
            raise ValueError(f"probability of {name!r} is {p!r}: must be finite and >= 0")
    total = sum(probs.values())
    if total <= 0.0:
        raise ValueError(f"expert probabilities sum to {total}: at least one must be > 0")
    return {d: float(probs.get(d, 0.0)) / total for d in DOMAINS}


def _group_probs(expert_probs: Mapping[str, float]) -> dict[str, float]:
    out = dict.fromkeys(GROUP_NAMES, 0.0)
    for d, p in expert_probs.items():
        out[GROUP_OF[d]] += p
    return out


def default_decision() -> Decision:
    """The decision for an empty prompt: everything on ``DEFAULT_EXPERT``."""
    expert_probs = {d: float(d == DEFAULT_EXPERT) for d in DOMAINS}
    return Decision(group=GROUP_OF[DEFAULT_EXPERT], group_probs=_group_probs(expert_probs),
                    expert_probs=expert_probs, experts=(DEFAULT_EXPERT,), weights=(1.0,), mode="default")


def decide(probs: Mapping[str, float], *, threshold: float = 0.5, top_k: int = 2) -> Decision:
    """Top-1 if the best expert has probability >= ``threshold``, else the renormalised top-k.

    ``probs`` maps expert names to (unnormalised) probabilities; missing experts count as 0 and an
    empty mapping gives :func:`default_decision`. Ties are broken by the order of ``DOMAINS``.
    """
    check_policy_args(threshold, top_k)
    if not probs:
        return default_decision()
    expert_probs = _normalise(probs)
    group_probs = _group_probs(expert_probs)
    group = max(GROUP_NAMES, key=lambda g: (group_probs[g], -GROUP_NAMES.index(g)))
    ranked = sorted(DOMAINS, key=lambda d: (-expert_probs[d], DOMAINS.index(d)))
    if expert_probs[ranked[0]] >= threshold or top_k == 1:
        return Decision(group, group_probs, expert_probs, (ranked[0],), (1.0,), "top1")
    chosen = tuple(d for d in ranked[:top_k] if expert_probs[d] > 0.0)
    mass = sum(expert_probs[d] for d in chosen)
    weights = tuple(expert_probs[d] / mass for d in chosen)
    mode: Mode = "ensemble" if len(chosen) > 1 else "top1"
    return Decision(group, group_probs, expert_probs, chosen, weights, mode)
