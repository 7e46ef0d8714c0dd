"""A Python syntax guard for code completions: the engine skips a token that would make the code invalid.

Structured decoding in the manner of grammar-guided generation (vLLM's guided decoding, llama.cpp's
grammars), with Python's own compiler as the grammar. When a request's prompt opens a Python
definition (``def f(x):`` and its docstring, as the code expert is asked), each candidate token of
the reply is checked before it is taken, in the order the sampler would take them:

- scanned as text, it must not close a bracket that is not open (or close ``(`` with ``]``), end a
  line inside a one-line string, or start a comment inside open brackets (valid Python, but in a
  small model's reply it is a call that is never closed);
- the program so far must stay *viable*: closed after it (its string and brackets closed, a name
  and a colon put in where one is missing), :func:`codeop.compile_command` judges it complete or
  incomplete, not invalid. That refuses a wrong indentation, ``x = = 1``, ``return x y``, ...;
- the end of the reply (a stop id) is taken only where the prompt and reply parse as a whole.

Nothing is executed. When none of the first :data:`MAX_TRIES` candidates passes, the model's own
choice stands and the guard steps aside for the rest of the reply: it steers, it never blocks. A
prompt that does not open a definition is not guarded (a question in words, a conversation, a
prompt cut before its ``def`` line).

The engine (``experts.generate.Engine``) calls :meth:`PythonGuard.open` with a request's prompt ids;
the returned :class:`GuardState` is asked :meth:`GuardState.allows` per candidate and told
:meth:`GuardState.advance` of every token taken.
"""

from __future__ import annotations

import codeop
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_TRIES = 1024  # candidates tried per step before the model's own choice stands
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}
_DEFINES = ("def ", "async def ", "class ", "@")


class Invalid(Exception):
    """The text cannot be the start of a valid Python program."""


@dataclass(frozen=True)
class Lex:
    """What a scan of Python source knows at its end: open brackets, an open string, a comment."""

    brackets: tuple[str, ...] = ()
    quote: str = ""  # the delimiter of the open string ('"', "'", '\"\"\"', "'''"), or ""
    comment: bool = False

    @property
    def at_statement_level(self) -> bool:
        return not self.brackets and not self.quote


def scan(state: Lex, text: str, *, final: bool = False) -> tuple[Lex, int, list[int]]:
    """Scan ``text`` from ``state``: the new state, how many characters were consumed, and the offsets
    just past each newline that ends a logical line. A run of quotes at the end is left unconsumed
    (``""`` may yet open a triple-quoted string) unless ``final``. Raises :class:`Invalid`."""
    brackets, quote, comment = list(state.brackets), state.quote, state.comment
    ends: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if comment:
            if c == "\n":
                comment = False
                if not brackets:
                    ends.append(i + 1)
        elif quote:
            if c == "\\":
                i += 1  # the escaped character (a quote, a newline) does not end anything
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
            elif c == "\n" and len(quote) == 1:
                raise Invalid("a line ends inside a string")
            elif not final and c == quote[0] and len(quote) == 3 and n - i < 3:
                break  # a closing triple quote may be split across tokens
        elif c in "\"'":
            run = len(text[i:i + 3]) - len(text[i:i + 3].lstrip(c))
            if run < 3 and i + run == n and not final:
                break  # "" at the end: an empty string, or the start of a triple quote
            if run == 3:
                quote, i = c * 3, i + 2
            elif run == 2:
                i += 1  # an empty string
            else:
                quote = c
        elif c == "#":
            if brackets:  # valid Python, but in a reply it is a bracket that was never closed
                raise Invalid("a comment inside open brackets")
            comment = True
        elif c in _OPEN:
            brackets.append(c)
        elif c in _CLOSE:
            if not brackets or brackets[-1] != _CLOSE[c]:
                raise Invalid(f"{c!r} closes nothing that is open")
            brackets.pop()
        elif c == "\\" and i + 1 < n and text[i + 1] == "\n":
            i += 1  # an explicit line continuation
        elif c == "\n" and not brackets:
            ends.append(i + 1)
        i += 1
    return Lex(tuple(brackets), quote, comment), min(i, n), ends


def status(source: str) -> str:
    """``"complete"``, ``"incomplete"`` or ``"invalid"``: the interactive interpreter's judgement."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like
        try:
            code = codeop.compile_command(source, "<completion>", "exec")
        except (SyntaxError, ValueError, OverflowError):
            return "invalid"
    return "incomplete" if code is None else "complete"


def parses(source: str) -> bool:
    """``source`` compiles as a whole program (nothing is run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<completion>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError):
            return False
    return True


def opens_definition(code: str) -> bool:
    """``code`` starts a Python function or class and is a valid start of a program."""
    return code.lstrip().startswith(_DEFINES) and status(code + "\n") != "invalid"


_TERMINAL = re.compile(r"(?:return|raise|continue|break)\b")


