"""serving.textstream: streamed text across token chunks, UTF-8 and stop strings."""

from __future__ import annotations

from serving.testing import TEXTS
from serving.textstream import TextAssembler


def test_text_assembler_stop_across_chunks_and_utf8():
    from experts.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXTS, vocab_size=300, min_frequency=1)
    text = "café 東京 and then STOP here"
    ids = tok.encode(text)
    asm = TextAssembler(tok, ["STOP"])
    out = "".join(asm.push([i]) for i in ids) + asm.finish()
    assert out == "café 東京 and then " and asm.stopped
    asm = TextAssembler(tok)
    assert "".join(asm.push([i]) for i in ids) + asm.finish() == text
