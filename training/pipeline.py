"""A whole training run: corpora and tokenizer once, then experts (and baselines, router) as Ray tasks.

``run_pipeline(cfg)`` is what ``hmoe train`` calls, locally or as a ``ray job submit`` entrypoint.
Tasks already finished in the run directory are skipped, and unfinished ones resume from their
latest checkpoint, so re-running the same command after a crash continues the run.

Seed, then branch (Branch-Train-Merge, Li et al. 2022): with ``train.seed_fraction`` > 0, one seed LM
first trains on the mixed corpus for that share of the experts' budget, then every expert starts
from the seed's weights and trains on its own domain for the rest. The budget is
``len(experts) x train.steps`` optimizer steps either way, and the generalists get the FLOPs of the
whole system (seed plus branches).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experts.atomic import atomic_write_json, atomic_write_text
from experts.checkpoint import CheckpointError
from experts.config import ModelConfig
from router.domains import DOMAINS, GROUP_OF
from training.loop import FAIL_ENV, LoopConfig, TrainResult, load_result
from training.run_config import RunConfig, TrainSpec
from training.scoring import model_dir
from training.tasks import LMTask

log = logging.getLogger(__name__)



@dataclass
class Job:
    """One model to train: its task, loop settings and compute accounting."""

    task: LMTask
    loop: LoopConfig
    kind: str  # "seed" | "expert" | "merged" | "baseline"
    active_params: int
    extra: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()  # jobs that must finish first (a branch waits for the seed)


def resolve_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir or Path("runs") / cfg.name).expanduser().resolve()


def loop_config(spec: TrainSpec, *, steps: int, seed: int, device: str) -> LoopConfig:
    """The loop settings of one task from the run config's ``train`` section."""
    return LoopConfig(max_steps=steps, seed=seed, device=device, fail_at=os.environ.get(FAIL_ENV),
                      **spec.loop_settings())


def match_active_params(moe: ModelConfig, target: int) -> ModelConfig:
    """Choose ``moe.expert_hidden`` so that ``num_params(active=True)`` is closest to ``target``."""
    best = min(range(1, 4 * moe.d_model * 4),
               key=lambda h: abs(moe.replace(moe=dataclasses.replace(moe.moe, expert_hidden=h))
                                 .num_params(active=True) - target))
    return moe.replace(moe=dataclasses.replace(moe.moe, expert_hidden=best))


def _lm_task(cfg: RunConfig, corpus: Any, name: str, out_dir: str, model_cfg: ModelConfig,
             domains: tuple[str, ...], seed: int, init_from: str | None = None) -> LMTask:
    return LMTask(name=name, out_dir=out_dir, model_cfg=model_cfg,
                  train_paths=[str(corpus.tokens_path(d, "train")) for d in domains],
                  val_paths=[str(corpus.tokens_path(d, "val")) for d in domains],
                  batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len, seed=seed,
                  eval_batches=cfg.train.eval_batches, tokenizer_file=str(corpus.tokenizer_path),
                  meta={"domains": list(domains), "run": cfg.name}, init_from=init_from)


INSTRUCT_DIR = "instruct"


def with_instruct(task: LMTask, loop: LoopConfig, spec: TrainSpec, run_dir: Path,
                  domains: tuple[str, ...], fraction: float | None = None) -> LMTask:
    """``task`` with the instruction stage: the last ``fraction`` (default ``spec.instruct_fraction``)
    of its steps train on the instruction items of ``domains`` (written by :func:`write_instruct_items`;
    a domain whose corpus gave no items is left out, and with none left there is no instruction stage)."""
    from training.data.sft import count_items

    fraction = spec.instruct_fraction if fraction is None else fraction
    steps = round(fraction * loop.max_steps)
    paths = [run_dir / INSTRUCT_DIR / f"{d}.npz" for d in domains]
    paths = [p for p in paths if not p.is_file() or count_items(p)]
    if steps < 1 or not paths:
        return task
    return dataclasses.replace(task, instruct_paths=tuple(str(p) for p in paths),
                               instruct_from=(loop.max_steps - steps) * loop.grad_accum,
                               instruct_batches=steps * loop.grad_accum, instruct_replay=spec.instruct_replay)


