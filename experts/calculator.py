"""A calculator the math models call while they generate: ``345 + 278 = `` is followed by ``623``.

The model writes the arithmetic it needs as ordinary text, an expression and ``=``; when the text a
request has generated ends that way, the engine (``experts.generate.Engine``) feeds the value's
tokens as the next ones instead of sampling them, and the model goes on from there. This is the
calculator of GSM8K's solvers (Cobbe et al., 2021) with the expression itself as the call, so a reply
reads as plain text (``345 + 278 = 623``) and the instruction items train on that text unchanged.

Only numbers, ``+ - * /`` (also ``x``, ``×``, ``÷``), unary signs and parentheses are evaluated, with
exact decimals (:mod:`decimal`); nothing is ``eval``-ed. Anything else (a variable, a word, ``**``, a
division by zero, a huge value) is not a call, and the model's own tokens stand.

A model uses the calculator when its checkpoint's meta lists it (``tools: ["calculator"]``, written
for a model whose instruction stage saw the math items): :func:`tool_for`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Context, Decimal, DivisionByZero, InvalidOperation, localcontext
from typing import Any

NAME = "calculator"
MAX_EXPR_CHARS = 160
MAX_DIGITS = 30  # a value with more integer digits than this is not answered
SIG_DIGITS = 12  # a non-integral value is rounded (half up) to this many significant digits

# Every operation runs in this context, never the thread's current one, which other code may change
# (reasoning-gym's decimal generators set the global precision to a few digits).
_CONTEXT = Context(prec=60, rounding=ROUND_HALF_UP, traps=[DivisionByZero, InvalidOperation])

_NUM = r"\d+(?:\.\d+)?"
_OP = r"(?:[+\-*/×÷]|(?<=\s)x(?=\s))"  # a letter x multiplies only between spaces (``12 x 34``)
_OPERAND = rf"[(\-+\s]*{_NUM}[\s)]*"  # a number with its signs and parentheses
_EXPR = re.compile(rf"{_OPERAND}(?:{_OP}{_OPERAND})+")  # at least one binary operator
_TRAILING = re.compile(rf"(?P<expr>{_EXPR.pattern})=\s?$")
_WORD_NEXT = re.compile(r"\s*(?:[*/×÷^]|[^\W\d])")  # an expression followed by this is part of a formula


def _value(node: ast.AST, src: str) -> Decimal:
    if isinstance(node, ast.Expression):
        return _value(node.body, src)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Decimal(ast.get_source_segment(src, node) or repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand, src)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _value(node.left, src), _value(node.right, src)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def format_value(v: Decimal) -> str:
    """An integral value as an integer; another rounded to :data:`SIG_DIGITS` significant digits,
    without trailing zeros or an exponent (``-0.95547315436``)."""
    with localcontext(_CONTEXT):
        if v == v.to_integral_value():
            return str(int(v))
        q = Decimal(1).scaleb(v.adjusted() - SIG_DIGITS + 1)
        text = format(v.quantize(q), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def evaluate(expr: str) -> str | None:
    """The value of an arithmetic expression as text, or None if ``expr`` is not one."""
    if len(expr) > MAX_EXPR_CHARS or not _EXPR.fullmatch(expr.strip()):
        return None
    src = expr.strip().replace("×", "*").replace(" x ", " * ").replace("÷", "/")
    try:
        tree = ast.parse(src, mode="eval")
        with localcontext(_CONTEXT):
            v = _value(tree, src)
    except (SyntaxError, ValueError, ArithmeticError, RecursionError):
        return None
    if v.adjusted() >= MAX_DIGITS:
        return None
    return format_value(v)


def trailing_call(text: str) -> str | None:
    """The value to write next when ``text`` ends with ``<expression> =`` (one optional space), else None."""
    if not text.rstrip(" ").endswith("=") or text.rstrip(" ").endswith(("==", "<=", ">=", "!=")):
        return None
    window = text[-(MAX_EXPR_CHARS + 4):]
    m = _TRAILING.search(window)
    if m is None or (m.start() == 0 and len(window) < len(text)):  # it may go on before the window
        return None
    return evaluate(m["expr"]) if _stands_alone(window, m) else None


def _stands_alone(text: str, m: re.Match) -> bool:
    """The match does not continue a name or a longer number before it (``x12 + 3``, ``v1.5 + 2``)."""
    start = m.start() + len(m.group(0)) - len(m.group(0).lstrip())
    before = text[start - 1:start] if start else ""
    return not (before.isalnum() or before in (".", "_"))


def expression_in(question: str) -> str | None:
    """The longest arithmetic expression written in ``question`` (for building training answers)."""
    found = [m.group(0).strip() for m in _EXPR.finditer(question)
             if _stands_alone(question, m) and not _WORD_NEXT.match(question, m.end())]
    found = [f for f in found if evaluate(f) is not None]
    return max(found, key=len) if found else None


def same_number(a: str, b: str) -> bool:
    """``a`` and ``b`` are numbers within 1e-9 (relative to ``b``, at least 1e-9 absolute)."""
    with localcontext(_CONTEXT):
        try:
            x, y = Decimal(a), Decimal(b)
        except InvalidOperation:
            return False
        return abs(x - y) <= Decimal("1e-9") * max(Decimal(1), abs(y))


def calculator_reply(question: str, answer: str) -> str | None:
    """``<expression> = <value>`` when ``question`` writes an arithmetic expression whose value is
    ``answer`` (to 1e-9): the reply that has the calculator do the arithmetic."""
    expr = expression_in(question)
    value = evaluate(expr) if expr else None
    return f"{expr} = {value}" if value is not None and same_number(value, answer) else None


class Calculator:
    """The engine's tool: given the ids a request has generated, the ids to feed next (or none)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._text: dict[int, str] = {}

    def _token_text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tok.decode([token])
        return self._text[token]

    def _may_end_call(self, generated: Sequence[int]) -> bool:
        """The last token holds ``=``, or is blank after one that does (cheap: no full decode)."""
        last = self._token_text(generated[-1])
        if "=" in last:
            return True
        return len(generated) > 1 and not last.strip() and "=" in self._token_text(generated[-2])

    def __call__(self, generated: Sequence[int]) -> list[int]:
        if not generated or not self._may_end_call(generated):
            return []
        text = self.tok.decode(list(generated))
        value = trailing_call(text)
        if value is None:
            return []
        value = value if text.endswith(" ") else " " + value
        full, head = self.tok.encode(text + value), self.tok.encode(text)
        return full[len(head):] if full[:len(head)] == head else self.tok.encode(value)


def tool_for(meta: Mapping[str, Any] | None, tokenizer: Any) -> Calculator | None:
    """The calculator if a checkpoint's ``meta`` lists it among its tools, else None."""
    return Calculator(tokenizer) if meta and NAME in (meta.get("tools") or ()) else None