def _after_line(closed: frozenset[int], line: str) -> frozenset[int]:
    """The indentations at which a next statement would be unreachable, after the logical line ``line``:
    one after ``return``, ``raise``, ``continue`` or ``break``; a line at a lower indentation ends
    the deeper blocks."""
    body = line.lstrip(" \t")
    if not body.strip() or body.startswith("#"):
        return closed
    indent = len(line) - len(body)
    closed = frozenset(i for i in closed if i < indent)
    return closed | {indent} if _TERMINAL.match(body) else closed


def _body(body: int | None, line: str, head: int) -> int | None:
    """The indentation of a definition's body: that of its first statement or docstring."""
    shown = line.lstrip(" \t")
    if body is not None or not shown.strip() or shown.startswith("#") or len(line) - len(shown) <= head:
        return body
    return len(line) - len(shown)


def _returned(closed: frozenset[int], body: int | None) -> bool:
    """The definition's body has returned at its own level (nothing after it could run)."""
    return body is not None and bool(closed) and min(closed) <= body


class GuardState:
    """One request's code so far (prompt and reply), and the checks a next token must pass."""

    def __init__(self, guard: PythonGuard, base: str) -> None:
        self.guard = guard
        self.text, self.lex, self.done, self.stmt, self.closed = "", Lex(), 0, 0, frozenset()
        self.head = len(base) - len(base.lstrip(" \t"))  # the indentation of the definition's first line
        self.body: int | None = None  # the indentation of its body, once a line shows it
        self.ok = True  # the program so far can still become valid
        self._take(base, self._state_after(base))

    def _state_after(self, piece: str) -> tuple | None:
        """The state after ``piece`` (the scan's state, how far it went, where the current logical line
        starts, the unreachable indentations, the body's indentation), or None if ``piece`` makes the
        program invalid."""
        text = self.text + piece
        try:
            lex, used, ends = scan(self.lex, text[self.done:])
            now = scan(lex, text[self.done + used:], final=True)[0]  # a quote run at the end, as it stands
        except Invalid:
            return None
        stmt, closed, body = self.stmt, self.closed, self.body
        for end in ends:
            if _returned(closed, body):
                return None  # the function has returned: the reply is over (only its end may come)
            line = text[stmt:self.done + end]
            closed, stmt, body = _after_line(closed, line), self.done + end, _body(body, line, self.head)
        line = text[stmt:]
        shown = line.lstrip(" \t")
        if _returned(closed, body) or closed and shown.strip() and len(line) - len(shown) >= min(closed):
            return None  # a statement no path reaches, or a comment on one (after a return at its level)
        return (lex, self.done + used, stmt, closed, body) if viable(text, now) else None

    def _take(self, piece: str, state: tuple[Lex, int, int, frozenset[int]] | None) -> None:
        self.text += piece
        if state is None:
            self.ok = False
        else:
            self.lex, self.done, self.stmt, self.closed, self.body = state

    def allows(self, token: int) -> bool:
        """Taking ``token`` next keeps the program valid (a stop id: the program parses)."""
        if not self.ok:
            return True
        if token in self.guard.stop_ids:
            return parses(self.text)
        return self._state_after(self.guard.text(token)) is not None

    def advance(self, token: int) -> None:
        """Record a taken token. One that makes the program invalid (no candidate passed, and the
        model's own choice stood) turns the guard off for the rest of the reply."""
        if self.ok and token not in self.guard.stop_ids:
            piece = self.guard.text(token)
            self._take(piece, self._state_after(piece))


def viable(text: str, lex: Lex) -> bool:
    """Some ending makes ``text`` valid code: its comment, string and brackets closed, with a name
    put in first (``x = ``, ``f(a, ``) and a colon after (``if x``), it compiles as complete or
    incomplete."""
    end = "\n" if lex.comment else lex.quote
    closers = "".join(_OPEN[b] for b in reversed(lex.brackets))
    return any(status(f"{text}{end}{name}{closers}{colon}\n") != "invalid"
               for name in ("", "_", " _") for colon in ("", ":"))


class PythonGuard:
    """The engine's guard for code: :meth:`open` a request's state if its prompt opens a definition."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.stop_ids = frozenset(i for i in (getattr(tokenizer, "end_id", None), getattr(tokenizer, "eos_id", None))
                                  if i is not None)
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tok.decode([token])
        return self._text[token]

    def code_of(self, prompt: Sequence[int]) -> str | None:
        """The code a reply continues: the last user turn plus a newline for a chat prompt, else the
        prompt's text; None when that does not open a Python definition."""
        ids = list(prompt)
        user, end = getattr(self.tok, "user_id", None), getattr(self.tok, "end_id", None)
        if user is not None and user in ids:
            start = len(ids) - ids[::-1].index(user)
            stop = ids.index(end, start) if end in ids[start:] else len(ids)
            code = self.tok.decode(ids[start:stop]) + "\n"
        else:
            code = self.tok.decode([i for i in ids if i != getattr(self.tok, "bos_id", None)])
        return code if opens_definition(code) else None

    def open(self, prompt: Sequence[int]) -> GuardState | None:
        code = self.code_of(prompt)
        return None if code is None else GuardState(self, code)
