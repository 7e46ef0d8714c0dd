"""Sampling: pure, seeded, and strict about its parameters."""

from __future__ import annotations

import pytest
import torch

from experts.sampling import (SamplingParams, apply_frequency_penalty, apply_repetition_penalty, make_generator, sample,
                              top_k_filter, top_p_filter)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", -1), ("repetition_penalty", 0.0),
                                         ("max_new_tokens", -1)])
def test_bad_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_are_frozen_and_keyword_only():
    p = SamplingParams(stop_ids=[3, 4])
    assert p.stop_ids == (3, 4)
    with pytest.raises(Exception):
        p.temperature = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # type: ignore[misc]


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample(logits, SamplingParams(temperature=0)) == 1


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.zeros(1000)
    p = SamplingParams(temperature=1.0)

    def draw(seed):
        g = make_generator(seed)
        return [sample(logits, p, g) for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 1e-6)).tolist() == [True, False, False, False]
    g = make_generator(0)
    assert {sample(logits, SamplingParams(top_k=1), g) for _ in range(20)} == {0}


def test_repetition_penalty_is_ctrl_style():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # pure: input untouched
    assert sample(torch.tensor([2.0, 1.5]), SamplingParams(temperature=0, repetition_penalty=2.0), seen=[0]) == 1


def test_frequency_and_presence_penalties_are_openais_over_the_reply():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0])
    out = apply_frequency_penalty(logits, [0, 0, 1], frequency=0.5, presence=0.25)
    assert out.tolist() == [2.0 - 1.0 - 0.25, 1.0 - 0.5 - 0.25, 0.5, 0.0]
    assert logits.tolist() == [2.0, 1.0, 0.5, 0.0]  # pure
    greedy = SamplingParams(temperature=0, frequency_penalty=1.0)
    assert greedy.penalised and not SamplingParams(temperature=0).penalised
    # the prompt's ids (seen) do not count: only the generated ones
    assert sample(logits, greedy, seen=[0, 0, 0]) == 0 and sample(logits, greedy, generated=[0, 0]) == 1
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)
