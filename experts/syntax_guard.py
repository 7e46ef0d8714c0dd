"""A Python syntax guard for code completions: the engine skips a token that would make the code invalid.

Structured decoding in the manner of grammar-guided generation (vLLM's guided decoding, llama.cpp's
grammars), with Python's own compiler as the grammar. When a request's prompt opens a Python
definition (``def f(x):`` and its docstring, as the code expert is asked), each candidate token of
the reply is checked before it is taken, in the order the sampler would take them:

- scanned as text, it must not close a bracket that is not open (or close ``(`` with ``]``), end a
  line inside a one-line string, or start a comment inside open brackets (valid Python, but in a
  small model's reply it is a call that is never closed);
- the program so far must stay *viable*: with its string, comment and brackets closed, the compiler
  accepts it as complete or incomplete, or first complains at its very end, where what is missing
  would come next (:func:`viable`). That refuses a wrong indentation, ``x = = 1``, ``return x y``;
- the end of the reply (a stop id) is taken only where the prompt and reply parse as a whole;
- nothing follows a ``return``, ``raise``, ``break`` or ``continue`` at its own level (it could never
  run), so the reply ends once the function returns at the level of its body, where code-completion
  harnesses stop theirs.

Nothing is executed. When none of the first :data:`MAX_TRIES` candidates passes (or they cost
:data:`STEP_COMPILES` compiles), the model's own choice stands and the guard steps aside for the
rest of the reply: it steers, it never blocks. A prompt that does not open a definition is not
guarded (a question in words, a conversation, a prompt cut before its ``def`` line).
``bench.guard_coverage`` checks that real code passes: standard-library functions, token by token.

The engine (``experts.generate.Engine``) calls :meth:`PythonGuard.open` with a request's prompt ids;
the returned :class:`GuardState` is asked :meth:`GuardState.allows` per candidate and told
:meth:`GuardState.advance` of every token taken.
"""

from __future__ import annotations

import keyword
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_TRIES = 256  # candidates tried per step before the model's own choice stands
STEP_COMPILES = 2000  # and the compiles they may cost (~0.1 ms each on a 1,500-character program)
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}
_DEFINES = ("def ", "async def ", "class ", "@")
_PREFIX = re.compile(r"[rRbBuUfF]{0,2}$")  # a string's prefix letters, just before its quote
_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*$")
# What a line may still lack, as (before its brackets close, after): tried in this order (the order of
# how often each lets a standard-library function through, bench.guard_coverage), for the text as it
# is, with its last word read as the start of a longer name (``is`` of ``isinstance``), and as the
# start of a keyword (``final``).
_ENDINGS = (("_", ""), ("_", ":"), (" else _", ""), (": _", ""), ("1", ""), ("_ else _", ""), ("", " else _"),
            ("1", ":"), ("=_", ":"), ("=_", ""), (" _ else _", ""), (" _", ""), (" _", ":"), ("", ":"),
            ("*_", ""), ("*_", ":"), (" in _", ""), (" in _", ":"), (" _ in _", ""), ("", " in _:"), (" import _", ""),
            ("()", ""), ("()", ":"))
_NAME_ENDINGS = (("", ""), ("", ":"), (" in _", ":"), ("=_", ""), ("=_", ":"), (" else _", ""), ("", " else _"),
                 (" in _", ""), ("()", ":"))
_KEYWORD_ENDINGS = (("", ""), ("", ":"), (" _", ""), (" _", ":"), (" _ in _", ""), (" _ in _", ":"), (" in _", ""),
                    (" in _", ":"), (" _ else _", ""))
_FLAGS = 0x200 | 0x4000  # PyCF_DONT_IMPLY_DEDENT | PyCF_ALLOW_INCOMPLETE_INPUT, as codeop compiles
_TERMINAL = re.compile(r"(?:return|raise|continue|break)\b")


class Invalid(Exception):
    """The text cannot be the start of a valid Python program."""


