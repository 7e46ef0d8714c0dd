"""Token ids -> text deltas: UTF-8-safe incremental decoding with stop strings held back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from experts.tokenizer import Tokenizer


class TextAssembler:
    """Turn streamed token ids into text deltas, cutting the text at the first stop string.

    The last ``len(longest stop) - 1`` characters are held back until they cannot begin a stop
    string, so a stop string is never half-emitted.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self._dec = tokenizer.stream_decoder()
        self._vocab = tokenizer.vocab_size  # a model may pad its vocabulary past the tokenizer's
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, ids: Iterable[int]) -> str:
        """Feed new ids; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._pending += "".join(self._dec.push(int(i)) for i in ids if 0 <= i < self._vocab)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        self._pending += self._dec.flush()
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending, self.stopped = self._pending[:min(hits)], "", True
            return out
        cut = len(self._pending) if final else max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out
