"""Load and faults against the real app: concurrent clients, a SIGKILLed expert replica, killed training.

``make reliability`` runs them full size (64 clients for 60 s; 24 clients for 60 s around the kill;
both ways of killing a 60-step training task); ``make test`` runs the same tests CI-sized
(:data:`CI`: 8 clients for 12 s, 8 clients around the kill until 5 s after the replica is back, a
SIGKILLed 30-step task).

Every request loop here is bounded in count and time and stops by itself; all traffic is on
loopback. Replica PIDs come from Ray's actor table; memory is VmRSS from /proc.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .conftest import API_KEY, EXPERTS, SUMMARY, count_errors, full_enabled

pytestmark = [pytest.mark.reliability, pytest.mark.ray]


@dataclass(frozen=True)
class Size:
    clients: int  # the load test's concurrent clients
    load_s: float
    warmup_s: float  # memory baseline taken after this
    kill_clients: int  # clients during the replica kill
    kill_s: float  # load around the kill; CI-sized, it ends sooner: 5 s after the replica is back
    until_recovered: bool
    train_steps: int  # the killed training task's steps
    kills: tuple[str, ...]  # ways of killing it


FULL = Size(64, 60.0, 10.0, 24, 60.0, False, 60, ("hard-exit", "sigkill"))
CI = Size(8, 12.0, 4.0, 8, 120.0, True, 30, ("sigkill",))


@pytest.fixture(scope="module")
def size(request: pytest.FixtureRequest) -> Size:
    return FULL if full_enabled(request.config) else CI


REQUEST_TIMEOUT_S = 30.0  # a request that takes longer than this counts as a hang
FAIL_FAST_S = 20.0  # every request to a killed expert is answered (200 after the restart, or 503) within this
RECOVERY_LIMIT_S = 120.0
FAST_503_S = 2.0  # after the ingress has seen a replica die, its requests get 503 within this


# ---- replica processes -------------------------------------------------------------------------
def replica_pids() -> dict[str, int]:
    """{deployment name: pid} of the live Serve replicas of this app (from Ray's actor table)."""
    import ray

    rows = []
    try:
        from ray.util.state import list_actors

        rows = [(a.class_name, a.state, a.pid) for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)]
    except Exception:  # the state API needs the dashboard; the GCS actor table does not
        rows = [(a.get("ActorClassName", ""), a.get("State"), a.get("Pid"))
                for a in ray._private.state.actors().values()]
    out = {}
    for cls, state, pid in rows:
        if cls.startswith("ServeReplica:hmoe:") and state in ("ALIVE", 2) and pid:
            out[cls.split(":", 2)[2]] = int(pid)
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---- a bounded load generator ----------------------------------------------------------------
@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # anything but 200 and deliberate 503s
    events: list[tuple[float, str, int, float]] = field(default_factory=list)  # (t, target, status, latency)

    def add(self, target: str, status: int, latency: float, t: float, note: str = "") -> None:
        self.latencies.setdefault(target, []).append(latency)
        count_errors(self.statuses, f"{target} {status}")
        self.events.append((t, target, status, latency))
        if status not in (200, 503):
            self.bad.append(f"{target} {status} {note[:200]}")


def _request(rng: random.Random, model: str) -> tuple[str, dict]:
    kind = rng.choice(["completions", "chat", "generate", "generate_stream"])
    prompt = rng.choice(["What is 12 + 30?", "def add(a, b):", "Hello there!", "Paris is the capital of"])
    if kind == "completions":
        return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8}
    if kind == "chat":
        return "/v1/chat/completions", {"model": model, "max_tokens": 8,
                                        "messages": [{"role": "user", "content": prompt}]}
    body = {"prompt": prompt, "max_tokens": 8, "stream": kind == "generate_stream"}
    if model != "auto":
        body["expert"] = model
    return "/generate", body


async def _one(client: httpx.AsyncClient, path: str, body: dict, target: str, tally: Tally, t0: float) -> None:
    start = time.perf_counter()
    try:
        r = await client.post(path, json=body, timeout=REQUEST_TIMEOUT_S)
        status, note = r.status_code, r.text
        if status == 200 and body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
            if '"error"' in r.text:  # an in-band error after the 200 (the replica died mid-stream)
                status, note = (503 if '"type":"overloaded_error"' in r.text else 500), r.text
        if r.status_code == 503:  # (an in-band stream error has no headers of its own)
            assert r.headers.get("retry-after"), r.headers
    except httpx.TimeoutException as e:
        status, note = 599, f"timeout after {REQUEST_TIMEOUT_S}s: {e!r}"
    except httpx.HTTPError as e:
        status, note = 598, repr(e)
    end = time.perf_counter()
    tally.add(target, status, end - start, end - t0, note)


