"""Temperature scaling and ECE."""

from __future__ import annotations

import pytest
import torch

from router.calibration import expected_calibration_error, expert_nll, fit_temperature
from router.model import hierarchical_log_probs


def _overconfident(n: int = 600, seed: int = 0):
    """Logits that are right ~70% of the time but scaled to near-certainty."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    noise = torch.randn(n, 5, generator=g)
    e_logits = noise + 2.0 * torch.nn.functional.one_hot(labels, 5)
    group_of = torch.tensor([0, 0, 1, 1, 2])
    g_logits = torch.randn(n, 3, generator=g) + 2.0 * torch.nn.functional.one_hot(group_of[labels], 3)
    return 8.0 * g_logits, 8.0 * e_logits, labels


def test_calibration_lowers_nll_of_overconfident_logits():
    g, e, y = _overconfident()
    t = fit_temperature(g, e, y)
    assert t > 2.0
    assert expert_nll(g, e, y, t) < 0.6 * expert_nll(g, e, y, 1.0)
    # and it lowers the held-out ECE too
    g2, e2, y2 = _overconfident(seed=1)

    def ece(temp):
        _, lp = hierarchical_log_probs(g2, e2, temp)
        conf, pred = lp.exp().max(-1)
        return expected_calibration_error(conf, pred == y2)

    assert ece(t) < 0.5 * ece(1.0)


def test_calibration_never_raises_nll_and_handles_empty():
    g, e, y = _overconfident()
    t = fit_temperature(g / 8.0, e / 8.0, y)
    assert expert_nll(g / 8, e / 8, y, t) <= expert_nll(g / 8, e / 8, y, 1.0) + 1e-6
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)) == 1.0


def test_ece_known_values():
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == 0.0
    assert expected_calibration_error(torch.tensor([0.9] * 10), torch.tensor([True] * 5 + [False] * 5)) \
        == pytest.approx(0.4)
    # two bins, each off by 0.1, weighted by their size
    conf = torch.tensor([0.25] * 4 + [0.95] * 4)
    correct = torch.tensor([True, False, False, False, True, True, True, True])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.0 + 0.5 * 0.05)
