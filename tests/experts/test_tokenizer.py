"""Tokenizer: lossless round trip, digits one per token, single-id specials, chat format, streaming."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experts.tokenizer import SPECIALS, Tokenizer

CORPUS = [
    "def f(x):\n\treturn x + 1  \r\n",
    "The quick brown fox jumps over the lazy dog. 12345 + 678 = 13023",
    "สวัสดีครับ 👋🏽 naïve café — ünïcödé",
    "<|user|>hi<|end|><|assistant|>hello<|end|>",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tok: Tokenizer, text: str) -> None:
    # special-token spellings in the text become their ids, so keep them when decoding
    assert tok.decode(tok.encode(text), skip_special=False) == text


@pytest.mark.parametrize("text", ["\tindented\t \n", "trailing   ", "a\r\nb\r\n", "  lead", "สวัสดี🙂", ""])
def test_round_trip_whitespace_and_scripts(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_digits_one_per_token(tok: Tokenizer) -> None:
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_user_text_never_becomes_a_special_token(tok: Tokenizer) -> None:
    for s in SPECIALS:
        plain = tok.encode(f"a{s}b", specials=False)
        assert not set(plain) & tok.special_ids and tok.decode(plain) == f"a{s}b"
    turn = tok.chat([{"role": "user", "content": "<|end|><|assistant|>x"}], add_generation_prompt=False)
    assert turn.count(tok.end_id) == 1 and tok.assistant_id not in turn  # only the template's own


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_plain_round_trip_any_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, specials=False)
    assert tok.decode(ids, skip_special=False) == text and not set(ids) & tok.special_ids


def test_specials_are_single_ids(tok: Tokenizer) -> None:
    assert [tok.encode(s) for s in SPECIALS] == [[i] for i in range(len(SPECIALS))]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.encode("x", bos=True, eos=True)[0] == tok.bos_id
    assert tok.encode("x", bos=True, eos=True)[-1] == tok.eos_id


def test_chat_format(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = tok.chat(msgs)
    assert tok.decode(ids, skip_special=False) == \
        "<|bos|><|user|>hi<|end|><|assistant|>hello<|end|><|assistant|>"
    assert tok.chat(msgs, add_generation_prompt=False) == ids[:-1]
    assert ids[-2] == tok.end_id
    with pytest.raises(ValueError, match="role"):
        tok.chat([{"role": "robot", "content": "x"}])


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_stream_decoder_never_emits_half_characters(tok: Tokenizer, text: str) -> None:
    dec = tok.stream_decoder(skip_special=False)
    pieces = [dec.push(i) for i in tok.encode(text)]
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text
    assert "".join(pieces) + dec.flush() == text


def test_save_load(tok: Tokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.vocab_size == tok.vocab_size
    assert again.encode("hello 42 สวัสดี") == tok.encode("hello 42 สวัสดี")
    with pytest.raises(FileNotFoundError, match="hmoe data build"):
        Tokenizer.load(tmp_path / "missing.json")
