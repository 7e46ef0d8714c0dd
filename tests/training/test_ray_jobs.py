"""Ray orchestration: a task that fails at step k is retried and resumes from its checkpoint."""

from __future__ import annotations

import pytest

from training.loop import LoopConfig, read_metrics
from training.ray_jobs import submit_train

from .conftest import lm_task

pytestmark = pytest.mark.ray


def _cfg(fail_at: str) -> LoopConfig:
    return LoopConfig(max_steps=10, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=5, eval_batches=2,
                      ckpt_every=4, log_every=5, seed=1, device="cpu", fail_at=fail_at)


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_failed_task_is_retried_and_resumes(ray_local, synth_splits, tmp_path, mode):
    spec = "code:6" if mode == "raise" else "code:6:exit"  # exit: the worker process dies
    ref = submit_train(lm_task(synth_splits, "code", "experts/code"), _cfg(spec), tmp_path,
                       num_cpus=1, max_retries=2)
    res = ray_local.get(ref, timeout=300)
    assert res.steps == 10 and res.resumed_from == 4
    recs = read_metrics(tmp_path / "metrics" / "code.jsonl")
    steps = [r["step"] for r in recs if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]  # steps before the checkpoint ran once
    assert [r["step"] for r in recs if r.get("event") == "resume"] == [4]
    assert (tmp_path / ".injected-failures" / "code-6").exists()


def test_retries_exhausted_raises(ray_local, synth_splits, tmp_path):
    ray = ray_local
    ref = submit_train(lm_task(synth_splits, "math", "experts/math"), _cfg("math:3"), tmp_path,
                       num_cpus=1, max_retries=0)
    with pytest.raises(ray.exceptions.RayTaskError, match="injected failure"):
        ray.get(ref, timeout=300)
