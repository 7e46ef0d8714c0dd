"""More ways to ask for the same thing: user-style prompts derived from a corpus record.

A record's ``prompt`` is the source's own phrasing (a generator's template, a dictionary entry, a
function signature). Users type short questions instead ("What is 12 + 30?", "define ephemeral",
"How do I read a file in Python?"). A router trained on templates alone learns the templates: it
sends short hand-written questions (``router.probes``) to ``conversation``, the one domain whose
data is natural questions.

``prompt_views(record, domain, rng)`` returns extra phrasings built from the record's own content
(its arithmetic expression, its headword, a factbook field, a code line, a later dialogue turn)
put into short generic question frames. The frames are shared across domains where they fit
("What is ...?", "how do I ...", "define ...", "can you ..."), so that it is the content that decides.

Three views answer failures on third-party prompts (``training.data.eval_prompts``, dev half):
competition algebra went to ``code`` (the math data has no letters standing for numbers), so an
arithmetic record is also asked as an equation in one unknown; quiz questions went to
``conversation`` (knowledge prompts only named a headword), so a WordNet definition is also asked
back ("What is <definition> called?"); "can you write ..." requests went to ``conversation``, so
code requests also take that frame. And competition problems written in LaTeX (MATH) are also
asked as people type them without it ("Let x, y > 0 be ...", ``plain_tex``), so that letters,
braces and ``^`` outside ``$...$`` read as math too.
"""

from __future__ import annotations

import random
import re

Record = dict

_EXPR = re.compile(r"-?\(?\s*-?\d[\d.,]*(?:\s*[-+*/×÷^]\s*\(?\s*-?\d[\d.,]*\s*\)?)+")
_WORD = re.compile(r"[A-Za-z]{2,}")
_SENT = re.compile(r"(?<=[.?!])\s+|\n+")
_INSTRUCTION = re.compile(r"^(give|provide|return|answer|only|format|please|state|your (task|job)|note|"
                          r"write the|use |do not|make sure|if the target)", re.I)


def _sentences(text: str) -> list[str]:
    """Sentences and lines of ``text`` that read as language (two words or more, not grid rows)."""
    return [s.strip() for s in _SENT.split(text) if len(_WORD.findall(s)) >= 2]


def _casual(s: str, rng: random.Random) -> str:
    """Lower case and/or no final punctuation, as people type."""
    if rng.random() < 0.5:
        s = s[:1].lower() + s[1:] if rng.random() < 0.5 else s.lower()
    if rng.random() < 0.4:
        s = s.rstrip(".?! ")
    return s


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])")


def _equation(e: str, answer: str, rng: random.Random) -> str:
    """The record's own arithmetic as an equation in one unknown: ``12 + 30 = 42`` -> "Solve for x:
    x + 30 = 42", so that letters standing for numbers read as math, not only as code."""
    nums = _NUMBER.findall(e)
    if not nums or not re.fullmatch(r"-?\d+(?:\.\d+)?", answer.strip()):
        return ""
    v, target = rng.choice("xyznabk"), rng.choice(nums)
    eq = re.sub(rf"(?<![\d.]){re.escape(target)}(?![\d.])", v, e, count=1)
    frame = rng.choice(["Solve for {v}: {eq} = {a}", "find {v} if {eq} = {a}", "{eq} = {a}, what is {v}?",
                        "If {eq} = {a}, then {v} = ?", "For which {v} is {eq} = {a}?"])
    return frame.format(v=v, eq=eq, a=answer.strip())


# LaTeX macros with a plain-text spelling; any other macro drops its backslash ("\\sin" -> "sin")
_TEX_SYMBOLS = {"le": "<=", "leq": "<=", "ge": ">=", "geq": ">=", "ne": "!=", "neq": "!=", "cdot": "*",
                "times": "x", "div": "/", "pm": "+-", "infty": "infinity", "dots": "...", "ldots": "...",
                "cdots": "...", "circ": " degrees", ",": " ", ";": " ", "!": "", "quad": " ", "qquad": " ",
                "left": "", "right": "", "displaystyle": ""}
