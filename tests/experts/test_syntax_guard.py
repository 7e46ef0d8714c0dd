"""The Python syntax guard: what it refuses, that a guarded reply which ends parses, and that the
engine decodes exactly as before when the guard has nothing to refuse."""

from __future__ import annotations

import ast
import dataclasses
import string

import pytest
import torch

from experts.config import ModelConfig
from experts.generate import Engine, generate
from experts.model import Transformer
from experts.sampling import SamplingParams
from experts.syntax_guard import Invalid, Lex, PythonGuard, opens_definition, scan, viable

HEAD = 'def f(x, y):\n    """Add."""\n'


class CharTokenizer:
    """One id per character (ids 0-4 are the specials), enough to drive the guard and the engine."""

    specials = ("<pad>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>")
    chars = string.ascii_letters + string.digits + string.punctuation + " \n\t"

    def __init__(self) -> None:
        self.bos_id, self.user_id, self.assistant_id, self.end_id = 1, 2, 3, 4
        self.eos_id = 0
        self.vocab = list(self.specials) + list(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i >= len(self.specials))

    def chat(self, user: str) -> list[int]:
        return [self.bos_id, self.user_id, *self.encode(user), self.end_id, self.assistant_id]


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer()


def _model(tok: CharTokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=len(tok.vocab))).eval()


def _state(tok: CharTokenizer, reply: str = ""):
    state = PythonGuard(tok).open(tok.chat(HEAD.rstrip("\n")))
    for i in tok.encode(reply):
        state.advance(i)
    return state


@pytest.mark.parametrize("text, brackets, quote", [
    ("f(a, [b, {c: d", ("(", "[", "{"), ""), ("x = '''a\n(", (), "'''"),
    ('x = "a#(" + (b', ("(",), ""), ("x = 1  # (\n", (), ""),
])
def test_scan_tracks_brackets_outside_strings_and_comments(text, brackets, quote):
    lex = scan(Lex(), text, final=True)[0]
    assert (lex.brackets, lex.quote) == (brackets, quote)


@pytest.mark.parametrize("text, why", [
    ("f(a]", "closes nothing"), ("x = 1)", "closes nothing"), ("x = 'ab\n", "inside a string"),
    ("f(a,  # note\n", "comment inside open brackets"),
])
def test_scan_refuses_what_no_ending_can_fix(text, why):
    with pytest.raises(Invalid, match=why):
        scan(Lex(), text, final=True)


def test_a_quote_run_at_the_end_waits_for_the_next_piece():
    lex, used, _ = scan(Lex(), 'x = ""')
    assert used == 4 and lex.quote == ""  # '""' may still open a triple-quoted string
    assert scan(Lex(), 'x = """')[0].quote == '"""'
    assert scan(Lex(), 'x = ""', final=True)[0].quote == ""


@pytest.mark.parametrize("text, ok", [
    (HEAD + "    return x +", True), (HEAD + "    return f(x, ", True), (HEAD + "    if x", True),
    (HEAD + "    s = 'ab", True), (HEAD + "    return x\n  y = 1", False),  # no such indentation level
    (HEAD + "    if x:\n    return 1", False),  # a block was expected
    (HEAD + "    return x y", False), (HEAD + "    x = = 1", False), (HEAD + "    return x\nelse:", False),
])
def test_viable_asks_whether_some_ending_makes_the_code_valid(text, ok):
    lex = scan(Lex(), text, final=True)[0]
    assert viable(text, lex) is ok


def test_only_a_prompt_that_opens_a_definition_is_guarded(tok):
    guard = PythonGuard(tok)
    assert opens_definition("def fib(n):\n") and opens_definition("@cache\ndef fib(n):\n")
    assert not opens_definition("What is the capital of France?\n")
    assert not opens_definition("hi\n")  # valid Python, but not code a user asks to be continued
    assert guard.open(tok.chat("what is it")) is None
    assert guard.open(tok.chat("def g(a):")) is not None
    assert guard.open([tok.bos_id, *tok.encode("def g(a):\n")]).text == "def g(a):\n"  # a raw prompt


def test_the_end_of_the_reply_waits_until_the_function_parses(tok):
    state = _state(tok, "    return (x")
    assert not state.allows(tok.end_id) and not state.allows(tok.eos_id)
    assert state.allows(tok.encode(")")[0]) and not state.allows(tok.encode("]")[0])
    state.advance(tok.encode(")")[0])
    assert state.allows(tok.end_id)
    assert ast.parse(state.text)


