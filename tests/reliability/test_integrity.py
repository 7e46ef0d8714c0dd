"""A corrupt weights file or config in a run dir is refused at load, and ``hmoe serve`` will not start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experts.checkpoint import CheckpointError, load_lm, read_meta
from serving.testing import free_port, make_tiny_run

from .conftest import ROOT, SUMMARY

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("integrity"), experts=("math", "code"))


def _flip_byte(f: Path, at: int) -> None:
    data = bytearray(f.read_bytes())
    data[at % len(data)] ^= 0x5A
    f.write_bytes(bytes(data))


def _corrupt(run: Path, how: str) -> Path:
    """Apply one kind of damage to the ``code`` expert; return the file that was damaged."""
    ckpt = run / "experts" / "code"
    if how == "weights-flip":
        _flip_byte(ckpt / "model.safetensors", 5000)
        return ckpt / "model.safetensors"
    if how == "weights-truncated":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
        return f
    if how == "tokenizer-edited":
        f = ckpt / "tokenizer.json"
        f.write_text(f.read_text().replace('"<|bos|>"', '"<|BOS|>"', 1))
        return f
    meta_f = ckpt / "meta.json"
    meta = json.loads(meta_f.read_text())
    if how == "config-invalid":
        meta["config"]["n_layers"] = -3
        meta_f.write_text(json.dumps(meta))
    elif how == "config-wrong-shape":
        meta["config"]["d_model"] = meta["config"]["d_model"] * 2
        meta_f.write_text(json.dumps(meta))
    elif how == "meta-torn":
        meta_f.write_text(meta_f.read_text()[:40])
    return meta_f


CASES = ["weights-flip", "weights-truncated", "tokenizer-edited", "config-invalid", "config-wrong-shape",
         "meta-torn"]


@pytest.mark.parametrize("how", CASES)
def test_corrupt_checkpoint_refused_at_load(clean_run, tmp_path, how):
    run = Path(shutil.copytree(clean_run, tmp_path / "run"))
    bad = _corrupt(run, how)
    with pytest.raises(CheckpointError) as e:
        read_meta(run / "experts" / "code", kind="lm", verify=True)
        load_lm(run / "experts" / "code")
    msg = str(e.value)
    assert str(bad) in msg or str(bad.parent) in msg, msg  # names the damaged file or checkpoint
    load_lm(run / "experts" / "math")  # the undamaged expert still loads
    SUMMARY["checks"].setdefault("integrity_refused", []).append(how)




@pytest.mark.parametrize("how", ["weights-flip", "config-invalid"])
def test_hmoe_serve_refuses_corrupt_run(clean_run, tmp_path, how):
    """``hmoe serve`` exits non-zero with the message before starting Ray (no port is opened)."""
    run = Path(shutil.copytree(clean_run, tmp_path / "run"))
    bad = _corrupt(run, how)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, "-m", "serving.command", "serve", str(run), "--port", str(free_port()),
                        "--experts", "math,code"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "error:" in p.stderr and str(bad.parent) in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "hmoe is serving" not in p.stdout
    SUMMARY["checks"].setdefault("serve_refused", []).append(how)
