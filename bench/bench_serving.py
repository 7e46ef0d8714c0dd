"""Serving benchmark: latency and throughput of the Ray Serve app, and the ingress overhead.

Measures, in one Ray/Serve instance on loopback:
- p50/p99 latency of a 32-token completion at 1, 8 and 32 concurrent clients, and aggregate tokens/s
  (one prompt, so one expert batches everything; and a mixed load, one prompt per expert, at 1
  and 8 clients);
  with each level, the CPU each process spent per request (read from /proc: proxy, ingress,
  router, experts, the rest of Ray, this load generator), the machine's utilisation, and the
  experts' mean decode batch and requests per prefill (from ``/v1/stats``);
- the 1, 8 and 32 client levels again with int8 decode weights, with one ingress replica instead
  of the default two (``--ingress-replicas 1``), and with the experts' engine loops on a thread
  of their replica instead of a child process (``--engine thread``);
- the same 1 and 8 client levels calling the expert deployment directly (a DeploymentHandle in
  this process: no HTTP, proxy or ingress), how far the deployment alone scales here;
- the router + ingress overhead: HTTP ``/v1/completions`` (``model="auto"``) against calling the
  same expert deployment directly through a DeploymentHandle (same prompt, greedy, same tokens);
- a plain two-hop Serve echo (HTTP -> FastAPI ingress -> one deployment, no model), the floor
  any two-hop Serve request pays;
- all of it behind the proxy ``hmoe serve`` would use here (HAProxy when its binary is there), then,
  if that was HAProxy, the load levels again behind Serve's Python proxy (a second Ray instance);
- how much a process spinning on the other vCPU slows a batch-8 decode step (``contention``): the
  host's state during the run (here it varied from no slowdown to 2.3x within an hour); and what
  two CPU-bound processes get done against one (``parallelism``: 2.0 for two real cores).

Uses ``runs/quick`` when it holds a trained run (``HMOE_BENCH_RUN`` overrides), else tiny
random-weight checkpoints. ``bench.run_all`` writes ``bench/results/bench_serving.json``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

PROMPT = "Question: what is 17 + 25? Answer:"
TOKENS = 32
# the mixed load: one prompt per expert, named (the quick router sends most reasoning prompts to
# conversation), each client cycling through them from its own offset
MIXED = {"math": "Question: what is 17 + 25? Answer:",
         "reasoning": "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?",
         "conversation": "Hi! How was your weekend?", "knowledge": "What is the population of Chile?",
         "code": "def fibonacci(n):"}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


def _summary(lat_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": _pct(lat_ms, 0.5), "p99_ms": _pct(lat_ms, 0.99), "n": len(lat_ms)}


def _role(cmdline: str) -> str | None:
    """The benchmark's name for a process: expert:<name>, ingress, router, proxy, ray, or None."""
    if cmdline.startswith("ray::ServeReplica:hmoe:"):
        name = cmdline.split()[0].rsplit(":", 1)[1]
        return f"expert:{name[len('Expert-'):]}" if name.startswith("Expert-") else name.lower()
    if cmdline.startswith(("ray::ProxyActor", "ray::HAProxyManager")) or "haproxy-serve" in cmdline:
        return "proxy"  # Serve's proxy actor, or HAProxy and its manager actor (--proxy haproxy)
    if cmdline.startswith("ray::") or "/ray/" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline:
        return "ray (controller, GCS, raylet, agents)"
    return None