_TEX_UNICODE = {"le": "≤", "leq": "≤", "ge": "≥", "geq": "≥", "ne": "≠", "neq": "≠", "cdot": "·", "times": "×",
                "div": "÷", "pm": "±", "infty": "∞", "dots": "…", "ldots": "…", "cdots": "⋯", "in": "∈",
                "circ": "°", "pi": "π", "alpha": "α", "beta": "β", "theta": "θ", "sum": "∑"}
_TEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEX_ARG = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_TEX_SQRT = re.compile(r"\\sqrt\{([^{}]*)\}")
_TEX_MACRO = re.compile(r"\\([A-Za-z]+|.)")
_TEX_GROUP = re.compile(r"([\^_])\{([^{}]*)\}")


def plain_tex(s: str, unicode: bool = False) -> str:
    """``s`` with its LaTeX spelt as plain text: no ``$``/``\\[``/``\\(`` delimiters, ``\\frac{a}{b}`` ->
    ``(a)/(b)``, ``\\le`` -> ``<=`` (``≤`` with ``unicode``), ``x^{n+1}`` -> ``x^(n+1)``, ``\\sin`` -> ``sin``."""
    symbols = {**_TEX_SYMBOLS, **_TEX_UNICODE} if unicode else _TEX_SYMBOLS
    s = re.sub(r"\\[\[\]()]|\$", "", s).replace("^\\circ", "\\circ")
    for _ in range(3):  # nested arguments, innermost first
        s = _TEX_FRAC.sub(lambda m: f"({m.group(1)})/({m.group(2)})" if len(m.group(1) + m.group(2)) > 2
                          else f"{m.group(1)}/{m.group(2)}", s)
        s = _TEX_ARG.sub(r"\1", s)
        s = _TEX_SQRT.sub(r"sqrt(\1)", s)
        s = _TEX_GROUP.sub(lambda m: m.group(1) + (m.group(2) if m.group(2).isalnum() else f"({m.group(2)})"), s)
    s = _TEX_MACRO.sub(lambda m: symbols.get(m.group(1), m.group(1)), s)
    return re.sub(r"[ \t]+", " ", s).strip()


def _math(r: Record, rng: random.Random) -> list[str]:
    q = r.get("question") or r["prompt"]
    out = []
    if "$" in q or "\\" in q:  # a LaTeX problem, asked first as typed without LaTeX
        plain = [s for s in _sentences(plain_tex(q, unicode=rng.random() < 0.5)) if not _INSTRUCTION.match(s)]
        if plain:
            out.append(plain[0])
    m = max(_EXPR.findall(q), key=len, default="")
    if m:
        e = m.strip().rstrip("=?. ")
        frame = rng.choice(["What is {e}?", "what's {e}", "{e} =", "How much is {e}?", "Compute {e}.",
                            "calculate {e}", "{e}?", "Can you work out {e}?"])
        out.append(frame.format(e=e))
        eq = _equation(e, r.get("answer", ""), rng)
        if eq and rng.random() < 0.5:
            out.insert(rng.randrange(2), eq)
    core = [s for s in _sentences(q) if not _INSTRUCTION.match(s)]
    if core:
        out.append(rng.choice(core))
        questions = [s for s in core if s.endswith("?")]
        if questions:
            out.append(questions[-1])
    return out


def _reasoning(r: Record, rng: random.Random) -> list[str]:
    q = r.get("question") or r["prompt"]
    core = [s for s in _sentences(q) if not _INSTRUCTION.match(s)]
    out = [rng.choice(core)] if core else []
    questions = [s for s in core if s.endswith("?")]
    if questions:
        out.append(questions[-1])
    if len(core) >= 2:
        i = rng.randrange(len(core) - 1)
        out.append(f"{core[i]} {core[i + 1]}")
    return out


_TURN = re.compile(r"<\|user\|>(.*?)<\|end\|>", re.S)


def _conversation(r: Record, rng: random.Random) -> list[str]:
    turns = [t.strip() for t in _TURN.findall(r["text"]) if t.strip()]
    return [rng.choice(turns)] if turns else []


