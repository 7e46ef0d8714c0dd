"""The domain hierarchy (defined in ``experts.domains``) and how the served router treats each domain."""

from __future__ import annotations

from experts.domains import DOMAINS, GROUP_NAMES, GROUP_OF, GROUPS  # noqa: F401  (re-exported)

# Experts trained on dialogues in the tokenizer's chat format: a plain prompt for them is sent
# as a user turn (``<|user|>prompt<|end|><|assistant|>``), or they would just close the turn.
CHAT_EXPERTS: tuple[str, ...] = ("conversation",)

# Domains with one right answer per question: an expert instruction-tuned on them alone is served
# greedily unless a request sets its own sampling (vLLM's per-model ``generation_config`` defaults).
GREEDY_DOMAINS: frozenset[str] = frozenset({"math", "reasoning", "knowledge", "code"})

# How a domain's answers are decoded beyond greedy, by the server (for its expert) and by the report
# (for every model asked the domain's tasks). Code: the Python syntax guard (``experts.syntax_guard``)
# keeps a reply valid, and a frequency penalty of 1.5 ends the argument lists and lines that a small
# model repeats until its budget runs out (chosen on validation items: docs/benchmarks.md).
DOMAIN_SAMPLING: dict[str, dict[str, float]] = {"code": {"frequency_penalty": 1.5}}
GUARDED_DOMAINS: frozenset[str] = frozenset({"code"})


def instruct_domains(meta: dict) -> set[str]:
    """The domains a model's instruction stage saw (its ``meta.json``); empty if it had none."""
    return set((meta.get("instruct") or {}).get("domains") or ())


def generation_defaults(meta: dict) -> dict[str, float]:
    """The sampling fields a model is served with when a request leaves them out: ``temperature``
    0 for a model instruction-tuned only on :data:`GREEDY_DOMAINS`, with its domain's
    :data:`DOMAIN_SAMPLING` if it saw one domain; else none (the API's defaults)."""
    domains = instruct_domains(meta)
    if not domains or not domains <= GREEDY_DOMAINS:
        return {}
    own = DOMAIN_SAMPLING.get(min(domains), {}) if len(domains) == 1 else {}
    return {"temperature": 0.0, **own}


def guarded(meta: dict) -> bool:
    """A model instruction-tuned only on :data:`GUARDED_DOMAINS` is served with the syntax guard."""
    domains = instruct_domains(meta)
    return bool(domains) and domains <= GUARDED_DOMAINS


# Where an empty or whitespace-only prompt goes (documented in the README).
DEFAULT_EXPERT = "conversation"


def check_domain(name: str) -> str:
    """Return ``name`` if it is a known expert, else raise a ValueError listing the choices."""
    if name not in DOMAINS:
        raise ValueError(f"unknown expert {name!r}; choose one of {list(DOMAINS)}")
    return name