def _processes() -> Iterator[tuple[str, str]]:
    """(pid, command line) of every process still running."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            yield pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's processes, and by this one.

    An expert's engine process (``serving.engine_proc``) counts for the replica that started it."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[str, int, float]] = {}  # pid -> (command line, parent pid, CPU s)
    for pid, cmd in _processes():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        procs[int(pid)] = (cmd, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    out: dict[str, float] = {}
    for pid, (cmd, ppid, cpu) in procs.items():
        if pid == os.getpid():
            role = "load generator"
        elif "serving.engine_proc" in cmd and ppid in procs:
            role = _role(procs[ppid][0])
        else:
            role = _role(cmd)
        if role:
            out[role] = out.get(role, 0.0) + cpu
    return out


def _batch_stats(url: str) -> dict[str, dict[str, int]]:
    return httpx.get(f"{url}/v1/stats", timeout=30).json()["experts"]


def _batch_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Mean decode batch and requests per prefill of each expert that worked between two snapshots."""
    out = {}
    for name, a in after.items():
        b = before[name]
        steps, prefills = a["steps"] - b["steps"], a["prefills"] - b["prefills"]
        if steps:
            out[name] = {"mean_decode_batch": round((a["tokens"] - b["tokens"]) / steps, 2),
                         "requests_per_prefill": round((a["prefilled"] - b["prefilled"]) / max(prefills, 1), 2),
                         # wall time of a decode step, and the engine thread's CPU time in it
                         "decode_step_ms": round((a["step_s"] - b["step_s"]) * 1000 / steps, 3),
                         "decode_step_cpu_ms": round((a["step_cpu_s"] - b["step_cpu_s"]) * 1000 / steps, 3)}
    return out


def _run_dir() -> tuple[Path, str]:
    run = Path(os.environ.get("HMOE_BENCH_RUN", "runs/quick"))
    if (run / "router" / "meta.json").is_file() and (run / "experts").is_dir():
        return run, "trained"
    from serving.testing import make_tiny_run

    return make_tiny_run(Path(tempfile.mkdtemp(prefix="hmoe-bench-"))), "tiny-random"


def _echo_app():
    """The two-hop baseline: FastAPI ingress -> one deployment that returns its input."""
    from fastapi import FastAPI
    from ray import serve

    echo_api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    class Echo:
        def echo(self, body: dict) -> dict:
            return body

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    @serve.ingress(echo_api)
    class EchoIngress:
        def __init__(self, echo) -> None:
            self.echo_handle = echo

        @echo_api.post("/")
        async def root(self, body: dict) -> dict:
            return await self.echo_handle.echo.remote(body)

    return EchoIngress.bind(Echo.bind())


async def _load(base: str, bodies: list[dict], clients: int, per_client: int, repeats: int = 3) -> dict[str, Any]:
    """``clients`` concurrent HTTP clients, each sending ``per_client`` completions back to back
    (client ``i``'s ``j``-th request is ``bodies[(i + j) % len(bodies)]``); see ``_rounds``."""
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as c:
        async def send(i: int, j: int) -> int:
            r = await c.post(f"{base}/v1/completions", json=bodies[(i + j) % len(bodies)])
            r.raise_for_status()
            return r.json().get("usage", {}).get("completion_tokens", 0)

        return await _rounds(base, send, clients, per_client, repeats)


