"""The pure routing policy."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.domains import DEFAULT_EXPERT, DOMAINS, GROUP_OF
from router.policy import decide, default_decision

CONFIDENT = {"math": 0.9, "reasoning": 0.05, "conversation": 0.02, "knowledge": 0.02, "code": 0.01}
UNSURE = {"math": 0.4, "reasoning": 0.35, "conversation": 0.1, "knowledge": 0.1, "code": 0.05}


def test_confident_prompt_goes_to_one_expert():
    d = decide(CONFIDENT, threshold=0.5, top_k=2)
    assert (d.experts, d.weights, d.mode, d.group) == (("math",), (1.0,), "top1", "analytical")
    assert d.expert == "math"


def test_unsure_prompt_gets_renormalised_top_k():
    d = decide(UNSURE, threshold=0.5, top_k=2)
    assert d.mode == "ensemble" and d.experts == ("math", "reasoning")
    assert d.weights == pytest.approx((0.4 / 0.75, 0.35 / 0.75))
    d3 = decide(UNSURE, threshold=0.5, top_k=3)
    assert d3.experts == ("math", "reasoning", "conversation") and sum(d3.weights) == pytest.approx(1.0)


def test_threshold_boundaries():
    assert decide(UNSURE, threshold=0.4).mode == "top1"  # p >= threshold
    assert decide(UNSURE, threshold=0.41).mode == "ensemble"
    assert decide(CONFIDENT, threshold=1.0).mode == "ensemble"
    assert decide(UNSURE, threshold=0.0).mode == "top1"
    assert decide(UNSURE, threshold=0.9, top_k=1).experts == ("math",)


def test_deterministic_with_ties_broken_by_domain_order():
    tie = dict.fromkeys(DOMAINS, 0.2)
    results = [decide(tie, threshold=0.5, top_k=2) for _ in range(5)]
    assert all(r == results[0] for r in results)
    assert results[0].experts == ("math", "reasoning") and results[0].weights == (0.5, 0.5)


def test_zero_probability_experts_are_not_ensembled():
    d = decide({"code": 0.3}, threshold=1.0, top_k=3)  # normalised to code = 1.0 < threshold
    assert d.experts == ("code",) and d.mode == "top1"


def test_empty_goes_to_default_expert():
    for d in (decide({}), default_decision()):
        assert d.experts == (DEFAULT_EXPERT,) and d.mode == "default"
        assert d.group == GROUP_OF[DEFAULT_EXPERT] and d.expert_probs[DEFAULT_EXPERT] == 1.0


@pytest.mark.parametrize("kw,match", [({"threshold": 1.5}, "threshold"), ({"threshold": -0.1}, "threshold"),
                                      ({"top_k": 0}, "top_k"), ({"top_k": 6}, "top_k")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        decide(CONFIDENT, **kw)


@pytest.mark.parametrize("probs,match", [({"poetry": 1.0}, "unknown expert"), ({"math": -1.0}, ">= 0"),
                                         ({"math": 0.0}, "sum"), ({"math": math.nan}, "finite")])
def test_bad_probabilities(probs, match):
    with pytest.raises(ValueError, match=match):
        decide(probs)


@given(st.lists(st.floats(0.001, 1.0), min_size=5, max_size=5), st.floats(0.0, 1.0), st.integers(1, 5))
def test_decision_invariants(values, threshold, top_k):
    d = decide(dict(zip(DOMAINS, values)), threshold=threshold, top_k=top_k)
    assert sum(d.weights) == pytest.approx(1.0)
    assert sum(d.expert_probs.values()) == pytest.approx(1.0)
    assert sum(d.group_probs.values()) == pytest.approx(1.0)
    assert 1 <= len(d.experts) <= top_k and len(set(d.experts)) == len(d.experts)
    assert d.expert_probs[d.experts[0]] == max(d.expert_probs.values())
    assert list(d.weights) == sorted(d.weights, reverse=True)
    assert (d.mode == "top1") == (len(d.experts) == 1)