@dataclass(frozen=True)
class Lex:
    """What a scan of Python source knows at its end: open brackets, an open string, a comment."""

    brackets: tuple[str, ...] = ()
    quote: str = ""  # the delimiter of the open string (one or three quote characters), or ""
    start: int = -1  # where the open string starts (with its prefix letters), in the whole program
    comment: bool = False


def scan(state: Lex, text: str, *, offset: int = 0, final: bool = False) -> tuple[Lex, int, list[int]]:
    """Scan ``text`` (at ``offset`` in the program) from ``state``: the new state, how many characters
    were consumed, and the offsets in ``text`` just past each newline that ends a logical line. A run
    of quotes or a backslash at the end is left unconsumed unless ``final`` (``""`` may yet open a
    triple-quoted string; a backslash escapes what comes next). Raises :class:`Invalid`."""
    brackets, quote, start, comment = list(state.brackets), state.quote, state.start, state.comment
    ends: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 == n and not final and not comment:
            break
        if comment:
            if c == "\n":
                comment = False
                if not brackets:
                    ends.append(i + 1)
        elif quote:
            if c == "\\":
                i += 1  # the escaped character (a quote, a newline) ends nothing
            elif text.startswith(quote, i):
                i, quote = i + len(quote) - 1, ""
            elif c == "\n" and len(quote) == 1:
                raise Invalid("a line ends inside a string")
            elif not final and c == quote[0] and len(quote) == 3 and n - i < 3:
                break  # a closing triple quote may be split across tokens
        elif c in "\"'":
            run = len(text[i:i + 3]) - len(text[i:i + 3].lstrip(c))
            if run < 3 and i + run == n and not final:
                break
            if run == 2:
                i += 1  # an empty string
            else:
                quote, start = c * run, offset + i - len(_PREFIX.search(text, 0, i)[0])
                i += run - 1
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
        elif c == "\\" and text[i + 1:i + 2] == "\n":
            i += 1  # an explicit line continuation
        elif c == "\n" and not brackets:
            ends.append(i + 1)
        i += 1
    return Lex(tuple(brackets), quote, start if quote else -1, comment), i, ends


