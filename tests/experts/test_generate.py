"""Generation: cache vs no-cache parity, determinism, continuous batching, external choice, score."""

from __future__ import annotations

import pytest
import torch

from experts.config import ModelConfig
from experts.generate import Engine, generate
from experts.model import Transformer
from experts.sampling import SamplingParams

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


def _model(preset: str = "tiny", **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(preset, **kw)).eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=12),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.3, max_new_tokens=12, seed=7),
    SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=0.5, max_new_tokens=12),
])
def test_cache_and_no_cache_generate_the_same_tokens(preset, params):
    model = _model(preset)
    with_cache = list(generate(model, PROMPTS, params))
    without = list(generate(model, PROMPTS, params, use_cache=False))
    assert with_cache == without and len(with_cache) == 12


def test_greedy_is_deterministic_and_seeded_sampling_reproducible():
    model = _model()
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    assert list(generate(model, PROMPTS, greedy)) == list(generate(model, PROMPTS, greedy))
    a = list(generate(model, PROMPTS, SamplingParams(max_new_tokens=16, seed=1)))
    b = list(generate(model, PROMPTS, SamplingParams(max_new_tokens=16, seed=1)))
    c = list(generate(model, PROMPTS, SamplingParams(max_new_tokens=16, seed=2)))
    assert a == b and a != c


def test_stop_ids_and_finish_reasons():
    model = _model()
    first = next(generate(model, [[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=5)))[0]
    engine = Engine(model, max_batch=2)
    s_stop = engine.add([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5, stop_ids=(first,)))
    s_len = engine.add([4, 5], SamplingParams(temperature=0, max_new_tokens=2))
    out = engine.step()
    assert out[s_stop].token == first and out[s_stop].finish_reason == "stop" and out[s_stop].finished
    assert out[s_len].finish_reason is None
    out = engine.step()
    assert s_stop not in out and out[s_len].finish_reason == "length"
    assert not engine.has_work


def test_context_full_finishes_with_length():
    model = _model(max_seq_len=8)
    steps = list(generate(model, [[1, 2, 3, 4, 5, 6]], SamplingParams(temperature=0, max_new_tokens=50)))
    assert len(steps) == 3  # tokens 7 and 8 fill the context, token 9 is sampled from position 8


def test_continuous_batching_matches_solo_runs():
    """A request joining mid-flight, in another slot, gets the same tokens as when run alone."""
    model = _model()
    p = SamplingParams(temperature=0, max_new_tokens=6)
    solo = [[t[0] for t in generate(model, [pr], p)] for pr in PROMPTS[:2]]
    engine = Engine(model, max_batch=3)
    a = engine.add(PROMPTS[0], p)
    got = {a: [engine.step()[a].token, engine.step()[a].token]}
    b = engine.add(PROMPTS[1], p)
    got[b] = []
    while engine.has_work:
        for slot, out in engine.step().items():
            got[slot].append(out.token)
    assert got[a] == solo[0] and got[b] == solo[1]
    engine.release(a)
    assert engine.free_slots == 2


def test_external_choice_mode_feed_and_logprobs():
    model = _model()
    engine = Engine(model, max_batch=2)
    slot = engine.add(PROMPTS[1], SamplingParams(max_new_tokens=3), external=True)
    assert engine.step() == {}  # step() leaves external slots alone
    lp = engine.logprobs_next(slot)
    assert lp.shape == (512,) and abs(lp.exp().sum().item() - 1) < 1e-4
    tok = int(lp.argmax())
    out = engine.feed(slot, tok)
    assert out.token == tok and out.logprob == pytest.approx(lp[tok].item(), abs=1e-6)
    # the next distribution equals a full forward over prompt + fed token
    full = torch.log_softmax(model(torch.tensor([PROMPTS[1] + [tok]])).logits[0, -1], -1)
    torch.testing.assert_close(engine.logprobs_next(slot), full, atol=1e-5, rtol=0)
    engine.feed(slot, 0)
    assert engine.feed(slot, 0).finish_reason == "length"
    with pytest.raises(ValueError, match="finished"):
        engine.feed(slot, 0)


def test_score_matches_full_forward():
    model = _model()
    ids = [5, 9, 2, 7]
    scores = Engine(model, max_batch=1).score(ids)
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    assert scores[0] is None and len(scores) == len(ids)
    for t in range(1, 4):
        assert scores[t] == pytest.approx(logp[t - 1, ids[t]].item(), abs=1e-5)


def test_bad_prompts_raise_clear_value_errors():
    model = _model(max_seq_len=16)
    p = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="17 tokens.*max_seq_len"):
        next(generate(model, [list(range(17))], p))
    with pytest.raises(ValueError, match="empty"):
        Engine(model, max_batch=1).add([], p)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, max_batch=1).add([10_000], p)
    engine = Engine(model, max_batch=1)
    engine.add([1], p)
    with pytest.raises(RuntimeError, match="busy"):
        engine.add([1], p)