def test_refused_tokens_are_the_ones_that_break_the_code(tok):
    state = _state(tok, "    if x:\n")
    newline = tok.encode("\n")[0]
    # the body of the if must be indented deeper than the if
    deeper = _state(tok, "    if x:\n        ")
    same = _state(tok, "    if x:\n    ")
    assert deeper.allows(tok.encode("r")[0]) and not same.allows(tok.encode("r")[0])
    assert state.allows(tok.encode(" ")[0]) and state.allows(newline)
    broken = _state(tok, "    return x +")
    assert not broken.allows(newline) and broken.allows(tok.encode("1")[0])


@pytest.mark.parametrize("reply, nxt", [
    ("    s = ", '"'), ("    s = ", "'"), ('    s = "', '"'), ('    s = ""', '"'), ('    s = """', "\n"),
    ("    s = 'a", "'"), ("    s = f(1, ", "'"),
])
def test_quotes_may_open_and_close_strings(tok, reply, nxt):
    assert _state(tok, reply).allows(tok.encode(nxt)[0])


def test_the_reply_ends_once_the_function_returns_at_its_own_level(tok):
    done = _state(tok, "    return x")
    assert done.allows(tok.end_id) and done.allows(tok.encode("1")[0])  # the expression may go on
    assert not done.allows(tok.encode("\n")[0])  # but no line may follow it
    inner = _state(tok, "    if x:\n        return 1\n")
    assert inner.allows(tok.encode(" ")[0])
    assert not _state(tok, "    if x:\n        return 1\n        ").allows(tok.encode("y")[0])  # unreachable
    assert _state(tok, "    if x:\n        return 1\n        ").allows(tok.encode("#")[0])  # a comment may
    assert _state(tok, "    if x:\n        return 1\n    ").allows(tok.encode("y")[0])  # after the if: reachable
    assert _state(tok, "    for y in x:\n        break\n    else:\n        return").allows(tok.end_id)
    assert _state(tok, "    return_x = 1\n").allows(tok.encode(" ")[0])  # a name, not the keyword


def _feed(tok: CharTokenizer, reply: str) -> str | None:
    """Feed ``reply`` one character at a time; the prefix before the first refused one, or None."""
    state = _state(tok)
    for i, c in enumerate(reply):
        if not state.allows(tok.encode(c)[0]):
            return reply[:i]
        state.advance(tok.encode(c)[0])
    return None if state.allows(tok.end_id) else reply


@pytest.mark.parametrize("body", [
    "    for a in x:\n        print(a)\n    return y",  # a loop header is refused until its colon otherwise
    "    from os import path\n    return path",
    "    z = [a for a in x if a]\n    return sum(a * 2 for a in z)",
    "    z = x if y else None\n    if x not in y:\n        return z\n    return x",
    "    g = lambda a, b: a\n    return g(x, b=1)",
    "    d = {'a': 1, 'b': 2}\n    return d",
    "    def g(a):\n        return a\n    return g",
    "    if isinstance(x, int) and x is not None:\n        return x.is_integer()\n    return x",
    "    try:\n        pass\n    finally:\n        del x\n    return 0x7f",
    "    s = r'\\d+' + '\\'' + f'{x}' + \"\\n\"\n    return s",
    "    return (x +\n            y)",
    "    y = x \\\n        + 1\n    return y",
    "    while (n := x) >= 0:\n        x -= 1\n    return n",
])
def test_valid_bodies_pass_character_by_character(tok, body):
    assert _feed(tok, body) is None


def test_nothing_comes_after_the_definition(tok):
    assert not _state(tok, "    x = 1\n").allows(tok.encode("y")[0])  # top-level code: a new statement
    assert _state(tok, "    x = 1\n").allows(tok.end_id)


def test_a_step_that_spent_its_compiles_refuses_the_rest(tok):
    from experts.syntax_guard import STEP_COMPILES

    state = _state(tok, "    return x")
    state.spent[0] = STEP_COMPILES
    assert not state.allows(tok.encode(" ")[0])  # the sampler then keeps the model's own choice
    state.advance(tok.encode(" ")[0])
    assert state.ok and state.spent[0] == 0 and state.allows(tok.encode("+")[0])