def write_instruct_items(cfg: RunConfig, corpus: Any, run_dir: Path) -> None:
    """Encode each domain's instruction items once per run (``<run>/instruct/<domain>.npz``); the
    values the calculator writes into math replies are not trained on (``sft.untrain_tool_outputs``)."""
    from experts.calculator import Calculator
    from training.data.instruct import train_items
    from training.data.sft import encode_items, write_items

    tok = corpus.tokenizer()
    for d in cfg.experts:
        path = run_dir / INSTRUCT_DIR / f"{d}.npz"
        if not path.is_file():
            items = train_items(corpus, d, cfg.seed, cfg.train.expr_share)
            write_items(path, encode_items(tok, items, cfg.train.seq_len + 1,
                                           tool=Calculator(tok) if d == "math" else None))
            log.info("instruction items for %s: %d", d, len(items))
            if not items:
                log.warning("the %s corpus gives no instruction items: its models skip that domain's "
                            "instruction stage", d)


def budget_steps(spec: TrainSpec, n_experts: int) -> tuple[int, int]:
    """(seed steps, steps per expert) that split the experts' budget of ``n_experts x spec.steps``."""
    if spec.seed_fraction == 0:
        return 0, spec.steps
    total = n_experts * spec.steps
    seed = max(1, round(spec.seed_fraction * total))
    return seed, max(1, round((total - seed) / n_experts))


def _out(name: str) -> str:
    """Where, inside the run directory, the model ``name`` is written (``training.scoring.model_dir``:
    the one definition of a run's layout, which the report and serving read)."""
    return str(model_dir("", name))


def replay_sources(cfg: RunConfig, domain: str) -> tuple[str, ...]:
    """The domains whose training corpora ``domain``'s branch replays (``train.branch_replay_from``)."""
    source = cfg.train.replay_from_for(domain)
    if source == "seed":
        return tuple(cfg.experts)
    if source != "group":
        return (source,)
    return tuple(x for x in cfg.experts if x != domain and GROUP_OF[x] == GROUP_OF[domain])


def plan_jobs(cfg: RunConfig, corpus: Any, vocab_size: int, run_dir: Path | None = None) -> list[Job]:
    """The seed (if any), the experts, then (with baselines enabled) the dense and token-MoE
    generalists with the FLOPs of the whole expert system. Jobs come in submission order: the seed
    first (five branches wait for it), then the generalists, then the branches."""
    expert_cfg = cfg.model.build(vocab_size=vocab_size)
    active = expert_cfg.num_params(active=True)
    seed_steps, branch_steps = budget_steps(cfg.train, len(cfg.experts))
    run_dir = run_dir or resolve_run_dir(cfg)
    jobs, experts = [], []
    if seed_steps:
        task = _lm_task(cfg, corpus, "seed", _out("seed"), expert_cfg, cfg.experts, cfg.seed + 200)
        # under warmup-stable-decay the seed stops before its decay: each branch decays on its own domain
        loop = loop_config(cfg.train, steps=seed_steps, seed=cfg.seed + 200, device=cfg.device)
        if loop.schedule == "wsd":
            loop = loop.model_copy(update={"decay_fraction": 0.0})
        task = with_instruct(task, loop, cfg.train, run_dir, cfg.experts, cfg.train.seed_instruct_fraction)
        jobs.append(Job(task, loop, "seed", active))
    init = str(model_dir(run_dir, "seed")) if seed_steps else None
    for d in cfg.experts:
        seed = cfg.seed + DOMAINS.index(d)
        task = _lm_task(cfg, corpus, d, _out(d), expert_cfg, (d,), seed, init_from=init)
        loop = loop_config(cfg.train, steps=branch_steps, seed=seed, device=cfg.device)
        if init is not None:
            loop = loop.model_copy(update={"non_ffn_lr_scale": cfg.train.non_ffn_lr_for(d)})
            replay, sources = cfg.train.replay_for(d), replay_sources(cfg, d)
            if replay and sources:
                task = dataclasses.replace(task, replay=replay, replay_paths=tuple(
                    str(corpus.tokens_path(x, "train")) for x in sources))
        experts.append(Job(with_instruct(task, loop, cfg.train, run_dir, (d,)), loop, "expert", active,
                           after=("seed",) if seed_steps else ()))
    per_step = cfg.train.tokens_per_step  # the same for every model of the run
    budget = (seed_steps + len(cfg.experts) * branch_steps) * per_step * expert_cfg.flops_per_token(cfg.train.seq_len)
    if cfg.merge.enabled:
        merged = merged_job(cfg, corpus, expert_cfg, run_dir)
        experts.append(merged)
        budget += merged.loop.max_steps * per_step * merged.task.model_cfg.flops_per_token(cfg.train.seq_len)
    if cfg.baselines.enabled:
        dense_cfg = cfg.baselines.dense.build(vocab_size=vocab_size) if cfg.baselines.dense else expert_cfg
        moe_cfg = cfg.baselines.moe.build(vocab_size=vocab_size)
        if cfg.baselines.match_active_params:
            moe_cfg = match_active_params(moe_cfg, active)
        for kind, mcfg in (("dense", dense_cfg), ("moe", moe_cfg)):
            if kind not in cfg.baselines.kinds:
                continue
            steps = max(1, round(budget / (per_step * mcfg.flops_per_token(cfg.train.seq_len))))
            task = _lm_task(cfg, corpus, f"baseline-{kind}", _out(f"baseline-{kind}"), mcfg, cfg.experts, cfg.seed + 100)
            loop = loop_config(cfg.train, steps=steps, seed=cfg.seed + 100, device=cfg.device)
            jobs.append(Job(with_instruct(task, loop, cfg.train, run_dir, cfg.experts), loop,
                            "baseline", mcfg.num_params(active=True),
                            {"compute_budget_flops": budget}))
    return jobs + experts


