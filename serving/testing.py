"""A tiny random-weight run directory for tests and the serving benchmark (no training needed)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from experts.checkpoint import TOKENIZER, save_checkpoint, save_lm
from experts.config import ModelConfig
from experts.model import Transformer
from experts.tokenizer import Tokenizer
from router.domains import DOMAINS
from router.model import RouterConfig, RouterModel
from serving.cli import free_port  # noqa: F401 - the tests' and benchmarks' import path

TEXTS = (
    "What is 12 + 30? The answer is 42.",
    "def add(a, b):\n    return a + b\n",
    "Hello! How are you today? I am fine, thanks.",
    "Paris is the capital of France. The Nile is a river in Africa.",
    "If all cats are animals and Tom is a cat, then Tom is an animal.",
    "Unicode: café, naïve, 東京, emoji 🙂.",
) * 20


def make_tiny_run(path: str | Path, *, experts: Sequence[str] = DOMAINS, preset: str = "tiny",
                  max_seq_len: int = 128, seed: int = 0, instruct: Sequence[str] = (),
                  tools: Sequence[str] = (), merged: bool = False) -> Path:
    """Write ``experts/<domain>/`` (random tiny LMs), ``router/`` and a shared tokenizer under ``path``;
    the checkpoints of the ``instruct`` experts say they were instruction-tuned, those of ``tools``
    that they call the calculator. ``merged``: also ``merged/``, the experts merged into one MoE
    (``training.merge``, top-2, not fine-tuned)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_file = path / TOKENIZER
    tok = Tokenizer.train(TEXTS, vocab_size=400, min_frequency=1)
    tok.save(tok_file)
    cfg = ModelConfig.preset(preset, vocab_size=tok.vocab_size, max_seq_len=max_seq_len)
    models = []
    for i, name in enumerate(experts):
        torch.manual_seed(seed + i)
        meta = {"instruct": {"domains": [name], "from_batch": 0, "batches": 1}} if name in instruct else {}
        if name in tools:
            meta["tools"] = ["calculator"]
        models.append(Transformer(cfg).eval())
        save_lm(path / "experts" / name, models[-1], cfg, tokenizer_file=tok_file, meta=meta)
    if merged:
        from training.merge import merge_models

        moe = merge_models(models, top_k=min(2, len(models))).eval()
        save_lm(path / "merged", moe, moe.cfg, tokenizer_file=tok_file,
                meta={"init_from": "merge", "merged_from": list(experts)})
    torch.manual_seed(seed + 100)
    rcfg = RouterConfig.preset("tiny", vocab_size=tok.vocab_size)
    router = RouterModel(rcfg).eval()
    save_checkpoint(path / "router", router.state_dict(), config=rcfg.to_dict(), kind="router",
                    tokenizer_file=tok_file)
    return path


@contextlib.contextmanager
def running_app(args, *, num_cpus: float, wait_ready_s: float, proxy: str | None = None) -> Iterator[str]:
    """Start Ray + Serve with ``args`` on a free loopback port; yield its URL; shut both down."""
    import ray
    from ray import serve

    from serving.cli import start

    try:
        yield start(args, port=free_port(), num_cpus=num_cpus, wait_ready_s=wait_ready_s, proxy=proxy)
    finally:
        serve.shutdown()
        ray.shutdown()


HMOE = str(Path(sys.executable).with_name("hmoe"))


@contextlib.contextmanager
def serve_subprocess(run_dir: str | Path, port: int, *flags: str) -> Iterator[subprocess.Popen]:
    """``hmoe serve run_dir --port port *flags`` started as a user starts it (its own local Ray);
    yields the process once it prints that it is serving; killed at the end if still running."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY")}
    proc = subprocess.Popen([HMOE, "serve", str(run_dir), "--port", str(port), *flags],
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # the CLI prints its URL once /readyz answers 200
            lines.append(line)
            if line.startswith("hmoe is serving"):
                break
        else:
            raise RuntimeError("hmoe serve exited before serving:\n" + "".join(lines[-40:]))
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
