"""Instruction items per domain, for the supervised fine-tuning stage and the report's task scores.

An item is ``{key, family, level, messages, answer}``: ``messages`` is a chat (``user`` then
``assistant`` turns), ``answer`` the reference final answer the report extracts and compares
(empty where there is none), ``level`` a difficulty used by the curriculum (0: any time).

Training items come from each domain's *train* split; the held-out task items
(:func:`task_items`) come from the *test* split, except for two sets built to be held out:

Where a math item's question writes an arithmetic expression (the arithmetic curriculum, and
reasoning-gym families such as ``basic_arithmetic`` or ``products``), the reply is the expression and
its value, ``345 + 278 = 623`` (the math corpus is written so: ``training.data.sources``): the model
learns to write the calculator's call (``experts.calculator``), and the calculator writes the value
when the model generates.

- **arithmetic**: ``a op b`` for + - x on 1- to 4-digit operands, in several user phrasings. Which
  operand pairs are held out is a hash of the expression (:data:`ARITH_TEST`), so no phrasing of a
  held-out pair is ever trained on.
- **knowledge facts**: short factbook facts (a capital, a government type, ...) of the *train*
  countries, asked in a phrasing (:data:`FACT_QUESTIONS`, the last one of each) that no training
  item uses: they score recall of trained facts, not of unseen ones.
"""

from __future__ import annotations

import ast
import random
import re
import textwrap
from collections.abc import Iterator
from typing import Any

from training.data.splits import split_of

Item = dict[str, Any]
ARITH_TEST = 0.08  # share of operand pairs held out from the arithmetic curriculum
ARITH_OPS = ("+", "-", "*")
_OP_WORDS = {"+": ("plus", "add"), "-": ("minus", "subtract"), "*": ("times", "multiply")}
# phrasings a user types; the report asks the held-out pairs in the first three (plain) ones
ARITH_PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} =",
                   "Calculate {a} {op} {b}.", "What's {a} {w} {b}?", "How much is {a} {op} {b}?",
                   "{a} {op} {b}", "Work out {a} {op} {b}.", "Please compute {a} {op} {b}.")
PLAIN_PHRASINGS = ARITH_PHRASINGS[:3]
# An arithmetic item is drawn this many times as often as another math item: with twice as many of
# them, 24 in 25 math draws and about 6/7 of the math instruction tokens. Copying the question's
# expression into the calculator's call is learnt abruptly (``bench.arith_sft`` from the standard
# seed, values left out of the loss: 60 batches of arithmetic alone, 0% copied; 120 batches, 100%;
# with the values trained on, 65%), and `standard` gives the math expert 101 instruction batches.
ARITH_WEIGHT = 12.0


def item(key: str, family: str, messages: list[dict[str, str]], answer: str = "", level: int = 0) -> Item:
    return {"key": key, "family": family, "level": level, "messages": messages, "answer": answer}


