"""The engine loop in a child process (``ProcessEngineWorker``): the same answers as the thread
transport, errors that cross the socket intact, and a child that never outlives its worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experts.checkpoint import CheckpointError
from experts.sampling import SamplingParams
from serving.engine_worker import EngineWorker, ProcessEngineWorker, load_engine
from serving.testing import make_tiny_run

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    run = make_tiny_run(tmp_path_factory.mktemp("run"), experts=["math"])
    return dict(ckpt_dir=str(run / "experts" / "math"), max_batch=4, torch_threads=1)


@pytest.fixture(scope="module")
def workers(spec):
    proc = ProcessEngineWorker(spec)
    yield proc, EngineWorker(load_engine(**spec))
    proc.close()


async def _collect(w, prompt, params=GREEDY) -> list[int]:
    return [t async for c in w.generate(prompt, params) for t in c["tokens"]]


def test_process_worker_matches_the_thread_worker_and_batches(workers):
    proc, thread = workers
    prompts = [[1, 2, 3 + i] for i in range(6)]  # 6 requests on 4 slots: batched, and queued

    async def run(w):
        before = (await w.stats_dict())["tokens"]
        outs = await asyncio.gather(*(_collect(w, p) for p in prompts))
        scored = await w.score([1, 2, 3, 4], 2)
        await asyncio.wait_for(w.idle(), 10)
        return outs, scored, await w.stats_dict(), before

    (p_outs, p_score, p_stats, p0), (t_outs, t_score, _, _) = asyncio.run(run(proc)), asyncio.run(run(thread))
    assert proc.config == thread.config and proc.config.vocab_size > 0  # the model the child loaded
    assert p_outs == t_outs and all(len(o) == 8 for o in p_outs)
    assert p_score == t_score and p_score["token_logprobs"][0] is None and len(p_score["top"][1]) == 2
    assert p_stats["tokens"] - p0 == 48 and p_stats["max_batch"] == 4  # never more than the slots


def test_process_worker_collect_and_sessions(workers):
    proc, thread = workers

    async def run(w):
        chunks = [c async for c in w.generate([1, 5, 9], GREEDY, collect=True)]
        sid = await w.open_session([1, 2, 3], GREEDY)
        lp = await w.session_logprobs(sid)
        fed = await w.session_feed(sid, int(np.argmax(lp)))
        await w.close_session(sid)
        return chunks, lp, fed

    (chunks, lp, fed), (_, t_lp, _) = asyncio.run(run(proc)), asyncio.run(run(thread))
    assert len(chunks) == 1 and len(chunks[0]["tokens"]) == 8 and chunks[0]["finish_reason"] == "length"
    assert chunks[0]["timings"]["max_batch"] >= 1 and chunks[0]["timings"]["decode_ms"] >= 0
    assert lp.dtype == np.float32 and lp.shape == t_lp.shape and np.allclose(lp, t_lp, atol=1e-5)
    assert np.isclose(np.exp(lp).sum(), 1.0, atol=1e-4) and fed["finished"] is False


def test_process_worker_errors_cross_the_socket(workers):
    proc, _ = workers

    async def run():
        bad = await asyncio.gather(_collect(proc, [None, 3]), _collect(proc, [1, 10**9]),
                                   proc._ask("load_state_dict"), return_exceptions=True)
        return bad, await _collect(proc, [1, 2])  # and it goes on serving

    (not_int, out_of_vocab, command), after = asyncio.run(run())
    assert isinstance(not_int, ValueError) and "invalid prompt ids" in str(not_int)
    assert isinstance(out_of_vocab, ValueError) and "outside the vocabulary" in str(out_of_vocab)
    assert isinstance(command, ValueError) and "not an engine command" in str(command)
    assert len(after) == 8


def test_process_worker_frees_the_slot_of_a_consumer_that_leaves(workers):
    proc, _ = workers

    async def run():
        before = (await proc.stats_dict())["tokens"]
        stream = proc.generate([1, 2], SamplingParams(temperature=0, max_new_tokens=10**6))
        first = await stream.__anext__()
        await stream.aclose()  # the caller went away after one chunk
        await asyncio.wait_for(proc.idle(), 10)
        decoded = (await proc.stats_dict())["tokens"] - before
        return first, decoded, await asyncio.gather(*(_collect(proc, [7, i]) for i in range(4)))

    first, decoded, outs = asyncio.run(run())
    assert first["tokens"] and first["finish_reason"] is None
    assert decoded < 100  # stopped early: left alone it decodes to the context's end (126 tokens)
    assert all(len(o) == 8 for o in outs)  # all four slots are free again


@pytest.mark.parametrize("transport", ["process", "thread"])
def test_a_session_whose_caller_left_while_it_opened_gives_its_slot_back(workers, transport):
    w = workers[0] if transport == "process" else workers[1]

    async def run():
        for _ in range(2):  # twice the slots: a leak would leave none for the second round
            opening = [asyncio.ensure_future(w.open_session([1, 2, 3], GREEDY)) for _ in range(4)]
            await asyncio.sleep(0)
            for o in opening:
                o.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
        await asyncio.sleep(0.2)  # the engine side takes the slots, then they are given back
        sids = [await w.open_session([1, 2, 3], GREEDY) for _ in range(4)]  # EngineFull if any leaked
        for sid in sids:
            await w.close_session(sid)
        return sids

    assert len(set(asyncio.run(run()))) == 4


def test_a_bad_checkpoint_fails_the_constructor_with_the_childs_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing"):
        ProcessEngineWorker(dict(ckpt_dir=str(tmp_path / "nothing"), max_batch=2))


def test_a_dead_engine_process_fails_its_requests_and_the_health_check(spec):
    w = ProcessEngineWorker(spec)
    try:
        async def run():
            stream = asyncio.ensure_future(_collect(w, [1, 2], SamplingParams(temperature=0, max_new_tokens=10**6)))
            while not (await w.stats_dict())["steps"]:
                await asyncio.sleep(0.01)
            os.kill(w._proc.pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(stream, return_exceptions=True), 10)

        (err,) = asyncio.run(run())
        assert isinstance(err, RuntimeError) and "engine process exited" in str(err)
        with pytest.raises(RuntimeError, match="engine process"):
            w.check()
        with pytest.raises(RuntimeError, match="engine process"):
            asyncio.run(_collect(w, [1, 2]))
    finally:
        w.close()


def test_close_stops_the_child_and_a_killed_replica_takes_its_child_along(spec):
    w = ProcessEngineWorker(spec)
    w.check()
    w.close()
    assert w._proc.returncode == 0
    # a replica killed with SIGKILL: its child sees the socket close and exits by itself
    script = ("import json, sys, time\nfrom serving.engine_worker import ProcessEngineWorker\n"
              f"w = ProcessEngineWorker(json.loads({json.dumps(json.dumps(spec))}))\n"
              "print(w._proc.pid, flush=True)\ntime.sleep(600)\n")
    replica = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(replica.stdout.readline())
        assert _alive(child)
        replica.kill()
        replica.wait()
        deadline = time.monotonic() + 20
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        replica.kill()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has exited)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
