"""RouterModel: hierarchical probabilities, masking, config validation."""

from __future__ import annotations

import pytest
import torch

from router.domains import DOMAINS, GROUP_NAMES, GROUP_OF, GROUPS
from router.model import RouterConfig, RouterModel, collate, encode_prompt, fold_caps, hierarchical_log_probs


def _model(**kw) -> RouterModel:
    torch.manual_seed(0)
    return RouterModel(RouterConfig.preset("tiny", **kw)).eval()


def test_hierarchical_probs_sum_to_one_and_match_group_sums():
    g_logits, e_logits = torch.randn(16, 3) * 4, torch.randn(16, 5) * 4
    g_logp, e_logp = hierarchical_log_probs(g_logits, e_logits)
    g, e = g_logp.exp(), e_logp.exp()
    torch.testing.assert_close(e.sum(-1), torch.ones(16))
    for gi, name in enumerate(GROUP_NAMES):
        members = [DOMAINS.index(d) for d in GROUPS[name]]
        torch.testing.assert_close(e[:, members].sum(-1), g[:, gi])  # P(group) = sum of its experts
        # P(expert | group) is the softmax of the expert logits restricted to the group
        torch.testing.assert_close(e[:, members] / g[:, gi:gi + 1], torch.softmax(e_logits[:, members], -1))


def test_temperature_keeps_argmax_and_flattens():
    g_logits, e_logits = torch.randn(8, 3) * 5, torch.randn(8, 5) * 5
    _, cold = hierarchical_log_probs(g_logits, e_logits, 1.0)
    _, warm = hierarchical_log_probs(g_logits, e_logits, 3.0)
    assert (warm.exp().max(-1).values <= cold.exp().max(-1).values + 1e-6).all()
    _, huge = hierarchical_log_probs(g_logits, e_logits, 1e6)
    # at T -> inf: groups uniform, experts uniform within their group
    expected = torch.tensor([1 / 3 / len(GROUPS[GROUP_OF[d]]) for d in DOMAINS])
    torch.testing.assert_close(huge.exp(), expected.expand(8, 5), atol=1e-4, rtol=0)


def test_model_probs_and_padding_invariance():
    m = _model()
    seqs = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16]]
    tokens, mask = collate(seqs, 64)
    g, e = m.probs(tokens, mask)
    assert g.shape == (3, 3) and e.shape == (3, 5)
    torch.testing.assert_close(e.sum(-1), torch.ones(3))
    for i, s in enumerate(seqs):  # a prompt alone == the same prompt padded in a batch
        _, e1 = m.probs(torch.tensor([s]))
        torch.testing.assert_close(e1[0], e[i])


def test_reads_only_first_max_len_tokens():
    m = _model(max_len=8)
    a = torch.arange(1, 21)[None]
    b = torch.cat([torch.arange(1, 9), torch.full((12,), 300)])[None]
    torch.testing.assert_close(m.probs(a)[1], m.probs(b)[1])


def test_bigrams_can_be_disabled():
    m = _model(n_bigram_buckets=0)
    _, e = m.probs(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(e.sum(-1), torch.ones(1))


@pytest.mark.parametrize("field,value", [("vocab_size", 0), ("d_embed", -1), ("dropout", 1.0),
                                         ("n_bigram_buckets", -5), ("max_len", 0)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RouterConfig\.{field}="):
        RouterConfig(**{field: value})


def test_config_round_trip_and_unknown_fields():
    cfg = RouterConfig.preset("tiny", hidden=32)
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg and cfg.fold_caps
    assert RouterConfig.from_dict(cfg.replace(fold_caps=False).to_dict()) == cfg.replace(fold_caps=False)
    old = {k: v for k, v in cfg.to_dict().items() if k != "fold_caps"}  # saved before the field existed
    assert RouterConfig.from_dict(old) == cfg.replace(fold_caps=False)
    with pytest.raises(ValueError, match="unknown field"):
        RouterConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown router preset"):
        RouterConfig.preset("huge")


def test_fold_caps_lowers_only_prompts_typed_in_capitals():
    assert fold_caps("DO YOU PLAY SOCCER") == "do you play soccer"
    assert fold_caps("I PLAY Cricket") == "i play cricket"  # most words in capitals
    for kept in ("what does HTTP mean", "NASA was founded in 1958", "def f(x):\n    return x", "", "42 + 7",
                 "Is the USA bigger than Canada?"):
        assert fold_caps(kept) == kept


class _Chars:
    """A tokenizer with one id per character, so that case shows in the ids."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 512 for c in text]


def test_encode_prompt_folds_as_configured_and_truncates():
    cfg = RouterConfig.preset("tiny", max_len=8)
    assert encode_prompt(_Chars(), "HELLO THERE", cfg) == _Chars().encode("hello th")
    assert encode_prompt(_Chars(), "HELLO THERE", cfg.replace(fold_caps=False)) == _Chars().encode("HELLO TH")
