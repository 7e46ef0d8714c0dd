"""Five tiny-preset experts trained as Ray tasks (1 CPU each) vs one after another in one process.

Writes ``bench/results/parallel.json``. The sequential baseline gives its single process every
core (the best one process can do); corpora are built before either timing starts.
Run: ``.venv/bin/python -m bench.bench_parallel [--steps N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from experts.device import available_cpus

OUT = Path(__file__).parent / "results" / "parallel.json"


def _sequential(jobs: list, run_dir: Path, threads: int) -> float:
    from training.loop import train

    t0 = time.perf_counter()
    for job in jobs:
        train(job.task, dataclasses.replace(job.loop, num_threads=threads, progress=False), run_dir)
    return time.perf_counter() - t0


def _ray(jobs: list, run_dir: Path, num_cpus: float) -> tuple[float, float]:
    import ray

    from training.ray_jobs import submit_train

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.get([submit_train(j.task, j.loop, run_dir, num_cpus=num_cpus, max_retries=0) for j in jobs])
    wall = time.perf_counter() - t0
    ray.shutdown()
    return wall, t_init


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
    corpus = build_corpora(cfg.data.size, cfg.data.cache_dir)
    jobs = plan_jobs(cfg, corpus, corpus.tokenizer().vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        seq = _sequential(jobs, Path(tmp) / "seq", available_cpus())
        par, t_init = _ray(jobs, Path(tmp) / "ray", cfg.resources.num_cpus)
    res = {"preset": args.preset, "experts": len(jobs), "steps": cfg.train.steps, "cpus": available_cpus(),
           "sequential_s": round(seq, 2), "sequential_threads": available_cpus(),
           "ray_s": round(par, 2), "ray_num_cpus_per_task": cfg.resources.num_cpus,
           "ray_init_s": round(t_init, 2), "ratio": round(par / seq, 3),
           "ratio_incl_ray_init": round((par + t_init) / seq, 3), "goal_ratio": 0.6}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
