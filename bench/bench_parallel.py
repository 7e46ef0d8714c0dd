"""Five tiny-preset experts trained as Ray tasks (1 CPU each) vs one after another in one process.

``bench.run_all`` writes ``bench/results/bench_parallel.json``. The sequential arm is one Ray task holding every core
that trains the five in turn, once with one thread and once with all threads (``ratio`` uses the
faster), so both arms run at the same (Ray worker) niceness on a shared machine; corpora are built before timing starts.
Run: ``.venv/bin/python -m bench.bench_parallel [--steps N]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from experts.device import available_cpus



def _train_all(jobs: list, run_dir: str, threads: int) -> None:
    from training.loop import train

    for job in jobs:
        train(job.task, job.loop.model_copy(update={"num_threads": threads, "progress": False}), run_dir)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _run(jobs: list, tmp: Path, num_cpus: float) -> dict[str, float]:
    import ray

    from training.ray_jobs import submit_train

    cpus = available_cpus()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    seq = ray.remote(_train_all).options(num_cpus=cpus, max_retries=0)
    t_seq1 = _timed(lambda: ray.get(seq.remote(jobs, str(tmp / "seq1"), 1)))
    t_par = _timed(lambda: ray.get([submit_train(j.task, j.loop, tmp / "ray", num_cpus=num_cpus, max_retries=0)
                                    for j in jobs]))
    share = round(cpus / len(jobs), 3)  # every expert at once, one thread each
    t_all = _timed(lambda: ray.get([submit_train(j.task, j.loop, tmp / "all", num_cpus=share, max_retries=0)
                                    for j in jobs]))
    t_seq = _timed(lambda: ray.get(seq.remote(jobs, str(tmp / "seq"), cpus)))
    ray.shutdown()
    return {"sequential_s": t_seq, "sequential_1thread_s": t_seq1, "ray_s": t_par, "ray_init_s": t_init,
            "ray_all_at_once_s": t_all, "all_at_once_num_cpus": share}


def main(argv: list[str] | None = None) -> dict:
    from training.data import build_corpora
    from training.pipeline import plan_jobs
    from training.run_config import load_run_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int)
    args = ap.parse_args(argv or [])  # bench.run_all calls main() without arguments
    logging.basicConfig(level=logging.WARNING)
    cfg = load_run_config(args.preset, {"train.steps": args.steps, "router.enabled": False})
    corpus = build_corpora(cfg.data.size, cfg.data.cache_dir, spec=cfg.data.corpus_spec())
    jobs = plan_jobs(cfg, corpus, corpus.tokenizer().vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        t = _run(jobs, Path(tmp), cfg.resources.num_cpus)
    seq, par = min(t["sequential_s"], t["sequential_1thread_s"]), t["ray_s"]
    res = {"preset": args.preset, "experts": len(jobs), "steps": cfg.train.steps, "cpus": available_cpus(),
           "sequential_s": round(seq, 2), "sequential_all_threads_s": round(t["sequential_s"], 2),
           "sequential_1thread_s": round(t["sequential_1thread_s"], 2),
           "ray_s": round(par, 2), "ray_num_cpus_per_task": cfg.resources.num_cpus,
           "ray_init_s": round(t["ray_init_s"], 2), "ratio": round(par / seq, 3), "goal_ratio": 0.6,
           "ray_all_at_once_s": round(t["ray_all_at_once_s"], 2),
           "all_at_once_num_cpus_per_task": t["all_at_once_num_cpus"],
           "ratio_all_at_once": round(t["ray_all_at_once_s"] / seq, 3),
           "load_avg_1m": round(__import__("os").getloadavg()[0], 2)}
    return res


if __name__ == "__main__":
    from bench.run_all import main as run_all

    raise SystemExit(run_all(["bench_parallel"]))