def merged_job(cfg: RunConfig, corpus: Any, expert_cfg: ModelConfig, run_dir: Path) -> Job:
    """Branch-Train-MiX: the finished experts merged into one MoE (``training.merge``), fine-tuned on
    the mixed corpus for ``merge.steps``, the last ``train.instruct_fraction`` of them on every
    domain's instruction items as the experts' own last stage was; it waits for every expert."""
    from training.merge import merged_config

    mcfg = merged_config(expert_cfg, len(cfg.experts), cfg.merge.top_k, cfg.merge.route, cfg.merge.gate_context,
                         doc_start_id=corpus.tokenizer().bos_id, gate_scope=cfg.merge.gate_scope)
    task = _lm_task(cfg, corpus, "merged", _out("merged"), mcfg, cfg.experts, cfg.seed + 300)
    task = dataclasses.replace(task, merge_from=tuple(str(model_dir(run_dir, d)) for d in cfg.experts),
                               merge_tokens=tuple(str(corpus.tokens_path(d, "train")) for d in cfg.experts),
                               trainable=cfg.merge.train, gate_init=cfg.merge.gate_init,
                               merge_router=str(run_dir / "router") if mcfg.model_router else None)
    loop = loop_config(cfg.train, steps=cfg.merge.steps, seed=cfg.seed + 300, device=cfg.device)
    s = cfg.merge.lr_scale
    gate = 1.0 if cfg.merge.router_lr is None else cfg.merge.router_lr / s  # relative to the scaled lr
    loop = loop.model_copy(update={"lr": loop.lr * s, "min_lr": loop.min_lr * s, "muon_lr": loop.muon_lr * s,
                                   "gate_lr_scale": gate})
    task = dataclasses.replace(task, meta={**task.meta, "lr_scale": s, "router_lr": cfg.merge.router_lr})
    task = with_instruct(task, loop, cfg.train, run_dir, cfg.experts)
    return Job(task, loop, "merged", mcfg.num_params(active=True),
               after=(*cfg.experts, *(("router",) if mcfg.model_router else ())))


def _finished(run_dir: Path, job: Job) -> TrainResult | None:
    res = load_result(run_dir, job.task.out_dir)
    return res if res is not None and res.steps >= job.loop.max_steps else None