async def _rounds(base: str, send: Callable[[int, int], Awaitable[int]], clients: int, per_client: int,
                  repeats: int) -> dict[str, Any]:
    """``clients`` concurrent clients, each awaiting ``send(i, j)`` (-> tokens generated) for
    ``j < per_client``, back to back.

    One untimed round at the same concurrency warms every process up (the first rounds after a
    start run up to 20% slower); then ``repeats`` timed rounds: the median round's tokens/s, and
    the latencies of all rounds.
    """
    lat: list[float] = []
    tokens = 0

    async def client(i: int) -> None:
        nonlocal tokens
        for j in range(per_client):
            t0 = time.perf_counter()
            n = await send(i, j)
            lat.append((time.perf_counter() - t0) * 1000.0)
            tokens += n

    rounds = []
    await asyncio.gather(*(client(i) for i in range(clients)))  # warm-up round
    lat.clear()
    stats0, cpu0, t_all = _batch_stats(base), _cpu_by_role(), time.perf_counter()
    for _ in range(repeats):
        tokens = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
        rounds.append({"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)})
    wall_all, cpu1 = time.perf_counter() - t_all, _cpu_by_role()
    batches = _batch_delta(stats0, _batch_stats(base))
    mid = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
    n = len(lat)
    cpu = {k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1000.0 / n, 2) for k in cpu1}
    cpu = {k: v for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    total = sum(cpu.values())
    return {**_summary(lat), "clients": clients, **mid, "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds],
            "cpu_ms_per_request": {"total": round(total, 2), **cpu},
            "cpu_utilisation_of_2_cores": round(total * n / 1000.0 / wall_all / 2, 3), "experts": batches}


async def _overhead_rounds(url: str, handle: Any, body: dict, expert: str, ids: list[int], params: dict,
                           n: int) -> tuple[dict[str, list[float]], int]:
    """``n`` rounds of four sequential requests, one of each kind per round (so a drift in the
    host's speed touches every kind alike): the expert deployment called directly the way the
    ingress calls it for a non-streaming request (``generate_all``: no HTTP, no ingress, no router),
    HTTP with ``model=auto`` and with the expert named, and the two-hop echo. Returns the latencies
    and the number of tokens generated (the same for the direct call and HTTP, or an error)."""
    lat: dict[str, list[float]] = {"direct_handle": [], "http_auto": [], "http_named_expert": [], "two_hop_echo": []}
    named = {**body, "model": expert}
    echo = {"prompt": PROMPT, "max_tokens": TOKENS}
    tokens: dict[str, set[int]] = {"direct_handle": set(), "http_auto": set()}
    async with httpx.AsyncClient(timeout=120) as c:
        async def direct() -> None:
            tokens["direct_handle"].add(len((await handle.generate_all.remote(ids, params))["tokens"]))

        calls = {"direct_handle": direct,
                 "http_auto": lambda: c.post(f"{url}/v1/completions", json=body),
                 "http_named_expert": lambda: c.post(f"{url}/v1/completions", json=named),
                 "two_hop_echo": lambda: c.post(f"{url}/echo/", json=echo)}
        for i in range(n + 1):
            for kind, call in calls.items():
                t0 = time.perf_counter()
                r = await call()
                if i:  # the first round warms up
                    lat[kind].append((time.perf_counter() - t0) * 1000.0)
                if r is not None:
                    r.raise_for_status()
                    if kind == "http_auto":
                        tokens[kind].add(r.json()["usage"]["completion_tokens"])
    if len(tokens["http_auto"]) != 1 or tokens["direct_handle"] != tokens["http_auto"]:
        raise RuntimeError(f"the direct call and HTTP must generate the same tokens: counts {tokens}")
    return lat, next(iter(tokens["http_auto"]))


def _expert_call(url: str, run: Path) -> tuple[dict, str, Any, list[int], dict]:
    """The HTTP body of the load levels, the expert the router sends it to, a handle to that
    expert's deployment, and the ids and sampling params the ingress passes it for that body."""
    from ray import serve

    from experts.tokenizer import Tokenizer

    body = {"model": "auto", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    first = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    expert = first["hmoe"]["routing"]["expert"]
    tok = Tokenizer.load(run / "experts" / expert / "tokenizer.json")
    ids = [tok.bos_id, *tok.encode(PROMPT)]
    params = dict(temperature=0.0, max_new_tokens=TOKENS, stop_ids=(tok.eos_id, tok.end_id))
    return body, expert, serve.get_deployment_handle(f"Expert-{expert}", app_name="hmoe"), ids, params


def _direct_levels(url: str, call: tuple) -> dict[str, Any]:
    """1 and 8 clients calling the expert deployment directly: ``generate_all`` through a
    DeploymentHandle from this process (no HTTP, proxy, ingress or router), for the same tokens as
    the HTTP levels. How far the expert deployment alone scales with concurrency on this machine,
    next to what the HTTP levels get with the proxy and the ingress on the same two cores."""
    _, _, handle, ids, params = call  # from ``_expert_call``

    async def send(i: int, j: int) -> int:
        return len((await handle.generate_all.remote(ids, params))["tokens"])

    async def levels() -> dict[str, Any]:
        return {str(c): await _rounds(url, send, c, per, 3) for c, per in ((1, 16), (8, 6))}

    return asyncio.run(levels())


def _overhead(url: str, call: tuple, repeats: int) -> dict[str, Any]:
    body, expert, handle, ids, params = call  # from ``_expert_call``
    lat, n_tokens = asyncio.run(_overhead_rounds(url, handle, body, expert, ids, params, repeats))
    out: dict[str, Any] = {"expert": expert, "tokens": n_tokens, **{k: _summary(v) for k, v in lat.items()}}
    p50 = {k: out[k]["p50_ms"] for k in ("direct_handle", "http_auto", "http_named_expert", "two_hop_echo")}
    out["router_ingress_overhead_p50_ms"] = round(p50["http_auto"] - p50["direct_handle"], 3)
    out["router_overhead_p50_ms"] = round(p50["http_auto"] - p50["http_named_expert"], 3)
    out["overhead_above_echo_p50_ms"] = round(out["router_ingress_overhead_p50_ms"] - p50["two_hop_echo"], 3)
    out["goal_overhead_above_echo_le_5ms"] = out["overhead_above_echo_p50_ms"] <= 5.0
    return out


def _contention(run: Path, rounds: int = 5) -> dict[str, Any]:
    """A batch-8 decode step of a served expert, alone and while another process spins on the
    other vCPU (stopped and continued in turns, medians of ``rounds`` each): what the second vCPU
    is worth on this host right now."""
    import signal
    import statistics
    import subprocess
    import sys

    import torch

    from bench.common import run_times
    from experts.checkpoint import load_lm
    from experts.device import set_threads
    from experts.generate import Engine
    from experts.quant import prepare_decode
    from experts.sampling import SamplingParams

    set_threads(1)
    expert = next(p for p in sorted((run / "experts").iterdir()) if (p / "meta.json").is_file())
    model, cfg, _ = load_lm(expert, device=torch.device("cpu"))
    prepare_decode(model)  # as the Expert deployment decodes

    def steps() -> None:
        engine = Engine(model, max_batch=8, max_len=min(cfg.max_seq_len, 64), logprobs=False)
        engine.add_many([[1, 2, 3, 4]] * 8, [SamplingParams(temperature=0, max_new_tokens=32, stop_ids=())] * 8)
        while engine.has_work:
            engine.step()

    times: dict[str, list[float]] = {"alone": [], "busy": []}
    spinner = subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"])
    try:
        for _ in range(rounds):
            for state, sig in (("alone", signal.SIGSTOP), ("busy", signal.SIGCONT)):
                spinner.send_signal(sig)
                time.sleep(0.1)
                times[state].append(statistics.median(run_times(steps, repeats=5, warmup=1)) / 32)
    finally:
        spinner.kill()
        spinner.wait()
    alone, busy = statistics.median(times["alone"]), statistics.median(times["busy"])
    return {"expert": expert.name, "decode_step_ms_batch8_alone": round(alone * 1000, 3),
            "decode_step_ms_batch8_other_vcpu_busy": round(busy * 1000, 3), "slowdown": round(busy / alone, 2)}


def _parallelism(n: int = 3) -> dict[str, Any]:
    """What the two vCPUs are worth together: the same CPU-bound Python loop in one process, then
    in two at once (alternately, ``n`` times each; medians). A speedup of 2.0 means two real cores;
    a host that shares them (SMT siblings, an overcommitted hypervisor) gives less, and every
    process of the server competes for that."""
    import statistics
    import subprocess
    import sys

    code = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(6_000_000): x += i\nprint(time.perf_counter() - t)"

    def run(k: int) -> float:  # the slowest process's time
        procs = [subprocess.Popen([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(k)]
        return max(float(p.communicate()[0]) for p in procs)

    one, two = [], []
    for _ in range(n):
        one.append(run(1))
        two.append(run(2))
    t1, t2 = statistics.median(one), statistics.median(two)
    return {"one_process_s": round(t1, 3), "two_processes_s": round(t2, 3),
            "speedup_of_two_processes": round(2 * t1 / t2, 2)}


def _load_levels(url: str) -> dict[str, Any]:
    body = {"model": "auto", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    return {str(c): asyncio.run(_load(url, [body], c, per)) for c, per in ((1, 16), (8, 6), (32, 3))}


def _mixed_levels(url: str) -> dict[str, Any]:
    """1 and 8 clients over one prompt per expert: several experts decode at once."""
    bodies = [{"model": e, "prompt": p, "max_tokens": TOKENS, "temperature": 0} for e, p in MIXED.items()]
    return {str(c): asyncio.run(_load(url, bodies, c, per)) for c, per in ((1, 15), (8, 10))}


def _redeploy(args: Any, url: str) -> None:
    """Replace the app by ``build_app(args)``; return once it is ready and the old replicas have
    stopped (they drain for up to ``graceful_shutdown_timeout_s``, and their CPU would count)."""
    from ray import serve

    from serving.app import build_app
    from serving.cli import APP_NAME, wait_ready

    serve.delete(APP_NAME)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    wait_ready(url, None, 300)
    want = len(args.experts) * args.expert.replicas + args.ingress.replicas
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum(cmd.startswith(f"ray::ServeReplica:{APP_NAME}:") for _, cmd in _processes()) <= want:
            return
        time.sleep(0.5)


def _ratio(load: dict[str, Any]) -> float:
    return round(load["8"]["tokens_per_s"] / max(load["1"]["tokens_per_s"], 1e-9), 2)


def main() -> dict[str, Any]:
    """Run the benchmark and return its figures (the default app, then int8 decode weights, one
    ingress replica, and the engine loop on a thread of the replica instead of a process of its own)."""
    import ray
    from ray import serve

    from serving.cli import default_proxy, start
    from serving.config import AppArgs
    from serving.testing import free_port

    run, kind = _run_dir()
    contention = _contention(run)  # before Ray starts: a quiet machine
    parallelism = _parallelism()
    args = AppArgs(run_dir=str(run), max_tokens_cap=256)
    proxy = default_proxy()  # what hmoe serve would use here
    url = start(args, port=free_port(), num_cpus=2, proxy=proxy)
    serve.run(_echo_app(), name="echo", route_prefix="/echo")
    try:
        load = _load_levels(url)
        mixed = _mixed_levels(url)
        call = _expert_call(url, run)
        direct = _direct_levels(url, call)
        overhead = _overhead(url, call, repeats=30)
        _redeploy(args.model_copy(update={"decode_weights": "int8"}), url)
        load_int8 = _load_levels(url)
        _redeploy(args.model_copy(update={"ingress": args.ingress.model_copy(update={"replicas": 1})}), url)
        load_one_ingress = _load_levels(url)
        _redeploy(args.model_copy(update={"engine": "thread"}), url)
        load_thread_engine = _load_levels(url)
    finally:
        serve.shutdown()
        ray.shutdown()
    load_python_proxy = None
    if proxy == "haproxy":  # the same app behind Serve's Python proxy (--proxy python): a new local Ray
        url = start(args, port=free_port(), num_cpus=2, proxy="python")
        try:
            load_python_proxy = _load_levels(url)
        finally:
            serve.shutdown()
            ray.shutdown()
    speedup = _ratio(load)
    result = {"run": str(run), "checkpoints": kind, "completion_tokens": TOKENS, "load": load,
              "throughput_8_over_1": speedup, "goal_throughput_8_ge_4x": speedup >= 4.0,
              "load_int8_decode_weights": load_int8, "throughput_8_over_1_int8": _ratio(load_int8),
              "ingress_replicas": args.ingress.replicas,
              "load_one_ingress_replica": load_one_ingress,
              "throughput_8_over_1_one_ingress_replica": _ratio(load_one_ingress),
              "load_thread_engine": load_thread_engine,
              "throughput_8_over_1_thread_engine": _ratio(load_thread_engine),
              "load_direct_handle": direct, "throughput_8_over_1_direct_handle": _ratio(direct),
              "load_mixed_domains": mixed, "throughput_8_over_1_mixed_domains": _ratio(mixed),
              "proxy": proxy, "load_python_proxy": load_python_proxy,
              "throughput_8_over_1_python_proxy": load_python_proxy and _ratio(load_python_proxy),
              "overhead": overhead, "contention": contention, "parallelism": parallelism,
              "note": "2-core shared machine: every process (proxy, ingress, router, 5 experts, and the "
                      "load generator) shares the two cores"}
    return result


if __name__ == "__main__":
    from bench.run_all import main as run_all

    raise SystemExit(run_all(["bench_serving"]))
