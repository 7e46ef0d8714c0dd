"""The fixed domain hierarchy: three groups, five experts. The ``router`` package routes over it, and
a merged model that carries the router (``experts.moe.DocRouter``) does too."""

from __future__ import annotations

DOMAINS: tuple[str, ...] = ("math", "reasoning", "conversation", "knowledge", "code")

GROUPS: dict[str, tuple[str, ...]] = {
    "analytical": ("math", "reasoning"),
    "language": ("conversation", "knowledge"),
    "technical": ("code",),
}

GROUP_OF: dict[str, str] = {d: g for g, ds in GROUPS.items() for d in ds}
GROUP_NAMES: tuple[str, ...] = tuple(GROUPS)

# Index of each expert's group, in DOMAINS order: (E,)
EXPERT_GROUP: tuple[int, ...] = tuple(GROUP_NAMES.index(GROUP_OF[d]) for d in DOMAINS)