def prepare(cfg: RunConfig) -> tuple[Path, Any]:
    """Write ``run.yaml`` and build (or load) the corpora and tokenizer, once, in the driver."""
    from training.data import build_corpora

    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "run.yaml", cfg.model_copy(update={"run_dir": str(run_dir)}).to_yaml())
    t0 = time.perf_counter()
    corpus = build_corpora(cfg.data.size, cfg.data.cache_dir, spec=cfg.data.corpus_spec())
    log.info("corpora %s ready in %.1fs at %s", corpus.name, time.perf_counter() - t0, corpus.root)
    if cfg.train.instruct_fraction > 0 or cfg.train.seed_instruct_fraction > 0:
        write_instruct_items(cfg, corpus, run_dir)
    return run_dir, corpus


def run_pipeline(cfg: RunConfig, *, ray_address: str | None = None, report: bool = True) -> dict[str, Any]:
    """Train every model of ``cfg`` through Ray, then write the report; returns a summary dict."""
    from training import ray_jobs

    t0 = time.perf_counter()
    run_dir, corpus = prepare(cfg)
    vocab = corpus.tokenizer().vocab_size
    jobs = plan_jobs(cfg, corpus, vocab, run_dir)
    ray_jobs.init_ray(ray_address)
    results, refs = _submit(cfg, jobs, run_dir)
    router_ref = _submit_router(cfg, corpus, run_dir) if cfg.router.enabled else None
    if router_ref is not None:
        refs["router"] = router_ref
    results.update(_gather(refs))
    summary = _summary(cfg, run_dir, jobs, results, time.perf_counter() - t0)
    if report:
        from training.report import write_report
        write_report(run_dir, corpus=corpus, run_cfg=cfg)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _submit(cfg: RunConfig, jobs: list[Job], run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit the unfinished ``jobs`` as Ray tasks, in order (a job's ``after`` must come before it:
    the seed first, since the branches wait for it; then the generalists, which fill the other slots
    while the seed trains; then the branches). Returns (results of finished jobs, refs of submitted)."""
    from training import ray_jobs

    results, refs, r = {}, {}, cfg.resources
    for job in jobs:
        done = _finished(run_dir, job)
        if done is not None:
            log.info("%s already trained (%d steps); skipping", job.task.name, done.steps)
            results[job.task.name] = done
            continue
        after = [refs[a] for a in job.after if a in refs]
        refs[job.task.name] = ray_jobs.submit_train(job.task, job.loop, run_dir, num_cpus=r.num_cpus,
                                                    num_gpus=r.num_gpus, max_retries=r.max_retries, after=after)
    return results, refs


def merge_run(cfg: RunConfig, *, ray_address: str | None = None, report: bool = True) -> Path:
    """``hmoe merge``: merge a finished run's experts and fine-tune the merged model (its other models
    are left as they are: generalists trained before count the compute they were planned with)."""
    from training import ray_jobs

    _same_merge(resolve_run_dir(cfg), cfg)
    run_dir, corpus = prepare(cfg)
    missing = [d for d in cfg.experts if load_result(run_dir, _out(d)) is None]
    if missing:
        raise CheckpointError(f"{run_dir}: experts {missing} have not finished training; run `hmoe train` first")
    job = merged_job(cfg, corpus, cfg.model.build(vocab_size=corpus.tokenizer().vocab_size), run_dir)
    if _finished(run_dir, job) is None:
        ray_jobs.init_ray(ray_address)
        _gather(_submit(cfg, [job], run_dir)[1])
    if report:
        from training.report import write_report
        write_report(run_dir, corpus=corpus, run_cfg=cfg)
    return model_dir(run_dir, "merged")


def _same_merge(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to pass off a finished merged model as the one asked for when it was merged otherwise."""
    from experts.checkpoint import read_meta
    from training.merge import route_of

    if load_result(run_dir, "merged") is None:
        return
    meta = read_meta(model_dir(run_dir, "merged"), kind="lm", verify=False)
    mcfg, m = ModelConfig.from_dict(meta["config"]), cfg.merge
    old = {"steps": meta["train"]["steps"], "train": meta.get("trainable"), "gate_init": meta.get("gate_init"),
           "top_k": mcfg.moe.top_k, "gate_context": mcfg.moe.gate_context, "route": route_of(mcfg),
           "gate_scope": mcfg.moe.gate_scope,
           "lr_scale": meta.get("lr_scale", 1.0), "router_lr": meta.get("router_lr")}
    new = {"steps": m.steps, "train": m.train, "gate_init": m.gate_init, "top_k": m.top_k,
           "gate_context": m.gate_context, "route": m.route, "lr_scale": m.lr_scale, "router_lr": m.router_lr,
           "gate_scope": m.gate_scope}
    differ = [f"{k} {old[k]!r} (asked: {new[k]!r})" for k in new if old[k] != new[k]]
    if differ:
        raise CheckpointError(f"{model_dir(run_dir, 'merged')} was merged with {', '.join(differ)}; move it "
                              "away (or delete it) to merge again with these settings")