def _headword(r: Record) -> str:
    src, text = r["source"], r["text"]
    if "wordnet" in src:
        return text.split(" (", 1)[0].strip()
    if "foldoc" in src:
        return text.split("\n", 1)[0].strip()
    if "gcide" in src:
        return text.split(" \\", 1)[0].split(",", 1)[0].strip()
    return ""


def _gloss(r: Record) -> tuple[str, str]:
    """(part of speech, first clause of the definition) of a WordNet record, else ("", "")."""
    if "wordnet" not in r["source"]:
        return "", ""
    m = re.match(r"^.+? \((\w+)\): ([^;\n]+)", r["text"])
    return (m.group(1), m.group(2).strip()) if m else ("", "")


def _reverse_question(r: Record, rng: random.Random) -> list[str]:
    """A question that gives the definition and asks for the word or name ("What is a small carnivore
    called?"): how factual questions are usually put, with the definition's own vocabulary."""
    pos, g = _gloss(r)
    if not 12 <= len(g) <= 150:
        return []
    frames = ["Which word means {g}?", "What is a word for {g}?"]
    if pos == "noun":
        frames += ["What is {g} called?", "What is the name for {g}?", "What do you call {g}?",
                   "Name {g}."]
    return [rng.choice(frames).format(g=g)]


def _knowledge(r: Record, rng: random.Random) -> list[str]:
    out = []
    if "factbook" in r["source"]:
        lines = r["text"].split("\n")[1:]
        for line in rng.sample(lines, min(2, len(lines))):
            m = re.match(r"^(.+?), (.+?): ", line)
            if not m:
                continue
            parts = [p.strip().lower() for p in m.group(2).split(" - ")]
            field = parts[-1] if len(parts) > 1 and rng.random() < 0.3 else parts[0]
            frame = rng.choice(["What is the {f} of {c}?", "{c} {f}", "Tell me the {f} of {c}.",
                                "what's the {f} in {c}", "What are the {f} of {c}?", "{f} of {c}?"])
            out.append(frame.format(f=field, c=m.group(1)))
        return out
    w = _headword(r)
    if w and len(w) < 40:
        frame = rng.choice(["What does {w} mean?", "Define {w}.", "meaning of {w}", "What is {a} {w}?",
                            "{w} definition", "What is the definition of {w}?", "explain {w}",
                            "What is a synonym for {w}?"])
        out.append(frame.format(w=w, a=_article(w)))
    return out + _reverse_question(r, rng)


_DEF = re.compile(r"def (\w+)\(")


def _code(r: Record, rng: random.Random) -> list[str]:
    text, out = r["text"], []
    lines = [ln for ln in text.split("\n") if ln.strip() and not ln.lstrip().startswith("#")]
    if lines:  # a short snippet from anywhere in the file
        i = rng.randrange(len(lines))
        out.append("\n".join(lines[i:i + rng.choice([1, 1, 2, 3])]).strip())
    doc = re.search(r'"""\s*(.+?)(?:\n|""")', text, re.S)
    if doc:
        first = doc.group(1).strip().rstrip(".")
        if 8 < len(first) < 200:
            frame = rng.choice(["Write a Python function that {d}.", "{D}", "How do I {d} in Python?",
                                "Implement a function to {d}.", "python: {d}", "Can you write a function that {d}?",
                                "can you {d} in python?", "write code to {d}"])
            out.append(frame.format(d=first[:1].lower() + first[1:], D=first))
    m = _DEF.search(text)
    if m:
        out.append(rng.choice(["What does {n}() do?", "How do I use {n}?", "def {n}(", "{n}()"]).format(n=m.group(1)))
    return out


_VIEWS = {"math": _math, "reasoning": _reasoning, "conversation": _conversation,
          "knowledge": _knowledge, "code": _code}


def prompt_views(record: Record, domain: str, rng: random.Random) -> list[str]:
    """Extra user-style prompts for ``record`` of ``domain`` (may be empty), casual-cased at random."""
    views = _VIEWS.get(domain, lambda r, g: [])(record, rng)
    return [v for v in (_casual(v, rng) for v in views) if v.strip() and v.strip() != record["prompt"].strip()]
