"""serving.orchestrate: when an expert counts as down; how a long prompt is cut to fit."""

from __future__ import annotations

import pytest

from serving.orchestrate import fit_prompt


def test_a_one_message_answer_may_take_its_whole_generation_before_the_expert_counts_as_down():
    from serving.orchestrate import Job, first_answer_deadline_s

    def job(stream: bool, stops: list[str]) -> Job:
        return Job([1, 2], 1, "hi", "auto", "top1", 200, {}, stops, stream)

    assert first_answer_deadline_s(5.0, job(False, []), 1) == pytest.approx(25.0)  # + 0.1 s x 200 tokens
    assert first_answer_deadline_s(5.0, job(True, []), 1) == 5.0  # streamed: the first token is due soon
    assert first_answer_deadline_s(5.0, job(False, ["\n"]), 1) == 5.0  # stop strings: streamed inside
    assert first_answer_deadline_s(5.0, job(False, []), 2) == 5.0  # ensemble: token by token


def test_fit_prompt_cuts_from_the_left_and_keeps_the_markers():
    ids = list(range(100))
    assert fit_prompt(ids, 128, truncate=-1, want=16) == (ids, False)  # fits: unchanged
    assert fit_prompt(ids, 64, truncate=None, want=16) == (ids, False)  # the caller refuses it
    kept, cut = fit_prompt(ids, 64, truncate=-1, want=16, head=1)
    assert cut and kept == [0, *range(53, 100)] and len(kept) == 64 - 16
    kept, cut = fit_prompt(ids, 64, truncate=-1, want=1000, head=1)  # the prompt keeps half the context
    assert cut and len(kept) == 32 and kept[0] == 0 and kept[-1] == 99
    kept, cut = fit_prompt(ids, 64, truncate=-1, want=8, head=2, tail=2)  # a chat turn: bos, user ... end, asst
    assert cut and kept[:2] == [0, 1] and kept[-2:] == [98, 99] and kept[2] == 98 - (56 - 4) and len(kept) == 56
    kept, cut = fit_prompt(ids, 512, truncate=10, want=8, head=1)  # vLLM's N: the last N (bos first)
    assert cut and kept == [0, *range(91, 100)]
    assert fit_prompt(ids[:5], 512, truncate=10, want=8) == (ids[:5], False)
