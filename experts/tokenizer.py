"""Byte-level BPE tokenizer (HF ``tokenizers``) with digits split one per token and chat specials.

No normalizer and no stripping: ``decode(encode(text)) == text`` for any Unicode string, including
tabs, trailing spaces and ``\\r\\n``. Chat turns are ``<|role|>content<|end|>`` after one ``<|bos|>``.

Pre-tokenization (:data:`SPLIT_PATTERN`, then one piece per digit, then byte-level) differs from
GPT-2's regex in ways measured on the hmoe corpora (chars/token, vocab 8192):

* every digit is its own piece and never carries a space; a single space *before* a number is
  attached to the preceding word or punctuation (``"x = 12"`` -> ``x``, `` = ``, ``1``, ``2``)
  instead of being a lone token, so digit tokens stay identical wherever a number appears;
* a word may carry one leading punctuation character (``.append``, ``_name``, ``(self``);
* punctuation runs keep their trailing newlines (``):\\n``); other newline runs keep the
  indentation that follows them. Runs of spaces and tabs stay together except their last space,
  which goes to the next word (7 spaces + `` self``).
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from experts.atomic import atomic_write_text

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# ``Tokenizer.chat`` as a Jinja chat template, for clients that render it themselves (transformers'
# ``apply_chat_template`` on an export, lm-evaluation-harness through ``GET /tokenizer_info``)
CHAT_TEMPLATE = (BOS + "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}" + END + "{% endfor %}"
                 "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")


SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions
    r"|[^\r\n\p{L}\p{N}]?\p{L}+(?: (?=\p{N}))?"  # a word, one leading non-letter, a space before a number
    r"|\p{N}"  # one digit (or other numeral) per piece
    r"| ?[^\s\p{L}\p{N}]+(?:[\r\n]+| (?=\p{N}))?"  # punctuation + trailing newlines or space before a number
    r"|\s*[\r\n][^\S\r\n]*(?![^\S\r\n]\S)"  # newlines + indentation (its last space goes to the word)
    r"|\s+(?!\S)|\s+"  # other whitespace runs
)


def _backend() -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE())
    # The Split pieces partition the text (behavior "isolated"), so the round trip stays lossless.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A thin wrapper over a trained HF tokenizer with the hmoe special tokens."""

    def __init__(self, backend: _HFTokenizer) -> None:
        self._tok = backend
        ids = [backend.token_to_id(s) for s in SPECIALS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks special tokens; expected all of {SPECIALS}")
        self.pad_id, self.bos_id, self.eos_id, self.system_id, self.user_id, self.assistant_id, \
            self.end_id = ids
        self.special_ids = frozenset(ids)

    @functools.cached_property
    def _plain(self) -> _HFTokenizer:
        """The backend for user text: a special token's spelling is text like any other (only
        markup makes specials). Built on first use: only the server encodes user text."""
        plain = _HFTokenizer.from_str(self._tok.to_str())
        plain.encode_special_tokens = True
        return plain

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2) -> "Tokenizer":
        """Train a byte-level BPE on ``texts`` (specials get ids 0..6)."""
        if vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"vocab_size={vocab_size} is too small: need >= {256 + len(SPECIALS)}")
        tok = _backend()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a ``tokenizer.json`` written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file; build the corpora first (hmoe data build)")
        return cls(_HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically."""
        atomic_write_text(path, self._tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, specials: bool = True) -> list[int]:
        """Token ids of ``text``. With ``specials`` (corpus markup) a special token's spelling inside
        ``text`` maps to its single id; without it (what a user typed) it is encoded as plain text,
        so that only the server's chat template can insert a special token."""
        ids = (self._tok if specials else self._plain).encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (specials: their UTF-8 spelling)."""
        if token_id in self.special_ids:
            return self._tok.id_to_token(token_id).encode("utf-8")
        return bytes(_BYTE_DECODER[c] for c in self._tok.id_to_token(token_id))

    def chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """``<|bos|><|role|>content<|end|>...`` and, optionally, a trailing ``<|assistant|>``."""
        return self.chat_batch([messages], add_generation_prompt=add_generation_prompt)[0]

    def chat_batch(self, conversations: Sequence[Sequence[dict[str, str]]], *,
                   add_generation_prompt: bool = False) -> list[list[int]]:
        """:meth:`chat` of many conversations, their contents encoded in one batch."""
        roles = []
        for messages in conversations:
            for m in messages:
                if m.get("role") not in ROLES:
                    raise ValueError(f"unknown chat role {m.get('role')!r}; use one of {sorted(ROLES)}")
                roles.append(self._tok.token_to_id(ROLES[m["role"]]))
        contents = [m.get("content", "") for messages in conversations for m in messages]
        encoded = iter(e.ids for e in self._plain.encode_batch(contents, add_special_tokens=False))
        role_ids, out = iter(roles), []
        for messages in conversations:
            ids = [self.bos_id]
            for _ in messages:
                ids += [next(role_ids), *next(encoded), self.end_id]
            out.append(ids + ([self.assistant_id] if add_generation_prompt else []))
        return out

    def stream_decoder(self, *, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class StreamDecoder:
    """Incremental detokenisation: ``push(id)`` returns only complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self.tok = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text that is now complete (possibly empty)."""
        if token_id in self.tok.special_ids and self.skip_special:
            return ""
        return self._utf8.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        """Return any buffered bytes (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