def test_special_ids_that_write_no_text_are_refused(tok):
    assert not _state(tok, "    return ").allows(tok.user_id)


def test_deep_nesting_is_refused_not_raised(tok):
    state = _state(tok, "    return " + "-" * 4000)
    assert state.ok is False or not state.allows(tok.encode("x")[0])  # either way, no exception
    assert PythonGuard(tok).open(tok.chat("def f(x):\n    return " + "(" * 3000)) is None


def test_a_token_no_candidate_could_replace_turns_the_guard_off(tok):
    state = _state(tok, "    return x")
    state.advance(tok.encode(")")[0])  # the model's own choice stood
    assert not state.ok and state.allows(tok.end_id) and state.allows(tok.encode("]")[0])


def _replies(model, prompts, params, guard=None):
    outs = [[] for _ in prompts]
    for step in generate(model, prompts, params, guard=guard):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return outs


def test_every_guarded_reply_that_ends_parses(tok):
    model = _model(tok)
    with torch.no_grad():  # make the end of the turn likely, so that replies try to end early
        model.output.weight[tok.end_id] *= 4
    prompts = [tok.chat(HEAD.rstrip("\n"))] * 12
    params = SamplingParams(temperature=1.0, max_new_tokens=40, stop_ids=(tok.end_id, tok.eos_id), seed=0)
    free = _replies(model, prompts, params)
    guarded = _replies(model, prompts, params, PythonGuard(tok))
    ended = [o for o in guarded if o and o[-1] == tok.end_id]
    free_parse = [_parses(tok, o) for o in free if o and o[-1] == tok.end_id]
    assert ended and all(_parses(tok, o) for o in ended)
    assert not all(free_parse)  # the same model unguarded ends replies that do not parse


def _parses(tok, reply: list[int]) -> bool:
    try:
        ast.parse(HEAD + tok.decode(reply))
    except SyntaxError:
        return False
    return True


def test_an_unguarded_prompt_decodes_exactly_as_without_a_guard(tok):
    model = _model(tok)
    prompts = [tok.chat("what is it"), tok.chat("hello there")]
    for params in (SamplingParams(temperature=0, max_new_tokens=12),
                   SamplingParams(temperature=1.0, top_k=20, max_new_tokens=12, seed=3)):
        assert _replies(model, prompts, params, PythonGuard(tok)) == _replies(model, prompts, params)


def test_engine_passes_the_guard_nothing_but_the_prompt_and_the_taken_ids(tok):
    model = _model(tok)
    seen = {}

    class Recorder:
        max_tries = 4

        def open(self, prompt):
            seen["prompt"] = list(prompt)
            return self

        def allows(self, token):
            return True

        def advance(self, token):
            seen.setdefault("taken", []).append(token)

    engine = Engine(model, max_batch=1, guard=Recorder())
    slot = engine.add(tok.chat("def g(a):"), SamplingParams(temperature=0, max_new_tokens=5))
    out = []
    while engine.has_work:
        out.append(engine.step()[slot].token)
    assert seen["prompt"] == tok.chat("def g(a):") and seen["taken"] == out


def test_reference_path_refuses_a_guard(tok):
    with pytest.raises(ValueError, match="reference path"):
        list(generate(_model(tok), [[1]], SamplingParams(max_new_tokens=2), use_cache=False, guard=PythonGuard(tok)))


class AnyCharTokenizer(CharTokenizer):
    """CharTokenizer with an id for any character, given on first use."""

    def encode(self, text: str) -> list[int]:
        for c in text:
            if c not in self.vocab:
                self.vocab.append(c)
        return super().encode(text)


def test_real_standard_library_functions_pass_character_by_character():
    from bench.guard_coverage import stdlib_functions
    from experts.syntax_guard import parses

    tok = AnyCharTokenizer()
    guard = PythonGuard(tok)
    checked = 0
    for where, prompt, body in stdlib_functions(30, seed=1):
        if not parses(prompt + "\n" + body):
            continue
        state = guard.open(tok.chat(prompt))
        for i, c in enumerate(body):
            t = tok.encode(c)[0]
            assert state.allows(t), f"{where}: refused {c!r} after {body[max(0, i - 60):i]!r}"
            state.advance(t)
        assert state.allows(tok.end_id), where
        checked += 1
    assert checked >= 25
