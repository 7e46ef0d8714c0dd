"""serving.engine_worker and engine_loop: continuous batching for asyncio callers, without Ray."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import torch

from experts.config import ModelConfig
from experts.generate import Engine
from experts.model import Transformer
from experts.sampling import SamplingParams
from serving.engine_worker import EngineWorker


def _worker(max_batch: int) -> EngineWorker:
    torch.manual_seed(0)
    return EngineWorker(Engine(Transformer(ModelConfig.preset("tiny")).eval(), max_batch=max_batch))


def test_worker_batches_concurrent_requests_and_queues_beyond_slots():
    async def run():
        w = _worker(4)

        async def one(i):
            toks = []
            async for chunk in w.generate([1, 2, 3 + i], SamplingParams(temperature=0, max_new_tokens=10)):
                toks += chunk["tokens"]
            return toks

        outs = await asyncio.gather(*(one(i) for i in range(6)))
        await asyncio.wait_for(w.idle(), 10)  # the loop releases the last slots after they finish
        return w, outs

    w, outs = asyncio.run(run())
    assert all(len(o) == 10 for o in outs)
    assert w.stats.max_batch == 4  # batched, and never more than the slots
    assert w.engine.free_slots == 4
    st = w.stats.to_dict()  # every step is timed: wall >= the engine thread's CPU > 0
    assert st["tokens"] == 60 and st["steps"] >= 60 / 4
    assert st["step_s"] > 0 and 0 < st["step_cpu_s"] <= st["step_s"] * 1.05 + 0.01


def test_worker_greedy_matches_engine_alone():
    w = _worker(2)
    params = SamplingParams(temperature=0, max_new_tokens=8)

    async def run():
        return [t async for c in w.generate([1, 5, 9], params) for t in c["tokens"]]

    got = asyncio.run(run())
    e = Engine(w.engine.model, max_batch=1)
    slot, want = e.add([1, 5, 9], params), []
    while True:
        out = e.step()[slot]
        want.append(out.token)
        if out.finished:
            break
    assert got == want


def test_worker_collect_gives_one_chunk_with_the_streamed_tokens():
    w = _worker(2)
    params = SamplingParams(temperature=0, max_new_tokens=8)

    async def run():
        streamed = [t async for c in w.generate([1, 5, 9], params) for t in c["tokens"]]
        chunks = [c async for c in w.generate([1, 5, 9], params, collect=True)]
        return streamed, chunks

    streamed, chunks = asyncio.run(run())
    assert len(chunks) == 1 and chunks[0]["tokens"] == streamed and len(streamed) == 8
    assert chunks[0]["finish_reason"] == "length" and chunks[0]["timings"]["max_batch"] == 1


def test_worker_prefills_waiting_requests_together():
    """Requests that wait while the engine is busy join in ONE padded prefill, and decode as solo."""
    w = _worker(4)
    params = SamplingParams(temperature=0, max_new_tokens=5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [10], [11, 12]]

    async def run():
        gate, blocked = await _hold_engine(w)
        tasks = [asyncio.ensure_future(_collect(w, p, params)) for p in prompts]
        await asyncio.sleep(0.05)  # all four are posted while the engine thread is held
        gate.set()
        await blocked
        return await asyncio.gather(*tasks)

    got = asyncio.run(run())
    assert (w.stats.prefills, w.stats.prefilled) == (2, 4)  # lengths 1, 2, 3 together; 9 alone (padding)
    solo = _worker(1)
    want = [[t for c in [asyncio.run(_collect(solo, p, params))] for t in c] for p in prompts]
    assert got == want


def test_a_failed_prefill_fails_only_its_newcomers():
    """A running stream survives a newcomer's failed prefill; every newcomer gets the error (none is
    left waiting), no slot leaks, and the worker goes on serving."""
    w = _worker(5)  # the running stream's slot + four newcomers
    params = SamplingParams(temperature=0, max_new_tokens=3)
    real, calls = w.engine.add_checked, []

    def fail_second(prompts, ps, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(prompts, ps, **kw)

    w.engine.add_checked = fail_second

    async def run():
        running = asyncio.ensure_future(_collect(w, [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=40)))
        while not w.stats.steps:  # it is admitted and decoding
            await asyncio.sleep(0.001)
        gate, blocked = await _hold_engine(w)
        newcomers = [asyncio.ensure_future(_collect(w, p, params))
                     for p in ([1, 2], [3, 4], list(range(1, 12)), [5, 6, 7])]  # two prefill groups
        await asyncio.sleep(0.05)
        gate.set()
        await blocked
        failed = await asyncio.wait_for(asyncio.gather(*newcomers, return_exceptions=True), 10)
        return failed, await running, await _collect(w, [9, 9], params)

    failed, running, after = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) and "device lost" in str(r) for r in failed)
    assert len(running) == 40 and len(after) == 3
    assert w.engine.free_slots == 5


def test_worker_answers_ids_that_are_not_ints_with_a_value_error():
    w = _worker(2)
    params = SamplingParams(temperature=0, max_new_tokens=3)

    async def run():
        return await asyncio.wait_for(asyncio.gather(_collect(w, [None, 3], params), _collect(w, [1, 2], params),
                                                     return_exceptions=True), 10)

    bad, good = asyncio.run(run())
    assert isinstance(bad, ValueError) and "invalid prompt ids" in str(bad)
    assert len(good) == 3


async def _hold_engine(w: EngineWorker) -> tuple[Any, asyncio.Future]:
    """Hold the engine thread inside a command until ``gate.set()``: requests posted meanwhile
    are all admitted in its next iteration."""
    entered, gate = threading.Event(), threading.Event()
    blocked = asyncio.ensure_future(w._call(lambda: entered.set() or gate.wait()))
    while not entered.is_set():
        await asyncio.sleep(0.001)
    return gate, blocked


async def _collect(w: EngineWorker, prompt: list[int], params: SamplingParams) -> list[int]:
    return [t async for c in w.generate(prompt, params) for t in c["tokens"]]


def test_prefill_groups_bound_the_padding():
    from serving.engine_loop import prefill_groups

    assert prefill_groups([5, 5, 5, 5]) == [[0, 1, 2, 3]]
    assert prefill_groups([100, 3, 4, 5]) == [[1, 2, 3], [0]]  # the long prompt is not padded to
    groups = prefill_groups([7, 1, 30, 2, 9, 64, 8, 3])
    assert sorted(i for g in groups for i in g) == list(range(8))
    lengths = [7, 1, 30, 2, 9, 64, 8, 3]
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 2.0 * sum(lengths[i] for i in g)


def test_worker_cancel_frees_slot():
    async def run():
        w = _worker(2)
        gen = w.generate([1, 2], SamplingParams(max_new_tokens=100))
        await gen.__anext__()
        await gen.aclose()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if w.engine.free_slots == 2:
                break
        return w

    assert asyncio.run(run()).engine.free_slots == 2


def test_worker_rejects_bad_prompt_without_dying():
    async def run():
        w = _worker(2)
        with pytest.raises(ValueError):
            async for _ in w.generate([10**6], SamplingParams(max_new_tokens=2)):
                pass
        return [t async for c in w.generate([1, 2], SamplingParams(max_new_tokens=3)) for t in c["tokens"]]

    assert len(asyncio.run(run())) == 3
