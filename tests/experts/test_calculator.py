"""The calculator: exact arithmetic only, calls recognised at the end of generated text, and the
engine feeding a tool's ids through the same forward as sampled ones."""

from __future__ import annotations

from decimal import ROUND_DOWN, localcontext

import pytest
import torch

from experts.calculator import Calculator, evaluate, expression_in, same_number, tool_for, trailing_call
from experts.config import ModelConfig
from experts.generate import Engine, generate
from experts.model import Transformer
from experts.sampling import SamplingParams
from experts.tokenizer import Tokenizer


@pytest.mark.parametrize("expr, value", [
    ("345 + 278", "623"), ("96 - 155", "-59"), ("12 * 34", "408"), ("12 x 34", "408"), ("12 × 34", "408"),
    ("0.1 + 0.2", "0.3"),  # exact decimals, not binary floats
    ("-( 6663 + -2840 + 1717 + 2517 )", "-8057"), ("-516 * 346 / 173", "-1032"), ("2 + 3 * 4", "14"),
    ("1 / 3", "0.333333333333"), ("2 / 3", "0.666666666667"), ("(2 + 3) * 4", "20"),
])
def test_evaluate_is_exact_arithmetic(expr, value):
    assert evaluate(expr) == value


def test_evaluate_ignores_the_threads_decimal_context():
    # reasoning-gym's decimal generators set the global precision to a few digits while a corpus is built
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = 3, ROUND_DOWN
        assert evaluate("1 / 3") == "0.333333333333"
        assert evaluate("123456 * 1000 + 0.5") == "123456000.5"
        assert evaluate("2 / 3") == "0.666666666667"
        assert same_number("100000.1", "100000.2") is False


@pytest.mark.parametrize("expr", [
    "1 / 0", "2 ** 3", "a + 1", "7", "__import__('os')", "3x + 2", "(1 + 2", "9" * 20 + " * " + "9" * 20,
    "1 + " * 60 + "1",
])
def test_evaluate_refuses_anything_but_arithmetic(expr):
    assert evaluate(expr) is None


@pytest.mark.parametrize("text, value", [
    ("345 + 278 = ", "623"), ("So 345 + 278 =", "623"), ("What is 3 + 4? 3 + 4 = ", "7"),
    ("x = ", None), ("a == ", None), ("2 + 2 = 4", None), ("3x + 2 = ", None), ("5 girls x 3 boys/girl = ", None),
    ("345 + 278", None), ("12 =", None), ("x12 + 3 = ", None), ("v1.5 + 2 = ", None),
    ("1 + " * 50 + "1 = ", None),  # longer than a call may be: not a suffix of it either
])
def test_a_call_is_an_expression_and_equals_sign_at_the_end(text, value):
    assert trailing_call(text) == value


def test_expression_in_a_question_skips_formulas_with_variables():
    assert expression_in("Calculate -85 * -14 + 89.") == "-85 * -14 + 89"
    assert expression_in("Solve the following multiplication: 527 * 843. Give only the result.") == "527 * 843"
    assert expression_in("Find the value of z in the equation: 134 - 86*z = -3650") is None
    assert expression_in("How many legs do 3 dogs have?") is None


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ["What is 345 + 278? 345 + 278 = 623", "x = 5 and y = 7", "12 * 34 = 408"] * 20
    return Tokenizer.train(texts, vocab_size=300, min_frequency=1)


def test_calculator_writes_the_value_as_the_tokens_the_full_text_would_have(tok):
    calc = Calculator(tok)
    for text in ("345 + 278 = ", "345 + 278 ="):
        head = tok.encode(text)
        forced = calc(head)
        assert tok.decode(head + forced) == text.rstrip() + " 623"
    assert calc(tok.encode("x = ")) == [] and calc(tok.encode("345 + 278")) == [] and calc([]) == []


def test_tool_for_reads_the_checkpoint_meta(tok):
    assert isinstance(tool_for({"tools": ["calculator"]}, tok), Calculator)
    assert tool_for({"instruct": {"domains": ["code"]}}, tok) is None and tool_for(None, tok) is None


def test_engine_feeds_tool_ids_then_resumes_as_if_they_were_in_the_prompt():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    prompt, inserted = [1, 2, 3], [7, 8, 9]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    calls = []

    def tool(generated: list[int]) -> list[int]:
        calls.append(list(generated))
        return inserted if len(generated) == 2 else []

    out = [step[0] for step in generate(model, [prompt], params, tool=tool)]
    first_two = [step[0] for step in generate(model, [prompt], SamplingParams(temperature=0, max_new_tokens=2))]
    assert out[:2] == first_two and out[2:5] == inserted
    # after the tool's ids, decoding continues exactly as from a prompt that holds them
    rest = [step[0] for step in generate(model, [prompt + out[:5]], SamplingParams(temperature=0, max_new_tokens=5))]
    assert out[5:] == rest
    assert [len(c) for c in calls] == [1, 2, 5, 6, 7, 8, 9]  # not asked while its ids are being fed


def test_engine_never_feeds_a_stop_id_from_a_tool():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    engine = Engine(model, max_batch=1, tool=lambda g: [5, 0, 6] if len(g) == 1 else [])
    slot = engine.add([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=4, stop_ids=(0,)))
    toks = []
    while engine.has_work:
        toks.append(engine.step()[slot].token)
    assert toks[1:3] == [5, 6] and 0 not in toks[1:3]


def test_reference_path_refuses_a_tool():
    model = Transformer(ModelConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="reference path"):
        list(generate(model, [[1]], SamplingParams(max_new_tokens=2), use_cache=False, tool=lambda g: []))
