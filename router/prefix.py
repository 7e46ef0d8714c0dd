"""The routing prefix: the opening tokens of a document from which the router chooses its expert.

One definition for training and evaluation. The router is trained on the decoded first
``ROUTING_PREFIX_TOKENS`` tokens of training documents, and the report routes each test document
from the same tokens of its own. Those tokens are never scored: every row of the report (each
expert, the generalists, the routed rows) is scored only on the tokens that follow the prefix,
so a routed row is not credited with predicting text it has already read.

A scored document is ``<|bos|> t_1 ... t_n <|eos|>``; the prefix is ``t_1 .. t_K`` and the scored
targets are ``t_{K+1} .. <|eos|>``, each predicted from all the ids before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# K: long enough to tell the domains apart (a chat turn, a code file's first line, a factbook title),
# short enough that short documents keep tokens to score. On the quick test split, K = 12 leaves a
# token to score in >= 94% of the documents of every domain (K = 16: 56% of the conversations,
# whose ALICE one-liners are ~18 ids long) and scores 68-97% of each domain's tokens.
ROUTING_PREFIX_TOKENS = 12


def unscored(k: int = ROUTING_PREFIX_TOKENS) -> int:
    """How many leading ids of a ``<|bos|>``-led document are context only: ``<|bos|>`` and the prefix."""
    return 1 + k


def scored_targets(n_ids: int, k: int = ROUTING_PREFIX_TOKENS) -> int:
    """The number of scored targets of a document of ``n_ids`` ids (``<|bos|>`` included)."""
    return max(0, n_ids - unscored(k))


def prefix_ids(ids: Sequence[int], k: int = ROUTING_PREFIX_TOKENS) -> list[int]:
    """The prefix of a ``<|bos|>``-led document: its text ids ``1 .. k``."""
    return list(ids[1:unscored(k)])


def prefix_text(tokenizer: Any, text: str, k: int = ROUTING_PREFIX_TOKENS) -> str:
    """The opening the router reads for ``text``: the decoded first ``k`` tokens of its encoding.

    Only a head of the text is encoded, grown until it yields more than ``k`` tokens, so that the
    cut cannot change the first ``k`` and a long file costs no more than its opening.
    """
    chars = 8 * k
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > k + 4 or chars >= len(text):
            return tokenizer.decode(ids[:k], skip_special=False)  # a chat turn keeps its marker
        chars *= 4