def _qa(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---- arithmetic curriculum ---------------------------------------------------------------------
def arith_split(a: int, op: str, b: int) -> str:
    return split_of(f"arith:{a}{op}{b}", val=0.0, test=ARITH_TEST)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _arith_value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_items(n: int, seed: int, *, split: str = "train", digits: tuple[int, ...] = (1, 2, 3, 4),
                     phrasings: tuple[str, ...] = ARITH_PHRASINGS) -> list[Item]:
    """``n`` arithmetic items whose operand pairs hash to ``split``; ``level`` is the larger operand's
    digit count (the curriculum grows it)."""
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        op = rng.choice(ARITH_OPS)
        da, db = rng.choice(digits), rng.choice(digits)
        a, b = _operand(rng, da), _operand(rng, db)
        phrasing = rng.choice(phrasings)
        if arith_split(a, op, b) != split or (a, op, b, phrasing) in seen:
            continue
        seen.add((a, op, b, phrasing))
        sym = {"*": rng.choice(("*", "x", "×")) if split == "train" else "*"}.get(op, op)
        w = rng.choice(_OP_WORDS[op][:1])
        question = phrasing.format(a=a, op=sym, b=b, w=w)
        value = str(_arith_value(a, op, b))
        reply = f"{a} {sym} {b} = {value}"  # the calculator's call, then its value (experts.calculator)
        it = item(f"arith:{a}{op}{b}:{phrasing}", f"arithmetic_{op}", _qa(question, reply), value, level=max(da, db))
        out.append({**it, "weight": ARITH_WEIGHT})
    return out


# ---- expressions: copying a longer question into the calculator's call ---------------------------
# Expressions of 2 to 6 terms, as users and the reasoning-gym arithmetic families write them: signed
# operands (``56 + -33``), parentheses and negated groups (``-( 313 - -854 )``), exact division, with
# or without spaces. The math expert answers them by copying the expression into the calculator's
# call; trained on the two-operand items alone it miscopies signs and longer chains
# (``43 - -21`` -> ``43 * 21``).
EXPR_PHRASINGS = ("Calculate {e}.", "What is {e}?", "Compute {e}.", "{e} =", "Evaluate {e}.",
                  "Work out {e}.", "What is the value of {e}?", "Find {e}.", "{e}",
                  "State the final answer to the following arithmetic problem: {e} =",
                  "Solve the following problem: {e}. Give only the result.")
EXPR_TERMS = (2, 6)


def _expr_leaf(rng: random.Random, digits: int, signed: bool) -> str:
    v = _operand(rng, rng.randint(1, digits))
    return f"-{v}" if signed and v and rng.random() < 0.3 else str(v)


def _expr_tree(rng: random.Random, terms: int, digits: int, signed: bool) -> str:
    """A random expression with ``terms`` operands, tokens separated by single spaces."""
    if terms == 1:
        return _expr_leaf(rng, digits, signed)
    if terms == 2 and rng.random() < 0.15:  # exact division: a multiple of the divisor over it
        d = max(1, _operand(rng, rng.randint(1, min(2, digits))))
        q = rng.randint(1, 10 ** min(3, digits) // d + 1)
        return f"{-d * q if signed and rng.random() < 0.3 else d * q} / {d}"
    left = rng.randint(1, terms - 1)
    parts = [_expr_tree(rng, left, digits, signed), _expr_tree(rng, terms - left, digits, signed)]
    for i, (part, n) in enumerate(zip(parts, (left, terms - left))):
        if n > 1 and rng.random() < 0.4:
            parts[i] = f"{'-' if signed and rng.random() < 0.25 else ''}( {part} )"
    return f"{parts[0]} {rng.choice(ARITH_OPS)} {parts[1]}"


def expression_key(expr: str) -> str:
    """The split key of an expression: its text without spaces (``arith:345+278`` for ``345 + 278``,
    the key :func:`arith_split` hashes, so a held-out pair is held out written either way)."""
    return "arith:" + re.sub(r"\s+", "", expr)


def expression_items(n: int, seed: int, *, exclude: frozenset[str] = frozenset()) -> list[Item]:
    """``n`` training items asking the value of an expression (:data:`EXPR_PHRASINGS`); an expression
    whose key hashes to the held-out split, or that is in ``exclude`` (keys of held-out questions), is
    never used. ``level`` is the operand digit count, as for the two-operand items."""
    from experts.calculator import MAX_DIGITS, evaluate

    rng, out, seen = random.Random(seed), [], set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        digits, terms = rng.randint(1, 4), rng.randint(*EXPR_TERMS)
        expr = _expr_tree(rng, terms, digits, signed=rng.random() < 0.8)
        if rng.random() < 0.2:
            expr = expr.replace(" ", "")
        key = expression_key(expr)
        value = evaluate(expr)
        if (value is None or "." in value or len(value) > MAX_DIGITS or key in seen or key in exclude
                or split_of(key, val=0.0, test=ARITH_TEST) != "train"):
            continue
        seen.add(key)
        question = rng.choice(EXPR_PHRASINGS).format(e=expr)
        out.append({**item(f"{key}:expr", "arithmetic_expr", _qa(question, f"{expr} = {value}"), value,
                           level=digits), "weight": ARITH_WEIGHT})
    return out


def question_expressions(records: list[dict]) -> frozenset[str]:
    """The keys of the expressions that ``records``' questions ask (to keep them out of training)."""
    from experts.calculator import expression_in

    return frozenset(expression_key(e) for r in records if (e := expression_in(r.get("question") or "")))


# ---- per-domain items from corpus records ------------------------------------------------------
def _rg_items(records: list[dict]) -> Iterator[Item]:
    for r in records:
        if not r.get("question"):
            continue
        family = r["source"].split("/", 1)[-1]
        body = r["text"][len(r["question"]):].lstrip("\n")  # the answer, `expr = value`, or worked steps
        yield item(r["key"], family, _qa(r["question"], body), r["answer"])


DIALOGUE_TURNS = 4
_TURN = re.compile(r"<\|(user|assistant)\|>(.*?)<\|end\|>", re.S)


def _dialogue_items(records: list[dict]) -> Iterator[Item]:
    """Dialogues as items of up to :data:`DIALOGUE_TURNS` turns (a long conversation gives several)."""
    for r in records:
        msgs = [{"role": role, "content": text.strip()} for role, text in _TURN.findall(r["text"])]
        for i in range(0, len(msgs) - 1, DIALOGUE_TURNS):
            part = msgs[i:i + DIALOGUE_TURNS]
            if part[0]["role"] == "user" and part[1]["role"] == "assistant":
                yield item(f"{r['key']}:{i}", r["source"].split("/")[0], part, part[1]["content"])


_FACT_LINE = re.compile(r"^(?P<country>[^,\n]+), (?P<path>[^:\n]+): (?P<value>.+)$", re.M)
# field path -> phrasings; the last phrasing of each is held out for the report
FACT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "Capital - name": ("What is the capital of {c}?", "Name the capital city of {c}.",
                       "Which city is the capital of {c}?"),
    "Government type": ("What type of government does {c} have?", "Describe the government type of {c}.",
                         "What is the form of government of {c}?"),
    "National color(s)": ("What are the national colors of {c}?", "Name the national colors of {c}.",
                          "Which colors are the national colors of {c}?"),
    "Population - total": ("What is the population of {c}?", "How many people live in {c}?",
                           "What is the total population of {c}?"),
}
MAX_FACT_CHARS = 300


def facts(records: list[dict]) -> Iterator[tuple[str, str, str, str]]:
    """``(key, country, field path, value)`` for every factbook line of ``records``."""
    for r in records:
        if r["source"] != "cia_world_factbook":
            continue
        for m in _FACT_LINE.finditer(r["text"].split("\n", 1)[-1]):
            yield r["key"], m["country"], m["path"], m["value"].strip()


def _knowledge_items(records: list[dict], rng: random.Random) -> Iterator[Item]:
    for key, country, path, value in facts(records):
        if len(value) > MAX_FACT_CHARS:
            continue
        asks = FACT_QUESTIONS.get(path)
        q = (rng.choice(asks[:-1]) if asks else f"What does the World Factbook list as the {path} of {{c}}?")
        yield item(f"{key}:{path}", "factbook", _qa(q.format(c=country), value), value)
    for r in records:
        if r["source"] == "wordnet-base":
            head, _, rest = r["text"].partition(": ")
            word, gloss = head.rsplit(" (", 1)[0], rest.split("\n")[0]
            yield item(r["key"], "wordnet", _qa(f"What does {word} mean?", gloss), gloss)
        elif r["source"].startswith("dict-"):
            word = r["key"].split(":")[1]
            text = r["text"][:MAX_FACT_CHARS].rsplit(" ", 1)[0] if len(r["text"]) > MAX_FACT_CHARS else r["text"]
            yield item(r["key"], r["source"], _qa(f"Define {word}.", text), text)


MAX_BODY_CHARS = 1200


def functions(source: str, fallback_doc: str = "") -> Iterator[tuple[str, str, str]]:
    """``(name, prompt, body)`` for each function of ``source`` with a docstring: the prompt is its
    dedented ``def`` line and docstring, the body the statements after it, so ``prompt + "\\n" + body``
    is the function again."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2 and \
                ast.get_docstring(node) is not None:
            continue
        doc = ast.get_docstring(node) or fallback_doc
        if not doc or node.decorator_list:
            continue
        has_doc = ast.get_docstring(node) is not None
        first = node.body[1] if has_doc else node.body[0]
        body = textwrap.dedent("\n".join(lines[first.lineno - 1:node.end_lineno]))
        body = textwrap.indent(body, "    ")
        head = f"{'async ' if isinstance(node, ast.AsyncFunctionDef) else ''}def {node.name}({ast.unparse(node.args)}):"
        prompt = f'{head}\n    """{doc.strip()}"""'
        if len(body) <= MAX_BODY_CHARS and len(prompt) <= MAX_BODY_CHARS and parses(prompt + "\n" + body):
            yield node.name, prompt, body


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _code_items(records: list[dict]) -> Iterator[Item]:
    for r in records:
        doc = r["text"][3:r["text"].find('"""', 3)] if r["source"] == "reasoning_gym/codeio" else ""
        family = "codeio" if r["source"] == "reasoning_gym/codeio" else "stdlib"
        for name, prompt, body in functions(r["text"], doc):
            yield item(f"{r['key']}:{name}", family, _qa(prompt, body), body)


def domain_items(domain: str, records: list[dict], seed: int = 0) -> list[Item]:
    """The instruction items built from one domain's corpus records (any split)."""
    rng = random.Random(seed)
    if domain in ("math", "reasoning"):
        return list(_rg_items(records))
    if domain == "conversation":
        return list(_dialogue_items(records))
    if domain == "knowledge":
        return list(_knowledge_items(records, rng))
    if domain == "code":
        return list(_code_items(records))
    raise ValueError(f"no instruction items for domain {domain!r}")


def train_items(corpus: Any, domain: str, seed: int = 0, expr_share: float = 0.2) -> list[Item]:
    """A domain's instruction training items: its train split, plus (math) the arithmetic curriculum,
    twice as many items as the domain's others, each drawn :data:`ARITH_WEIGHT` times as often, of
    which ``expr_share`` are expressions (``train.expr_share``)."""
    items = domain_items(domain, corpus.docs(domain, "train"), seed)
    if domain == "math":
        n = max(20_000, 2 * len(items))
        held = question_expressions(corpus.docs("math", "test") + corpus.docs("math", "val"))
        n_expr = round(n * expr_share)
        items += arithmetic_items(n - n_expr, seed + 1) + expression_items(n_expr, seed + 2, exclude=held)
    return items


# ---- held-out task items -------------------------------------------------------------------------
def arithmetic_eval_items(n: int, seed: int = 12345) -> list[Item]:
    """Held-out + - x on 2- and 3-digit operands, in the plain phrasings (never trained on)."""
    return arithmetic_items(n, seed, split="test", digits=(2, 3), phrasings=PLAIN_PHRASINGS)


def fact_eval_items(corpus: Any) -> list[Item]:
    """Trained facts asked in the held-out phrasing of :data:`FACT_QUESTIONS`."""
    out = []
    for key, country, path, value in facts(corpus.docs("knowledge", "train")):
        if path in FACT_QUESTIONS and len(value) <= MAX_FACT_CHARS:
            q = FACT_QUESTIONS[path][-1].format(c=country)
            out.append(item(f"{key}:{path}:heldout", path.split(" - ")[0].lower(), _qa(q, value), value))
    return out


def task_items(corpus: Any, domain: str, per_family: int, seed: int = 0) -> list[Item]:
    """Held-out task items of ``domain``: at most ``per_family`` per family, in a fixed order."""
    if domain == "math":
        items = arithmetic_eval_items(3 * per_family, seed) + domain_items("math", corpus.docs("math", "test"))
    elif domain == "knowledge":
        items = fact_eval_items(corpus)
    else:
        items = domain_items(domain, corpus.docs(domain, "test"), seed)
    rng = random.Random(seed)
    rng.shuffle(items)
    counts: dict[str, int] = {}
    out = []
    cap = {f"arithmetic_{op}": per_family for op in ARITH_OPS}
    for it in items:
        c = counts.get(it["family"], 0)
        if c < cap.get(it["family"], per_family):
            counts[it["family"]] = c + 1
            out.append(it)
    return sorted(out, key=lambda it: (it["family"], it["key"]))
