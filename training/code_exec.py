"""Run generated Python for the report's code scores, never in the calling process.

:func:`run_python` starts a fresh ``python -I`` in an empty temporary directory with a minimal
environment, stdin closed, a CPU-time and address-space limit, a wall-clock timeout (the whole
process group is killed), and sockets replaced by functions that raise before the code runs. This
keeps a generated loop, a crash or a stray connection out of the report; it is *not* a security
sandbox (the child can still read and write files the user can).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MAX_STDOUT = 10_000

_NO_NETWORK = """
import socket as _s
def _refuse(*a, **k):
    raise OSError("network access is disabled in the code scorer")
_s.socket = _refuse
_s.create_connection = _refuse
_s.socketpair = _refuse
_s.getaddrinfo = _refuse
del _s
"""


@dataclass(frozen=True)
class ExecResult:
    ok: bool  # the program ran and exited 0 within the timeout
    stdout: str
    error: str  # '' or a short reason: 'timeout', the last traceback line, ...


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:
        import resource

        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    return apply


def run_python(source: str, *, timeout_s: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``source`` in a sandboxed subprocess (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="hmoe-exec-") as tmp:
        path = os.path.join(tmp, "main.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_NO_NETWORK + "\n" + source)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limits(int(timeout_s) + 1, memory_mb))
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult(False, "", "timeout")
    stdout = out.decode("utf-8", "replace")[:MAX_STDOUT]
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return ExecResult(False, stdout, lines[-1] if lines else f"exit code {proc.returncode}")
    return ExecResult(True, stdout, "")


_DRIVER = """
import copy, json, math, random
def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9) or (a != a and b != b)
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
_gen, _ref, _cand = {"Random": random.Random}, {}, {}
exec(compile(GEN, "<input_generator>", "exec"), _gen)
try:
    exec(compile(REF, "<reference>", "exec"), _ref)
except BaseException as e:
    raise SystemExit("reference raised " + type(e).__name__ + ": " + str(e)[:200])
exec(compile(CAND, "<candidate>", "exec"), _cand)
for i in range(N):
    inputs = _gen["generate_inputs"](random.Random(SEED + i))
    try:
        want = _ref["main_solution"](**copy.deepcopy(inputs))
    except BaseException as e:
        raise SystemExit("reference raised " + type(e).__name__ + ": " + str(e)[:200])
    got = _cand["main_solution"](**copy.deepcopy(inputs))
    if not _same(got, want):
        raise SystemExit("mismatch on input " + str(i))
print("ok")
"""


def codeio_check(reference: str, candidate: str, input_generator: str, *, n_inputs: int = 3,
                 seed: int = 0, timeout_s: float = 10.0) -> ExecResult:
    """Whether ``candidate``'s ``main_solution`` returns the reference's result on ``n_inputs`` inputs
    drawn by the item's ``generate_inputs(random.Random(seed + i))``; all in one :func:`run_python`."""
    head = "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                   (("GEN", input_generator), ("REF", reference), ("CAND", candidate), ("N", n_inputs), ("SEED", seed)))
    res = run_python(head + _DRIVER, timeout_s=timeout_s)
    return res if res.ok or res.error.startswith("reference") else ExecResult(False, res.stdout, res.error)