def _gather(refs: dict[str, Any]) -> dict[str, Any]:
    """Wait for every task, logging each as it finishes; raise naming the tasks that failed."""
    import ray

    names = {ref: name for name, ref in refs.items()}
    pending, out, failed = list(refs.values()), {}, {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        name = names[ready[0]]
        try:
            out[name] = ray.get(ready[0])
            log.info("finished %s (%d left)", name, len(pending))
        except Exception as e:  # noqa: BLE001 - collect every failure, then raise once
            failed[name] = e
            log.error("%s failed after its retries: %s", name, e)
    if failed:
        raise RuntimeError(f"training failed for {sorted(failed)}: "
                           + "; ".join(f"{k}: {type(v).__name__}: {v}" for k, v in failed.items()))
    return out


def _summary(cfg: RunConfig, run_dir: Path, jobs: list[Job], results: dict[str, Any], wall: float) -> dict:
    models = {}
    for job in jobs:
        res = results.get(job.task.name)
        models[job.task.name] = {"kind": job.kind, "out_dir": job.task.out_dir, "steps": job.loop.max_steps,
                                 "active_params": job.active_params,
                                 "total_params": job.task.model_cfg.num_params(),
                                 "tokens": getattr(res, "tokens", None), "flops": getattr(res, "flops", None),
                                 "compute": (getattr(res, "tokens", 0) or 0) * job.active_params,
                                 "init_from": job.task.init_from and Path(job.task.init_from).name, **job.extra}
    if "router" in results:
        models["router"] = {"kind": "router", "out_dir": "router",
                            "steps": getattr(results["router"], "steps", None)}
    return {"run": cfg.name, "run_dir": str(run_dir), "train_wall_s": round(wall, 2), "models": models}


# ---- the router hook --------------------------------------------------------------------------
def _submit_router(cfg: RunConfig, corpus: Any, run_dir: Path) -> Any:
    """Train the router as a Ray task (``training.router_train``)."""
    if load_result(run_dir, "router") is not None:
        log.info("router already trained; skipping")
        return None
    from training import ray_jobs

    r = cfg.resources
    kwargs = {"corpus_root": str(corpus.root), "corpus_name": corpus.name, "run_dir": str(run_dir),
              "steps": cfg.router.steps, "per_domain": cfg.router.per_domain, "seed": cfg.seed,
              "device": cfg.device}
    return ray_jobs.submit_call("router", "training.pipeline:train_router_task", kwargs,
                                num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_retries=r.max_retries)


def train_router_task(corpus_root: str, corpus_name: str, run_dir: str, steps: int | None,
                      per_domain: int | None, seed: int, device: str) -> Any:
    """Inside a Ray task: load the corpus and call ``training.router_train.train_router``."""
    import torch

    from training.data import load_corpora
    from training.router_train import RouterTrainConfig, train_router

    corpus = load_corpora(Path(corpus_root).parent, corpus_name)
    tc = {"seed": seed}
    if steps is not None:
        tc.update(max_steps=steps, eval_every=max(1, steps // 4))
    if per_domain is not None:
        tc.update(per_domain=per_domain, val_per_domain=max(10, per_domain // 5))
    return train_router(corpus, corpus.tokenizer(), run_dir, train_cfg=RouterTrainConfig(**tc),
                        tokenizer_file=str(corpus.tokenizer_path), device=device, progress=False,
                        num_threads=torch.get_num_threads())