def judge(source: str) -> SyntaxError | None:
    """None if the compiler takes ``source`` as a complete or an incomplete program (the interactive
    interpreter's judgement), else its error. Nothing is run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like
        try:
            compile(source, "<completion>", "exec", flags=_FLAGS, dont_inherit=True)
        except SyntaxError as e:
            return None if "incomplete input" in str(e) else e
        except (ValueError, OverflowError, RecursionError, MemoryError) as e:  # NUL bytes, deep nesting
            return SyntaxError(f"{type(e).__name__}: {e}")
    return None


def parses(source: str) -> bool:
    """``source`` compiles as a whole program (nothing is run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compile(source, "<completion>", "exec", dont_inherit=True)
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
            return False
    return True


def _at(source: str, err: SyntaxError) -> int:
    """The index in ``source`` where the compiler's complaint starts (0 when it names no line)."""
    if not err.lineno:
        return 0
    before = source.split("\n")[:err.lineno - 1]
    return sum(len(line) + 1 for line in before) + max((err.offset or 1) - 1, 0)


def viable(text: str, lex: Lex, spent: list[int] | None = None) -> bool:
    """Some ending makes ``text`` valid code. Its open string counts as closed and empty (what a string
    holds is checked when the reply ends), its comment as ended and its brackets as closed. Then the
    text is viable if the compiler accepts it or first complains at or after its end (``for a``:
    what is missing comes next); else if what a line may still lack makes it acceptable
    (:data:`_ENDINGS`: a name, a digit, ``*``, ``in``, ``else``, ``=``, ``: value``, ``import``, a
    call, and after the brackets a colon, ``else`` or ``in``), also with its last word read as the
    start of a longer name (``is`` of ``isinstance``), of a keyword (``final``) or of a string (``f``).
    ``spent[0]`` counts the compiles."""
    spent = spent if spent is not None else [0]
    head = text[:lex.start] + '""' if lex.quote else text + ("\n" if lex.comment else "")
    closers = "".join(_OPEN[b] for b in reversed(lex.brackets))
    source = head + closers + "\n"
    err, spent[0] = judge(source), spent[0] + 1
    if err is None or not isinstance(err, IndentationError) and _at(source, err) >= len(head):
        return True
    if lex.comment:
        return False
    word = None if lex.quote else _WORD.search(head)
    tries = [(head, end, tail) for end, tail in _ENDINGS]
    if word:
        stem = head[:word.start()]
        tries += [(stem + "_", end, tail) for end, tail in _NAME_ENDINGS]
        tries += [(stem + k, end, tail) for k in keyword.kwlist if k.startswith(word[0]) and k != word[0]
                  for end, tail in _KEYWORD_ENDINGS]
        tries += [(head + '""', "", ""), (head + '""', "", ":")] if _PREFIX.fullmatch(word[0]) else []  # f"...
    for h, end, tail in tries:
        if tail in ("", ":") or closers:  # without brackets, the endings hold the rest
            spent[0] += 1
            if judge(f"{h}{end}{closers}{tail}\n") is None:
                return True
    return False


def opens_definition(code: str) -> bool:
    """``code`` starts a Python function or class and is a valid start of a program."""
    return code.lstrip().startswith(_DEFINES) and judge(code + "\n") is None


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

    max_tries = MAX_TRIES  # how many candidates the sampler asks about per step

    def __init__(self, guard: PythonGuard, base: str) -> None:
        self.guard = guard
        self.text, self.lex, self.done, self.stmt, self.closed = "", Lex(), 0, 0, frozenset()
        self.head = len(base) - len(base.lstrip(" \t"))  # the indentation of the definition's first line
        self.body: int | None = None  # the indentation of its body, once a line shows it
        self.ok = True  # the program so far can still become valid
        self.spent = [0]  # compiles spent on this step's candidates
        self._last: tuple[str, tuple | None] = ("", None)  # the last piece asked about, and its state
        self._take(base, self._state_after(base))

    def _state_after(self, piece: str) -> tuple | None:
        """The state after ``piece`` (the scan's state, how far it went, where the current logical line
        starts, the unreachable indentations, the body's indentation), or None if ``piece`` makes the
        program invalid."""
        text = self.text + piece
        try:
            lex, used, ends = scan(self.lex, text[self.done:], offset=self.done)
            now = scan(lex, text[self.done + used:], offset=self.done + used, final=True)[0]  # as it stands
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
        indent = len(line) - len(shown)
        statement = shown.strip() and not shown.startswith("#")
        if _returned(closed, body) or statement and closed and indent >= min(closed) or \
                shown.strip() and body is not None and indent <= self.head:
            return None  # unreachable (after a return at its level), or past the definition's end
        return (lex, self.done + used, stmt, closed, body) if viable(text, now, self.spent) else None

    def _take(self, piece: str, state: tuple | None) -> None:
        self.text += piece
        if state is None:
            self.ok = False
        else:
            self.lex, self.done, self.stmt, self.closed, self.body = state

    def allows(self, token: int) -> bool:
        """Taking ``token`` next keeps the program valid (a stop id: the program parses; a special id
        that is not a stop, which writes no text, is refused)."""
        if not self.ok:
            return True
        if token in self.guard.stop_ids:
            return parses(self.text)
        if self.spent[0] >= STEP_COMPILES:
            return False  # the step has searched long enough: the model's own choice will stand
        piece = self.guard.text(token)
        self._last = (piece, self._state_after(piece) if piece else None)
        return self._last[1] is not None

    def advance(self, token: int) -> None:
        """Record a taken token. One that makes the program invalid (no candidate passed, and the
        model's own choice stood) turns the guard off for the rest of the reply."""
        if self.ok and token not in self.guard.stop_ids:
            piece = self.guard.text(token)
            self._take(piece, self._last[1] if self._last[0] == piece else self._state_after(piece))
        self.spent[0], self._last = 0, ("", None)


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
