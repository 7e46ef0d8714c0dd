"""serving.orchestrate: when an expert that has not answered counts as down."""

from __future__ import annotations

import pytest


def test_a_one_message_answer_may_take_its_whole_generation_before_the_expert_counts_as_down():
    from serving.orchestrate import Job, first_answer_deadline_s

    def job(stream: bool, stops: list[str]) -> Job:
        return Job([1, 2], 1, "hi", "auto", "top1", 200, {}, stops, stream)

    assert first_answer_deadline_s(5.0, job(False, []), 1) == pytest.approx(25.0)  # + 0.1 s x 200 tokens
    assert first_answer_deadline_s(5.0, job(True, []), 1) == 5.0  # streamed: the first token is due soon
    assert first_answer_deadline_s(5.0, job(False, ["\n"]), 1) == 5.0  # stop strings: streamed inside
    assert first_answer_deadline_s(5.0, job(False, []), 2) == 5.0  # ensemble: token by token
