"""The fixed domain hierarchy: three groups, five experts."""

from __future__ import annotations

DOMAINS: tuple[str, ...] = ("math", "reasoning", "conversation", "knowledge", "code")

GROUPS: dict[str, tuple[str, ...]] = {
    "analytical": ("math", "reasoning"),
    "language": ("conversation", "knowledge"),
    "technical": ("code",),
}

GROUP_OF: dict[str, str] = {d: g for g, ds in GROUPS.items() for d in ds}
GROUP_NAMES: tuple[str, ...] = tuple(GROUPS)

# Experts trained on dialogues in the tokenizer's chat format: a plain prompt for them is sent
# as a user turn (``<|user|>prompt<|end|><|assistant|>``), or they would just close the turn.
CHAT_EXPERTS: tuple[str, ...] = ("conversation",)

# Where an empty or whitespace-only prompt goes (documented in the README).
DEFAULT_EXPERT = "conversation"


def check_domain(name: str) -> str:
    """Return ``name`` if it is a known expert, else raise a ValueError listing the choices."""
    if name not in DOMAINS:
        raise ValueError(f"unknown expert {name!r}; choose one of {list(DOMAINS)}")
    return name