def test_zero_new_tokens_yields_nothing():
    model = _model()
    p = SamplingParams(max_new_tokens=0)
    assert list(generate(model, PROMPTS, p)) == [] == list(generate(model, PROMPTS, p, use_cache=False))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=6),
    SamplingParams(temperature=0, repetition_penalty=1.5, max_new_tokens=6),
    SamplingParams(temperature=0, frequency_penalty=2.0, max_new_tokens=6),
    SamplingParams(temperature=0.8, top_k=20, max_new_tokens=6, seed=3),
])
def test_step_tokens_and_logprobs_agree_with_a_full_forward(params):
    """The batched argmax / logsumexp of a decode step give the same ids and log-probs as per-row maths."""
    model = _model()
    engine = Engine(model, max_batch=3)
    slots = [engine.add(p, params) for p in PROMPTS]
    seqs = {s: list(p) for s, p in zip(slots, PROMPTS)}
    while engine.has_work:
        for slot, out in engine.step().items():
            with torch.inference_mode():
                logp = torch.log_softmax(model(torch.tensor([seqs[slot]])).logits[0, -1], dim=-1)
            if params.greedy and params.repetition_penalty == 1.0:  # the frequency penalty counts the reply
                counts = torch.bincount(torch.tensor(seqs[slot][len(PROMPTS[slots.index(slot)]):], dtype=torch.long),
                                        minlength=logp.shape[-1])
                assert out.token == int((logp - params.frequency_penalty * counts).argmax())
            assert out.logprob == pytest.approx(logp[out.token].item(), abs=1e-5)
            seqs[slot].append(out.token)


def test_engine_without_logprobs_gives_the_same_tokens():
    model = _model()
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=5)
    runs = []
    for logprobs in (True, False):
        engine = Engine(model, max_batch=3, logprobs=logprobs)
        for p in PROMPTS:
            engine.add(p, params)
        outs = []
        while engine.has_work:
            outs += [out for _, out in sorted(engine.step().items())]
        runs.append(outs)
    with_lp, without = runs
    assert [o.token for o in with_lp] == [o.token for o in without] and len(with_lp) == 24
    assert all(o.logprob is not None for o in with_lp) and all(o.logprob is None for o in without)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_one_padded_prefill_equals_separate_prefills(preset):
    """add_many (ragged prompts, one right-padded forward) gives each row the logits of a solo prefill."""
    model = _model(preset)
    params = [SamplingParams(temperature=0, max_new_tokens=6)] * len(PROMPTS)
    solo = Engine(model, max_batch=len(PROMPTS))
    solo_slots = [solo.add(p, params[0]) for p in PROMPTS]
    many = Engine(model, max_batch=len(PROMPTS) + 1)
    many.add([42, 43], params[0])  # a running slot first: the newcomers land after it
    slots = many.add_many(PROMPTS, params)
    for a, b, prompt in zip(solo_slots, slots, PROMPTS):
        assert many.cache.lengths[b] == len(prompt)
        torch.testing.assert_close(many._requests[b].next_logits, solo._requests[a].next_logits,
                                   rtol=1e-4, atol=1e-4)
    steps_solo = [solo.step() for _ in range(6)]
    steps_many = [many.step() for _ in range(6)]
    assert [[o[s].token for s in solo_slots] for o in steps_solo] == \
        [[o[s].token for s in slots] for o in steps_many]


def test_add_many_refuses_more_prompts_than_free_slots():
    engine = Engine(_model(), max_batch=2)
    with pytest.raises(RuntimeError, match="3 prompts but 0 of the 2 slots are busy"):
        engine.add_many(PROMPTS, [SamplingParams(max_new_tokens=2)] * 3)
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        engine.add_many(PROMPTS[:2], [SamplingParams(max_new_tokens=2)])


def test_a_failed_prefill_holds_no_slots(monkeypatch):
    engine = Engine(_model(), max_batch=3)
    engine.add([7, 8], SamplingParams(max_new_tokens=2))

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.model, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.add_many(PROMPTS[:2], [SamplingParams(max_new_tokens=2)] * 2)
    assert engine.free_slots == 2


def test_a_bad_seed_in_add_many_holds_no_slots():
    engine = Engine(_model(), max_batch=3)
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        engine.add_many(PROMPTS[:2], [SamplingParams(max_new_tokens=2, seed=1),
                                      SamplingParams(max_new_tokens=2, seed=2**64)])
    assert engine.free_slots == 3
