"""Router-only training prompts: kinds of user prompt that the experts' corpora do not contain.

The router is trained on each corpus record's prompt and on rephrasings of it
(:mod:`training.data.prompt_views`). Some prompts users send to an expert look like nothing in
that expert's corpus, and the router then follows surface cues to another domain. The prompts
below are added to the router's training examples only; no expert trains on them.

- **math, symbolic notation**: competition algebra ("x^5+y^5=33", "f(x)", "a_n") went to ``code``,
  since the math corpus is arithmetic with numbers only. Half are equations, antiderivatives,
  complex numbers, geometry and probability from reasoning-gym generators the math corpus does not
  use (:data:`SYMBOLIC_GENERATORS`), answer-format instructions cut, ``2*x**3`` written ``2x^3``
  half the time; half are statements of :func:`notation_math` (polynomial equations in several
  letters, ``f(x)``, sequences ``a_n``, sums with ``...``).
- **reasoning, multiple choice and other puzzles**: puzzles put as a question and an
  ``Options: (A) ...`` list went to ``knowledge`` and ``code``. Half are a reasoning record's question
  with its answer among distractors (answers of other records of the same generator); half are
  logic and word puzzles of reasoning-gym generators the reasoning corpus does not use
  (:data:`REASONING_EXTRA_GENERATORS`: syllogisms, family relations, ciphers, ...).
- **knowledge, reverse questions**: quiz questions give the fact and ask for the name ("Which
  country ...?", "How many ... does ... have?"). A factbook field asked back from its value, and a
  WordNet proper noun asked for from its definition ("Who was <gloss>?").
- **code, other languages**: requests naming JavaScript, Bash or AWS went to ``conversation``: the
  code corpus is Python. Function names and docstrings of the code records put into requests that
  name another language or tool (:data:`LANGUAGES`).

How many: :data:`SHARES` (a share of the per-domain prompt count, split evenly between a domain's
kinds), set on the dev half of ``training.data.eval_prompts`` over three router seeds. Prompts typed
in capitals ("DO YOU PLAY SOCCER") are handled by the router's featuriser
(``router.model.fold_caps``), not by data.

``tests/data/test_router_prompts.py`` checks the form of each kind and that none copies an
evaluation-only prompt.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence

from training.data.build import CorpusSet

Record = dict

SHARES: dict[str, float] = {"math": 0.4, "reasoning": 0.4, "knowledge": 0.4, "code": 0.2}

REASONING_EXTRA_GENERATORS = ("syllogism", "family_relationships", "aiw", "self_reference", "sentence_reordering",
                              "word_sequence_reversal", "caesar_cipher", "cryptarithm", "color_cube_rotation",
                              "letter_jumble", "needle_haystack", "acre")
SYMBOLIC_GENERATORS = ("polynomial_equations", "simple_integration", "intermediate_integration",
                       "complex_arithmetic", "simple_geometry", "advanced_geometry", "coin_flip", "dice")
# instruction lines and sentences that the generators append to the question
_CUT = re.compile(r"\n\s*(?:In solving|When performing|For all geometry|Final answer|Return|Please|Provide|Give|Round|"
                  r"Use same|Respond|Your output)|(?<=[.?])\s*(?:Return only|Please|Provide|Give your|Round|Do not|"
                  r"For all geometry|Respond only)|\s*\(Assume that", re.I)
_NUMBERED = re.compile(r"\n\s*\d+\.")  # numbered format rules after a math question
LANGUAGES = ("JavaScript", "TypeScript", "Java", "C", "C++", "C#", "Go", "Rust", "Ruby", "PHP", "Bash", "SQL",
             "Kotlin", "Swift", "Haskell", "Scala", "R", "Perl", "Lua", "shell", "Node.js", "React",
             "AWS Lambda", "Docker", "a Makefile", "PowerShell", "MATLAB", "Julia", "Elixir", "Dart")


def _question(text: str, numbered: bool = False) -> str:
    """The question of a generated item, without the answer-format instructions that follow it (and,
    with ``numbered``, without a numbered list after it: a math item's format rules, not premises)."""
    q = _CUT.split(text.strip(), maxsplit=1)[0].strip()
    return _NUMBERED.split(q, maxsplit=1)[0].strip() if numbered else q


def _typed(expr: str, rng: random.Random) -> str:
    """``2*x**3`` as users type it half the time: ``2x^3`` (powers with ``^``, products by juxtaposition)."""
    if rng.random() < 0.5:
        return expr
    expr = expr.replace("**", "^")
    return re.sub(r"(?<=[\d)a-z])\*(?=[a-z(])", "", expr)


def _generated(names: Sequence[str], split: str, n: int, seed: int,
               render: Callable[[str, random.Random], str], numbered: bool) -> list[str]:
    """Up to ``n`` distinct questions, in equal share from the reasoning-gym generators ``names``."""
    import reasoning_gym

    rng = random.Random(f"router-prompts:{split}:{seed}")
    per, out = max(1, -(-n // len(names))), {}
    for name in names:
        # item i comes from Random(seed + i): hashed seeds keep the splits' items apart
        item_seed = int.from_bytes(hashlib.sha256(f"{name}:{split}:{seed}".encode()).digest()[:4], "big")
        ds = reasoning_gym.create_dataset(name, size=per, seed=item_seed)
        for i in range(per):
            q = render(_question(ds[i]["question"], numbered), rng)
            if q:
                out.setdefault(q, None)
    return list(out)[:n]


def symbolic_math(split: str, n: int, seed: int) -> list[str]:
    """Equations, integrals, complex numbers, geometry and probability questions (see the module doc)."""
    return _generated(SYMBOLIC_GENERATORS, split, n, seed, _typed, numbered=True)


def _term(rng: random.Random, names: str, first: bool) -> str:
    """A monomial such as ``3x^2y`` or ``- y^3``, signed unless it opens the polynomial."""
    c = rng.choice([1, 1, 1, 2, 3, 4, 5, 6, 7, 9, 12])
    body = "".join(v + (f"^{e}" if e > 1 else "") for v in rng.sample(names, rng.randint(1, min(2, len(names))))
                   for e in [rng.choice([1, 1, 2, 2, 3, 4, 5])])
    sign = rng.choice(["+", "-"])
    text = (str(c) if c > 1 else "") + body
    return ("-" + text if sign == "-" else text) if first else f" {sign} {text}"


def _poly(rng: random.Random, names: str) -> str:
    terms = rng.randint(2, 4)
    out = "".join(_term(rng, names, i == 0) for i in range(terms))
    return out + (f" {rng.choice('+-')} {rng.randint(1, 30)}" if rng.random() < 0.5 else "")


def _sequence(rng: random.Random) -> str:
    return rng.choice(["n^2 + 1", "2^n - 1", "n(n+1)/2", "1/(n(n+1))", "n^3 - n", "3^n + 2^n", "(-1)^n n",
                       "1/n^2", "n!/2^n", "sqrt(n+1) - sqrt(n)", "(2n-1)/(2n)", "n mod 7"])


_STEP = ("2f(x) + 1", "f(x)^2", "f(x) + x", "3f(x) - 2")
_RECURRENCE = ("2a_n + 1", "a_n^2 - 1", "a_n + n", "3a_n - a_(n-1)")


def notation_math(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct statements in the notation of algebra and number theory: letters for numbers,
    powers with ``^``, functions ``f(x)``, sequences ``a_n``, sums written out with ``...``."""
    def one() -> str:
        v = rng.choice(["xy", "xy", "ab", "mn", "xyz"])
        x = v[0]
        k, m, j = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 99)
        frames = [
            lambda: f"Find all integer solutions to {_poly(rng, v)} = {k}.",
            lambda: f"How many pairs of positive integers ({v[0]}, {v[1]}) satisfy {_poly(rng, v)} = {k}?",
            lambda: f"Solve {_poly(rng, x)} = 0 for real {x}.",
            lambda: f"Factor {_poly(rng, v)} over the integers.",
            lambda: f"Expand ({_poly(rng, v[:2])})^{rng.randint(2, 4)}.",
            lambda: f"Let f(x) = {_poly(rng, 'x')}. Find f({k}).",
            lambda: f"If f(x) = {_poly(rng, 'x')} and g(x) = {_poly(rng, 'x')}, what is f(g({m}))?",
            lambda: f"A function f satisfies f(x+1) = {rng.choice(_STEP)} and f(0) = {m}. What is f({m})?",
            lambda: f"Define a_1 = {m} and a_(n+1) = {rng.choice(_RECURRENCE)}. Find a_{rng.randint(5, 20)}.",
            lambda: f"Let a_n = {_sequence(rng)}. Compute a_1 + a_2 + ... + a_{k}.",
            lambda: f"Evaluate the sum of {_sequence(rng)} for n = 1, 2, ..., {k}.",
            lambda: f"Find the remainder when {k}^{j} is divided by {m}.",
            lambda: f"For positive reals {', '.join(v)} with {' + '.join(v)} = {m}, "
                    f"find the minimum of {_poly(rng, v)}.",
            lambda: f"Prove that {_poly(rng, 'n')} is divisible by {m} for every integer n.",
            lambda: f"How many integers n in {{1, 2, ..., {10 * k}}} make {_sequence(rng)} an integer?",
            lambda: f"Find the number of real roots of the polynomial p(x) = {_poly(rng, 'x')}.",
        ]
        return rng.choice(frames)()

    out: dict[str, None] = {}
    for _ in range(4 * n):
        if len(out) >= n:
            break
        out.setdefault(one(), None)
    return list(out)


def extra_reasoning(split: str, n: int, seed: int) -> list[str]:
    """Logic and word puzzles of reasoning-gym generators the reasoning corpus does not use."""
    return _generated(REASONING_EXTRA_GENERATORS, split, n, seed, lambda q, rng: q, numbered=False)


_LETTERS = "ABCDEFGH"


def multiple_choice(docs: Sequence[Record], n: int, rng: random.Random, *, max_answer: int = 60) -> list[str]:
    """Up to ``n`` reasoning questions followed by ``Options: (A) ...``: the record's answer among up to
    four distinct answers of other records of its generator (answers of ``max_answer`` characters or less)."""
    by_source: dict[str, list[Record]] = {}
    for r in docs:
        if r.get("question") and r.get("answer") and "\n" not in r["answer"] and len(r["answer"]) <= max_answer:
            by_source.setdefault(r["source"], []).append(r)
    pool = [r for rs in by_source.values() for r in rs]
    rng.shuffle(pool)
    out = []
    for r in pool[:n]:
        others = sorted({o["answer"] for o in by_source[r["source"]]} - {r["answer"]})
        if not others:
            continue
        options = rng.sample(others, min(len(others), rng.randint(2, 4))) + [r["answer"]]
        rng.shuffle(options)
        listed = "\n".join(f"({_LETTERS[i]}) {o}" for i, o in enumerate(options))
        out.append(f"{_question(r['question'])}\nOptions:\n{listed}")
    return out


_FACT = re.compile(r"^(.+?), (.+?): (.+)$")
_COUNT = re.compile(r"^\d[\d,]*(?: \(\d{4}(?: est\.)?\))?$")
_NAME = re.compile(r"^[A-Z][^\d%$]{2,39}$")  # a name or a short phrase: no figures


def reverse_factbook(r: Record, rng: random.Random) -> list[str]:
    """A factbook field asked back from its value ("Which country has Canberra as its capital?") or,
    for a count, asked as "How many <field> does <country> have?"."""
    out = []
    lines = r["text"].split("\n")[1:]
    for line in rng.sample(lines, min(3, len(lines))):
        m = _FACT.match(line)
        if not m:
            continue
        country, parts, value = m.group(1), [p.strip().lower() for p in m.group(2).split(" - ")], m.group(3).strip()
        if _COUNT.match(value) and len(parts) == 1:
            frame = rng.choice(["How many {f} does {c} have?", "{c} has how many {f}?", "how many {f} are in {c}"])
            out.append(frame.format(f=parts[0], c=country))
        elif _NAME.match(value) and not value.lower().startswith(("see ", "none", "no ", "yes", "na")):
            field = parts[-1] if len(parts) > 1 and rng.random() < 0.5 else parts[0]
            frame = rng.choice(["Which country has {v} as its {f}?", "{v} is the {f} of which country?",
                                "In which country is the {f} {v}?", "What country's {f} is {v}?"])
            out.append(frame.format(f=field, v=value.rstrip(".")))
    return out


_PERSON = re.compile(r"\(\d{3,4}-\d{3,4}\)|\(born \d{3,4}\)|\b(?:writer|poet|painter|composer|singer|actor|actress|"
                     r"philosopher|statesman|general|king|queen|president|physicist|chemist|inventor|novelist)\b")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.I)


def proper_noun_question(r: Record, rng: random.Random) -> list[str]:
    """A WordNet proper noun asked for from its definition ("Who was <gloss>?" for a person, "What is
    the name of <gloss>?" otherwise), as quiz questions put it, and asked about by name ("Who is <name>?")."""
    m = re.match(r"^([A-Z][^(\n]*?) \(noun\): ([^;\n]+)", r["text"]) if "wordnet" in r["source"] else None
    if not m or not 12 <= len(m.group(2)) <= 150:
        return []
    gloss = _ARTICLE.sub("", re.sub(r"^\([^)]*\)\s*|\s*\([^)]*\)$", "", m.group(2).strip()))
    name = m.group(1)
    if _PERSON.search(m.group(2)):
        return [rng.choice(["Who was the {g}?", "Name the {g}.", "who was the {g}", "Which {g}?"]).format(g=gloss),
                rng.choice(["Who is {w}?", "who was {w}", "Who was {w}?"]).format(w=name)]
    return [rng.choice(["What is the name of the {g}?", "What is the {g} called?", "Name the {g}.", "What is the {g}?"])
            .format(g=gloss), rng.choice(["What is {w}?", "where is {w}", "Tell me about {w}."]).format(w=name)]


_DEF = re.compile(r"def ([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\(")  # snake_case names of two words or more
_DOC = re.compile(r'"""\s*(.+?)(?:\n|""")', re.S)


def code_requests(r: Record, rng: random.Random) -> list[str]:
    """What a code record does, asked for in another language or tool ("can you write a chunked
    list function in JavaScript?"), so that the request, not the word Python, reads as code."""
    lang = rng.choice(LANGUAGES)
    out = []
    m = _DEF.search(r["text"])
    if m and m.group(1) != "main_solution" and not m.group(1).startswith("test_"):
        name = m.group(1).replace("_", " ")
        frame = rng.choice(["can you write a {n} function in {l}?", "write {n} in {l}", "{l}: {n}",
                            "how do I implement {n} in {l}?", "do a {n} in {l}", "implement {n} using {l}"])
        out.append(frame.format(n=name, l=lang))
    doc = _DOC.search(r["text"])
    if doc and 8 < len(doc.group(1).strip()) < 160:
        d = doc.group(1).strip().rstrip(".")
        frame = rng.choice(["Write a {l} function that {d}.", "how would you {d} in {l}", "{l} code to {d}",
                            "can you {d} in {l}?"])
        out.append(frame.format(l=lang, d=d[:1].lower() + d[1:]))
    return out


def _from_records(docs: Sequence[Record], n: int, rng: random.Random,
                  views: Callable[[Record], list[str]]) -> list[str]:
    """Up to ``n`` distinct prompts from ``views`` of records visited in a seeded order."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    out: dict[str, None] = {}
    for i in order:
        if len(out) >= n:
            break
        out.update(dict.fromkeys(v for v in views(docs[i]) if v.strip()))
    return list(out)[:n]


def _knowledge(r: Record, rng: random.Random) -> list[str]:
    return reverse_factbook(r, rng) if "factbook" in r["source"] else proper_noun_question(r, rng)


def router_prompts(corpus: CorpusSet, domain: str, split: str, n: int, seed: int) -> list[str]:
    """Up to ``n`` router-only prompts of ``domain`` from its ``split`` (see the module doc; none for
    ``conversation``), deterministic for given arguments."""
    rng = random.Random(f"router-only:{seed}:{domain}:{split}")
    docs = corpus.docs(domain, split) if domain in corpus.domains else []
    half = n // 2
    if domain == "math":
        return symbolic_math(split, half, seed) + notation_math(n - half, rng)
    if domain == "reasoning":
        return multiple_choice(docs, half, rng) + extra_reasoning(split, n - half, seed)
    if domain == "knowledge":
        return _from_records(docs, n, rng, lambda r: _knowledge(r, rng))
    if domain == "code":
        return _from_records(docs, n, rng, lambda r: code_requests(r, rng))
    return []
