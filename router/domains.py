"""The domain hierarchy (defined in ``experts.domains``) and how the served router treats each domain."""

from __future__ import annotations

from experts.domains import DOMAINS, GROUP_NAMES, GROUP_OF, GROUPS  # noqa: F401  (re-exported)

# Experts trained on dialogues in the tokenizer's chat format: a plain prompt for them is sent
# as a user turn (``<|user|>prompt<|end|><|assistant|>``), or they would just close the turn.
CHAT_EXPERTS: tuple[str, ...] = ("conversation",)

# Domains with one right answer per question: an expert instruction-tuned on them alone is served
# greedily unless a request sets its own sampling (vLLM's per-model ``generation_config`` defaults).
GREEDY_DOMAINS: frozenset[str] = frozenset({"math", "reasoning", "knowledge", "code"})


def generation_defaults(meta: dict) -> dict[str, float]:
    """The sampling fields a model is served with when a request leaves them out: ``temperature``
    0 for a model instruction-tuned only on :data:`GREEDY_DOMAINS` (its ``meta.json``), else none
    (the API's defaults)."""
    domains = set((meta.get("instruct") or {}).get("domains") or ())
    return {"temperature": 0.0} if domains and domains <= GREEDY_DOMAINS else {}


# Where an empty or whitespace-only prompt goes (documented in the README).
DEFAULT_EXPERT = "conversation"


def check_domain(name: str) -> str:
    """Return ``name`` if it is a known expert, else raise a ValueError listing the choices."""
    if name not in DOMAINS:
        raise ValueError(f"unknown expert {name!r}; choose one of {list(DOMAINS)}")
    return name
