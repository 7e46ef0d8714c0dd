"""A process SIGKILLed while writing a checkpoint never leaves a half-written one as the latest.

A child process saves checkpoints in a loop (step 1, 2, ...) with slowed writes; the parent kills
it at random moments, also inside the swap of the new directory for the old one, and checks that
whatever is at the path verifies and loads, and that its step never goes backwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from experts.checkpoint import read_meta, load_lm

from .conftest import ROOT, SUMMARY

pytestmark = pytest.mark.reliability

CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    import experts.atomic as fs
    import experts.checkpoint as ck
    import safetensors.torch as st
    from experts.config import ModelConfig
    from experts.model import Transformer

    path, mode = sys.argv[1], sys.argv[2]
    _save, _replace, _exchange = st.save_file, os.replace, fs._exchange

    def slow_save(*a, **k):  # a slow write: most kills land mid-write
        _save(*a, **k)
        time.sleep(0.02)

    def slow_replace(src, dst):  # widen the window between moving the old dir aside and the swap
        _replace(src, dst)
        if ".old-" in str(dst):
            print("SWAP", flush=True)
            time.sleep(1.0)

    def slow_exchange(a, b):  # killed just before or just after the atomic exchange
        print("SWAP", flush=True)
        time.sleep(0.5)
        ok = _exchange(a, b)
        time.sleep(0.5)
        return ok

    ck.save_file = slow_save
    if mode == "fallback":  # no atomic exchange (non-Linux): two renames plus recovery
        fs._exchange = lambda a, b: False
        fs.os.replace = slow_replace
    elif mode == "exchange":
        fs._exchange = slow_exchange
    cfg = ModelConfig.preset("tiny", vocab_size=64, max_seq_len=32)
    model = Transformer(cfg)
    step = ck.read_meta(path)["step"] if os.path.isdir(path) else 0  # continue where the last child died
    print("READY", flush=True)
    while True:
        step += 1
        ck.save_lm(path, model, cfg, meta={"step": step})
        print("SAVED", step, flush=True)
""")


def _start(path: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode],
                         stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert p.stdout.readline().strip() == "READY"
    return p


def _wait_for(p: subprocess.Popen, prefix: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line
    raise AssertionError(f"child never printed {prefix!r}")


def _kill(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()


def _check_latest(path: Path, last_step: int) -> int:
    """The checkpoint at ``path`` verifies, loads, and is not older than the last one seen."""
    meta = read_meta(path, kind="lm", verify=True)  # raises if a kill left none although one was complete
    load_lm(path)
    assert meta["step"] >= last_step, (meta["step"], last_step)
    return meta["step"]


@pytest.mark.parametrize("mode", ["write", "exchange", "fallback"])
def test_sigkill_while_saving_keeps_latest_loadable(tmp_path, mode):
    """write: killed at random times (mostly mid-write); exchange / fallback: inside the swap."""
    rng = random.Random(1234)
    path = tmp_path / "ckpt" / "latest"
    attempts, last = 6, 0
    for attempt in range(attempts):
        p = _start(path, mode)
        if attempt == 0:  # one complete checkpoint first, so there is something to protect
            last = int(_wait_for(p, "SAVED").split()[1])
        if mode == "write":
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            _wait_for(p, "SWAP")  # fallback: the old directory moved aside, the new not yet in place
            time.sleep(rng.uniform(0.0, 0.9))
        _kill(p)
        last = _check_latest(path, last)
    read_meta(path)  # a reader also cleans up after the last killed writer
    leftovers = sorted(f.name for f in path.parent.iterdir() if f.name != "latest")
    SUMMARY["checks"][f"checkpoint_sigkill_{mode}"] = {
        "kills": attempts, "latest_step": last, "leftover_temp_dirs": len(leftovers)}
    assert json.loads((path / "meta.json").read_text())["kind"] == "lm"