async def run_load(url: str, *, clients: int, seconds: float, models: list[str], tally: Tally,
                   on_tick=None, max_requests: int = 100_000, done=None) -> None:
    """``clients`` coroutines post requests back to back until ``seconds`` pass (or the cap, or
    ``done(t)`` says so)."""
    t0 = time.perf_counter()
    sent = [0]
    over = lambda: time.perf_counter() - t0 >= seconds or (done is not None and done(time.perf_counter() - t0))  # noqa: E731
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 limits=limits) as client:
        async def worker(i: int) -> None:
            rng = random.Random(i)
            model = models[i % len(models)]
            while not over() and sent[0] < max_requests:
                sent[0] += 1
                path, body = _request(rng, model)
                await _one(client, path, body, model, tally, t0)

        async def ticker() -> None:
            while on_tick is not None and not over():
                await on_tick(time.perf_counter() - t0)
                await asyncio.sleep(0.25)

        await asyncio.gather(ticker(), *(worker(i) for i in range(clients)))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(1000.0 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else float("nan")


# ---- concurrent clients: no errors, bounded memory ----------------------------------------------
def test_load_concurrent_clients_memory_stable(server, size):
    tally = Tally()
    label = f"load_{size.clients}x{size.load_s:g}s"
    pids = replica_pids()
    assert {f"Expert-{e}" for e in EXPERTS} <= set(pids), pids
    baseline: dict[str, int] = {}

    async def tick(t: float) -> None:
        if t >= size.warmup_s and not baseline:
            baseline.update({name: rss_kb(pid) for name, pid in pids.items()})

    asyncio.run(run_load(server, clients=size.clients, seconds=size.load_s, models=["auto", *EXPERTS],
                         tally=tally, on_tick=tick))
    final = {name: rss_kb(pid) for name, pid in pids.items()}
    assert replica_pids() == pids, "a replica restarted during the load run"
    growth = {n: round(100.0 * (final[n] - baseline[n]) / baseline[n], 2) for n in pids}
    lat = [x for xs in tally.latencies.values() for x in xs]
    ok = sum(v for k, v in tally.statuses.items() if k.endswith(" 200"))
    backpressure = sum(v for k, v in tally.statuses.items() if k.endswith(" 503"))
    SUMMARY["requests_served"] += ok
    SUMMARY["latency_ms"][label] = {"requests": len(lat), "ok": ok, "backpressure_503": backpressure,
                                    "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99),
                                    "rps": round(len(lat) / size.load_s, 1)}
    SUMMARY["memory_growth"][f"{label}_pct"] = growth
    SUMMARY["memory_growth"][f"{label}_rss_kb"] = {n: [baseline[n], final[n]] for n in pids}
    for k, v in tally.statuses.items():
        count_errors(SUMMARY["errors_by_class"], f"load {k}", v) if not k.endswith(" 200") else None
    print("load:", SUMMARY["latency_ms"][label], "rss growth %:", growth)
    assert tally.bad == [], tally.bad[:10]
    assert ok > 0.5 * len(lat), tally.statuses
    assert all(g < 10.0 for g in growth.values()), growth


# ---- kill one expert replica during load -------------------------------------------------------
def test_sigkill_expert_replica_during_load(server, size):
    victim, others = "math", [e for e in EXPERTS if e != "math"]
    pids = replica_pids()
    old_pid = pids[f"Expert-{victim}"]
    tally = Tally()
    state: dict[str, float] = {}

    async def tick(t: float) -> None:
        if "killed" not in state and t >= 5.0:
            os.kill(old_pid, signal.SIGKILL)
            state["killed"] = t
        elif "killed" in state and "recovered" not in state:
            back = [e for e in tally.events if e[1] == victim and e[2] == 200 and e[0] - e[3] > state["killed"]]
            if back:
                state["recovered"] = min(e[0] for e in back)

    clients, seconds = size.kill_clients, size.kill_s
    models = [victim if i % 3 == 0 else others[i % len(others)] for i in range(clients)]
    done = (lambda t: t > state.get("recovered", float("inf")) + 5.0) if size.until_recovered else None
    asyncio.run(run_load(server, clients=clients, seconds=seconds, models=models, tally=tally, on_tick=tick,
                         done=done))
    assert "killed" in state
    killed = state["killed"]
    after = [e for e in tally.events if e[1] == victim and e[0] > killed]
    failed = [e for e in after if e[2] != 200]
    new_pid = replica_pids().get(f"Expert-{victim}")
    recovery = round(state["recovered"] - killed, 2) if "recovered" in state else None
    other_events = [e for e in tally.events if e[1] != victim]
    SUMMARY["recovery_s"]["expert_replica_sigkill"] = recovery
    SUMMARY["checks"]["replica_kill"] = {
        "victim": victim, "old_pid": old_pid, "new_pid": new_pid, "victim_failed_503": len(failed),
        "victim_max_failed_latency_s": round(max((e[3] for e in failed), default=0.0), 2),
        "victim_max_latency_after_kill_s": round(max((e[3] for e in after), default=0.0), 2),
        "others_requests": len(other_events),
        "others_non_200": sum(1 for e in other_events if e[2] != 200),
        "others_p99_ms": _pct([e[3] for e in other_events], 0.99)}
    SUMMARY["requests_served"] += sum(1 for e in tally.events if e[2] == 200)
    for k, v in tally.statuses.items():
        count_errors(SUMMARY["errors_by_class"], f"kill {k}", v) if not k.endswith(" 200") else None
    # once the ingress has seen the replica die, requests for it fail fast until it is back
    first_fail = min((e[0] for e in failed), default=None)
    fast = [e for e in after if first_fail is not None and e[0] - e[3] > first_fail and e[2] == 503]
    SUMMARY["checks"]["replica_kill"]["victim_fast_503"] = len(fast)
    SUMMARY["checks"]["replica_kill"]["victim_fast_503_max_s"] = round(max((e[3] for e in fast), default=0.0), 3)
    print("replica kill:", SUMMARY["checks"]["replica_kill"], "recovery s:", recovery)
    assert tally.bad == [], tally.bad[:10]  # only 200s and 503s (with Retry-After): no 5xx, no hangs
    # Serve holds (or retries) requests for the dead replica until its replacement is up: bounded
    assert all(e[3] < FAIL_FAST_S for e in after), [e for e in after if e[3] >= FAIL_FAST_S][:5]
    assert recovery is not None and recovery < RECOVERY_LIMIT_S, state
    assert failed, "no request for the killed expert failed: the kill was not observed"
    assert all(e[3] < FAST_503_S for e in fast), [e for e in fast if e[3] >= FAST_503_S][:5]
    assert new_pid and new_pid != old_pid
    assert SUMMARY["checks"]["replica_kill"]["others_non_200"] == 0, tally.statuses


# ---- kill a training task: Ray retries it, it resumes, the final checkpoint loads --------------
def _splits(root: Path, name: str) -> dict:
    from tests.training.conftest import domain_tokens, write_packed

    return {name: {split: write_packed(root / name / split, domain_tokens(1, 6000, seed=i))
                   for i, split in enumerate(("train", "val", "test"))}}


def _train_cfg(fail_at: str | None, steps: int):
    from training.loop import LoopConfig

    return LoopConfig(max_steps=steps, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=2,
                      ckpt_every=5, log_every=10, seed=1, device="cpu", fail_at=fail_at or "")


def _check_resumed(res, run_dir: Path, name: str, steps: int) -> dict:
    from experts.checkpoint import load_lm
    from training.loop import read_metrics

    assert res.steps == steps and res.resumed_from is not None and res.resumed_from % 5 == 0, res
    model, cfg, meta = load_lm(run_dir / "experts" / name)  # verified: every file's SHA-256
    assert meta["train"]["steps"] == steps
    recs = read_metrics(run_dir / "metrics" / f"{name}.jsonl")
    resumes = [r["step"] for r in recs if r.get("event") == "resume"]
    assert resumes == [res.resumed_from], resumes
    return {"resumed_from": res.resumed_from, "resumes": len(resumes)}


def _worker_pid(title: str) -> int | None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") == title:
                    return int(d.name)
            except OSError:
                continue
    return None


@pytest.mark.parametrize("how", ["hard-exit", "sigkill"])
def test_killed_training_task_retried_and_resumes(server, size, tmp_path, how):
    import ray

    if how not in size.kills:
        pytest.skip(f"{how}: only in the full-size run (make reliability)")
    from tests.training.conftest import lm_task
    from training.loop import read_metrics
    from training.ray_jobs import submit_train

    rng = random.Random(7)
    name = f"rk{uuid.uuid4().hex[:8]}"
    steps = size.train_steps
    kill_at = rng.randint(8, steps - 10)
    fail_at = f"{name}:{kill_at}:exit" if how == "hard-exit" else None
    run_dir = tmp_path / "run"
    task = lm_task(_splits(tmp_path / "data", name), name, f"experts/{name}")
    t0 = time.perf_counter()
    ref = submit_train(task, _train_cfg(fail_at, steps), run_dir, num_cpus=0.5, max_retries=2)
    killed_at_step = kill_at
    if how == "sigkill":  # wait until the task passes the step, then SIGKILL its worker process
        metrics = run_dir / "metrics" / f"{name}.jsonl"
        deadline = time.monotonic() + 180
        pid = None
        while time.monotonic() < deadline:
            done = [r["step"] for r in read_metrics(metrics) if r.get("kind") == "train"]
            pid = pid or _worker_pid(f"ray::train-{name}")
            if done and done[-1] >= kill_at and pid:
                killed_at_step = done[-1]
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert pid is not None, "never found the training worker"
    res = ray.get(ref, timeout=300)
    info = _check_resumed(res, run_dir, name, steps)
    assert info["resumed_from"] <= killed_at_step
    SUMMARY["recovery_s"][f"training_{how}_total"] = round(time.perf_counter() - t0, 1)
    SUMMARY["checks"][f"training_{how}"] = {"killed_at_step": killed_at_step, **info, "final_loads": True}
