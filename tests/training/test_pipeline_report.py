"""A tiny run end to end through Ray: checkpoints per expert, a report with a row per model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from experts.checkpoint import read_meta
from experts.domains import DOMAINS
from training.pipeline import match_active_params, plan_jobs
from training.report import distinct_2, write_report
from training.scoring import Cell
from training.run_config import RunConfigError, load_run_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    from training.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_run_config("tiny", {"run_dir": str(run_dir), "train.steps": 12, "train.eval_every": 6,
                                   "train.ckpt_every": 6, "router.enabled": False, "train.seed_fraction": 0.25,
                                   "train.instruct_fraction": 0.34, "report.gen_items": 2,
                                   "baselines.enabled": True, "experts": "math,reasoning,code"})
    summary = run_pipeline(cfg)
    return run_dir, cfg, summary


def test_run_has_checkpoints_and_report(tiny_run):
    run_dir, cfg, summary = tiny_run
    # a budget of 3 x 12 steps: the seed takes 9 on the mixed corpus, each branch 9 on its domain
    assert read_meta(run_dir / "seed", kind="lm")["train"]["steps"] == 9
    for d in cfg.experts:
        meta = read_meta(run_dir / "experts" / d, kind="lm")
        assert meta["train"]["steps"] == 9 and meta["init_from"] == "seed"
        # the last 3 of the 9 steps are the instruction stage, on the expert's own domain
        assert meta["instruct"] == {"domains": [d], "from_batch": 6, "batches": 3, "replay": 0.5}
    assert read_meta(run_dir / "baselines" / "dense", kind="lm")["instruct"]["domains"] == list(cfg.experts)
    assert "instruct" not in read_meta(run_dir / "seed", kind="lm")
    rep = json.loads((run_dir / "report" / "report.json").read_text())
    assert set(rep["matrix"]) == {*cfg.experts, "seed", "baseline-dense", "baseline-moe"}  # a row per model
    for row in rep["matrix"].values():  # a column per domain, finite numbers
        assert set(row) == {"math", "reasoning", "conversation", "knowledge", "code"}
        assert all(c["ppl"] > 1 and 0 < c["bpb"] < 20 for c in row.values())
    assert {"math", "reasoning"} <= set(rep["generation"])
    # task scores: each expert on its own domain's held-out items, and every generalist
    assert set(rep["tasks"]) == {"math", "reasoning", "conversation", "knowledge", "code"}
    assert set(rep["tasks"]["math"]) == {"math", "baseline-dense", "baseline-moe"}
    math = rep["tasks"]["math"]["math"]
    assert math["n"] > 0 and 0 <= math["exact_match"] <= 1 and "arithmetic_+" in math["by_family"]
    assert set(rep["tasks"]["conversation"]) == {"baseline-dense", "baseline-moe"}  # no conversation expert
    assert 0 <= rep["tasks"]["code"]["code"]["parse_rate"] <= 1
    assert 0 <= rep["tasks"]["code"]["code"]["finished_rate"] <= 1
    for f in ("report.md", "matrix_ppl.png", "loss_curves.png"):
        assert (run_dir / "report" / f).stat().st_size > 0
    assert rep["compute"]["math"]["tokens"] == 9 * cfg.train.tokens_per_step
    assert rep["compute"]["seed"]["tokens"] == 9 * cfg.train.tokens_per_step
    # the generalists really consumed the FLOPs of seed + branches, and the report says so
    sc = rep["system_compute"]
    assert sc["parts"]["experts"] == [*cfg.experts, "seed"]
    assert sc["flops"]["experts"] == pytest.approx(sum(rep["compute"][n]["flops"] for n in sc["parts"]["experts"]))
    assert sc["matched"] and all(abs(r - 1) <= 0.02 for r in sc["ratio_to_experts"].values())
    assert set(rep["ratios"]) >= {"baseline-moe/dense", "seed/dense"}
    md = (run_dir / "report" / "report.md").read_text()
    assert "compute-matched: training FLOPs within 2%" in md and "no row scores those tokens" in md
    assert "## Task scores on held-out items" in md


def test_rerun_skips_finished_and_extra_rows(tiny_run):
    from training.pipeline import run_pipeline

    run_dir, cfg, _ = tiny_run
    before = {f.name: f.read_text() for f in (run_dir / "metrics").glob("*.jsonl")}
    run_pipeline(cfg, report=False)  # every task already finished: nothing is retrained
    assert {f.name: f.read_text() for f in (run_dir / "metrics").glob("*.jsonl")} == before
    extra = [lambda ctx: {"ensemble": {d: Cell(1.0, 1, 1) for d in ctx.domains}}]
    rep = write_report(run_dir, corpus=None, run_cfg=cfg, extra_rows=extra)
    assert "ensemble" in rep["matrix"] and rep["matrix"]["ensemble"]["math"]["ppl"] == pytest.approx(2.718, 1e-3)


@pytest.mark.parametrize("seed_fraction", [0.0, 0.3])
def test_baselines_get_the_flops_of_seed_and_branches(seed_fraction):
    from training.data import load_corpora
    from training.pipeline import budget_steps

    cfg = load_run_config("tiny", {"baselines.enabled": True, "train.seed_fraction": seed_fraction})
    corpus = load_corpora(None, "tiny")
    plan = plan_jobs(cfg, corpus, corpus.tokenizer().vocab_size)
    jobs = {j.task.name: j for j in plan}
    expert, dense, moe = jobs["math"], jobs["baseline-dense"], jobs["baseline-moe"]
    seed_steps, branch_steps = budget_steps(cfg.train, 5)
    assert expert.loop.max_steps == branch_steps
    assert seed_steps + 5 * branch_steps == pytest.approx(5 * cfg.train.steps, abs=3)
    if seed_fraction:
        assert plan[0].task.name == "seed" and seed_steps == round(0.3 * 5 * cfg.train.steps)
        assert all(jobs[d].after == ("seed",) and jobs[d].task.init_from.endswith("/seed") for d in cfg.experts)
    else:
        assert "seed" not in jobs and expert.task.init_from is None and expert.after == ()
    assert moe.task.model_cfg.ffn == "moe"
    assert abs(moe.active_params - expert.active_params) / expert.active_params < 0.01
    per_step = cfg.train.tokens_per_step
    budget = (seed_steps + 5 * branch_steps) * per_step * expert.task.flops_per_token()
    for b in (dense, moe):
        assert abs(b.loop.max_steps * per_step * b.task.flops_per_token() - budget) / budget < 0.01
        assert len(b.task.train_paths) == 5


def test_the_seed_can_end_on_instruction_items_and_branches_can_keep_their_shared_weights():
    from training.data import load_corpora

    corpus = load_corpora(None, "tiny")
    ov = {"baselines.enabled": True, "train.seed_fraction": 0.3, "train.instruct_fraction": 0.5,
          "train.seed_instruct_fraction": 0.25, "train.branch_non_ffn_lr": 0.1}
    jobs = {j.task.name: j for j in plan_jobs(load_run_config("tiny", ov), corpus, corpus.tokenizer().vocab_size)}
    seed = jobs["seed"]
    assert seed.task.instruct_batches == round(0.25 * seed.loop.max_steps)
    assert seed.task.instruct_from == seed.loop.max_steps - seed.task.instruct_batches
    assert len(seed.task.instruct_paths) == 5  # every domain's items
    assert jobs["math"].loop.non_ffn_lr_scale == 0.1 and jobs["math"].task.instruct_batches > 0
    assert seed.loop.non_ffn_lr_scale == 1.0 and jobs["baseline-dense"].loop.non_ffn_lr_scale == 1.0
    default = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {"train.seed_fraction": 0.3}), corpus,
                                                 corpus.tokenizer().vocab_size)}
    assert default["seed"].task.instruct_batches == 0 and default["math"].loop.non_ffn_lr_scale == 1.0
    # a multiple per domain: the named branch keeps its shared weights, the others learn them at full rate
    one = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {"train.seed_fraction": 0.3,
                                                                     "train.branch_non_ffn_lr": {"reasoning": 0.1}}),
                                             corpus, corpus.tokenizer().vocab_size)}
    assert one["reasoning"].loop.non_ffn_lr_scale == 0.1
    assert one["math"].loop.non_ffn_lr_scale == 1.0 and one["seed"].loop.non_ffn_lr_scale == 1.0
    with pytest.raises(RunConfigError, match=r"branch_non_ffn_lr for reasoning is 1.5: a multiple must be in \[0, 1\]"):
        load_run_config("tiny", {"train.branch_non_ffn_lr": {"reasoning": 1.5}})
    with pytest.raises(RunConfigError, match="poetry"):
        load_run_config("tiny", {"train.branch_non_ffn_lr": {"poetry": 0.5}})


def test_baselines_kinds_choose_the_generalists():
    from training.data import load_corpora

    corpus = load_corpora(None, "tiny")
    cfg = load_run_config("tiny", {"baselines.enabled": True, "baselines.kinds": ["dense"]})
    names = {j.task.name for j in plan_jobs(cfg, corpus, corpus.tokenizer().vocab_size)}
    assert "baseline-dense" in names and "baseline-moe" not in names
    with pytest.raises(RunConfigError, match="baselines.kinds"):
        load_run_config("tiny", {"baselines.kinds": ["sparse"]})


def test_match_active_params_and_distinct2():
    from experts.config import ModelConfig
    dense = ModelConfig.preset("small")
    moe = match_active_params(ModelConfig.preset("small-moe"), dense.num_params(active=True))
    assert abs(moe.num_params(active=True) - dense.num_params(active=True)) < 3 * moe.d_model * 3
    assert distinct_2([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 5)
    assert distinct_2([1, 2, 3, 4]) == 1.0


def test_cli_report_and_errors(tiny_run, capsys):
    from serving.command import main

    run_dir, _, _ = tiny_run
    assert main(["report", str(run_dir)]) == 0
    assert "| math |" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny", "--steps", "0"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert main(["report", str(run_dir / "nope")]) == 2


def test_a_merged_model_waits_for_the_experts_and_its_fine_tune_counts_for_the_generalists():
    from training.data import load_corpora

    corpus = load_corpora(None, "tiny")
    ov = {"baselines.enabled": True, "merge.enabled": True, "merge.top_k": 2, "merge.steps": 7,
          "merge.train": "routers", "merge.lr_scale": 0.25, "train.seed_fraction": 0.3,
          "train.instruct_fraction": 0.5}
    cfg = load_run_config("tiny", ov)
    jobs = {j.task.name: j for j in plan_jobs(cfg, corpus, corpus.tokenizer().vocab_size)}
    merged, expert, dense = jobs["merged"], jobs["math"], jobs["baseline-dense"]
    assert merged.after == cfg.experts and merged.loop.max_steps == 7 and merged.task.trainable == "routers"
    # the fine-tune runs at a quarter of the experts' learning rates, and its checkpoint says so
    assert [getattr(merged.loop, k) for k in ("lr", "min_lr", "muon_lr")] == pytest.approx(
        [0.25 * getattr(expert.loop, k) for k in ("lr", "min_lr", "muon_lr")])
    assert merged.task.meta["lr_scale"] == 0.25 and "lr_scale" not in expert.task.meta
    assert merged.loop.gate_lr_scale == 1.0 and merged.task.meta["router_lr"] is None  # routers as the rest
    faster = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {**ov, "merge.router_lr": 0.5}), corpus,
                                                corpus.tokenizer().vocab_size)}["merged"]
    assert faster.loop.gate_lr_scale * faster.loop.lr == pytest.approx(0.5 * expert.loop.lr)  # the experts' x 0.5
    assert merged.task.model_cfg.moe.n_experts == 5 and merged.task.model_cfg.moe.top_k == 2
    one_ov = {**ov, "merge.gate_scope": "model", "merge.gate_context": "doc", "merge.train": "all"}
    one = {j.task.name: j for j in plan_jobs(load_run_config("tiny", one_ov), corpus, corpus.tokenizer().vocab_size,
                                             Path("runs/x"))}["merged"]
    assert one.task.model_cfg.model_router and not merged.task.model_cfg.model_router  # one router, or one a module
    assert one.after == (*cfg.experts, "router") and one.task.merge_router == str(Path("runs/x") / "router")
    for bad, says in (({"merge.train": "routers"}, "keeps the run's router"), ({"experts": "math,code"}, "over all of"),
                      ({"router.enabled": False}, "over all of")):
        with pytest.raises(RunConfigError, match=says):
            load_run_config("tiny", {**one_ov, **bad})
    # its fine-tune ends, as the experts' training did, on every domain's instruction items
    assert merged.task.instruct_batches == 4 and merged.task.instruct_from == 3
    assert [p.rsplit("/", 1)[-1] for p in merged.task.instruct_paths] == [f"{d}.npz" for d in cfg.experts]
    assert [p.rsplit("/", 1)[-1] for p in merged.task.merge_from] == list(cfg.experts)
    per_step = cfg.train.tokens_per_step
    total = sum(j.loop.max_steps * per_step * j.task.flops_per_token() for n, j in jobs.items()
                if not n.startswith("baseline-"))
    assert abs(dense.loop.max_steps * per_step * dense.task.flops_per_token() - total) / total < 0.01
    assert merged.task.flops_per_token() > expert.task.flops_per_token()  # two routed FFNs per token
    with pytest.raises(RunConfigError, match="top_k"):
        load_run_config("tiny", {"merge.enabled": True, "merge.top_k": 3, "experts": "math,code"})


def test_hmoe_merge_adds_the_merged_model_to_the_report(tiny_run, capsys, tmp_path):
    """Last in this module: it adds a row to the shared run."""
    from serving.command import main

    run_dir, cfg, _ = tiny_run
    assert main(["merge", str(run_dir), "--top-k", "2", "--steps", "4", "--train", "all"]) == 0
    meta = read_meta(run_dir / "merged", kind="lm")
    assert meta["merged_from"] == list(cfg.experts) and meta["train"]["steps"] == 4
    rep = json.loads((run_dir / "report" / "report.json").read_text())
    assert "merged" in rep["matrix"] and "merged/dense" in rep["ratios"]
    sc = rep["system_compute"]
    assert sc["flops"]["merged"] == pytest.approx(sc["flops"]["experts"] + rep["compute"]["merged"]["flops"])
    mr = rep["merged_routing"]  # per layer: each domain's tokens spread over the top-2 of five experts
    assert mr["experts"] == list(cfg.experts) and len(mr["own"]) == cfg.model.build(vocab_size=10).n_layers
    assert all(sum(s.values()) == pytest.approx(2.0, abs=1e-3) for layer in mr["top_k_share"] for s in layer.values())
    assert (run_dir / "report" / "merged_routing.png").is_file()
    assert "## Merged model" in (run_dir / "report" / "report.md").read_text()
    assert main(["merge", str(run_dir / "nope")]) == 2
    before = (run_dir / "run.yaml").read_text()
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--top-k", "2", "--steps", "4", "--train", "routers"]) == 2
    err = capsys.readouterr().err
    assert "was merged with train 'all' (asked: 'routers')" in err and "move it away" in err, err
    assert main(["merge", str(run_dir), "--top-k", "2", "--steps", "4", "--train", "all", "--gate-scope", "model",
                 "--gate-context", "doc"]) == 2
    assert "train every expert and the router, or use gate_scope 'layer'" in capsys.readouterr().err  # a 2-expert run
    assert main(["merge", str(run_dir), "--top-k", "2", "--steps", "4", "--train", "all", "--lr-scale", "1"]) == 2
    assert f"lr_scale {cfg.merge.lr_scale!r} (asked: 1.0)" in capsys.readouterr().err
    assert (run_dir / "run.yaml").read_text() == before  # the refused settings are not written
    copy = tmp_path / "copy"  # a copy of the run, merged otherwise: into the copy, the original untouched
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("merged", "merged.jsonl", "report"))
    stamp = (run_dir / "merged" / "meta.json").read_text()
    assert main(["merge", str(copy), "--top-k", "2", "--steps", "3", "--train", "routers"]) == 0
    assert read_meta(copy / "merged", kind="lm")["trainable"] == "routers"
    assert (run_dir / "merged" / "meta.json").read_text() == stamp and (run_dir / "run.yaml").read_text() == before


def test_branch_replay_mixes_the_seeds_corpus_into_each_branch_at_its_share():
    from training.data import load_corpora
    from training.data.packing import load_tokens

    corpus = load_corpora(None, "tiny")
    cfg = load_run_config("tiny", {"train.seed_fraction": 0.3, "train.branch_replay": 0.25})
    jobs = {j.task.name: j for j in plan_jobs(cfg, corpus, corpus.tokenizer().vocab_size)}
    task = jobs["code"].task
    assert task.replay == 0.25 and [p.split("/")[-2] for p in task.replay_paths] == list(cfg.experts)
    assert jobs["seed"].task.replay == 0.0  # only branches replay
    own = load_tokens(task.train_paths[0]).tobytes()
    it = task.train_batches()
    batches = [next(it)[0] for _ in range(8)]
    from_own = [b[0, :16].numpy().astype(load_tokens(task.train_paths[0]).dtype).tobytes() in own for b in batches]
    assert from_own == [True, True, True, False] * 2  # every 4th batch replays the mixed corpus
    state = it.state_dict()  # and the stream resumes exactly
    nxt = next(it)[0]
    again = task.train_batches()
    again.load_state_dict(state)
    assert (next(again)[0] == nxt).all()
    plain = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {"train.seed_fraction": 0.3}), corpus,
                                               corpus.tokenizer().vocab_size)}
    assert plain["code"].task.replay == 0.0
    with pytest.raises(RunConfigError, match="branch_replay"):
        load_run_config("tiny", {"train.branch_replay": 1.0})
    # a share per domain: the named branch replays, the others do not
    one = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {"train.seed_fraction": 0.3,
                                                                     "train.branch_replay": {"code": 0.5}}),
                                             corpus, corpus.tokenizer().vocab_size)}
    assert one["code"].task.replay == 0.5 and one["math"].task.replay == 0.0 and one["seed"].task.replay == 0.0
    with pytest.raises(RunConfigError, match="branch_replay"):
        load_run_config("tiny", {"train.branch_replay": {"code": 1.0}})
    with pytest.raises(RunConfigError, match="poetry"):
        load_run_config("tiny", {"train.branch_replay": {"poetry": 0.5}})
    # replaying the group's other corpora instead of the seed's: reasoning replays math, code nothing
    grp = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {"train.seed_fraction": 0.3, "train.branch_replay": 0.25,
                                                                     "train.branch_replay_from": "group"}),
                                             corpus, corpus.tokenizer().vocab_size)}
    assert [p.split("/")[-2] for p in grp["reasoning"].task.replay_paths] == ["math"]
    assert [p.split("/")[-2] for p in grp["conversation"].task.replay_paths] == ["knowledge"]
    assert grp["code"].task.replay == 0.0 and grp["code"].task.replay_paths == ()
    with pytest.raises(RunConfigError, match="branch_replay_from"):
        load_run_config("tiny", {"train.branch_replay_from": "everything"})
    # a choice per domain: conversation replays knowledge, reasoning the seed's corpus (every domain)
    per = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {
        "train.seed_fraction": 0.3, "train.branch_replay": {"reasoning": 0.2, "conversation": 0.3},
        "train.branch_replay_from": {"conversation": "group"}}), corpus, corpus.tokenizer().vocab_size)}
    assert [p.split("/")[-2] for p in per["conversation"].task.replay_paths] == ["knowledge"]
    assert [p.split("/")[-2] for p in per["reasoning"].task.replay_paths] == list(DOMAINS)
    assert per["math"].task.replay == 0.0
    with pytest.raises(RunConfigError, match="branch_replay_from.*'seed', 'group', 'math'"):
        load_run_config("tiny", {"train.branch_replay_from": {"code": "nothing"}})
    # one named domain's corpus: code replays math only; a branch can't replay itself, and a domain
    # name is a choice per branch, not for all
    named = {j.task.name: j for j in plan_jobs(load_run_config("tiny", {
        "train.seed_fraction": 0.3, "train.branch_replay": {"code": 0.2}, "train.branch_replay_from": {"code": "math"}}),
        corpus, corpus.tokenizer().vocab_size)}
    assert [p.split("/")[-2] for p in named["code"].task.replay_paths] == ["math"]
    assert named["code"].task.replay == 0.2 and named["math"].task.replay == 0.0
    with pytest.raises(RunConfigError, match="branch_replay_from for code is 'code'.*another domain"):
        load_run_config("tiny", {"train.branch_replay_from": {"code": "code"}})
    with pytest.raises(RunConfigError, match="branch_replay_from for every branch is 'math'.*per domain"):
        load_run_config("tiny", {"train.branch_replay_from": "math"})
    with pytest.raises(RunConfigError, match="poetry"):
        load_run_config("tiny", {"train.branch_replay_from": {"poetry": "group"}})


def test_the_report_names_the_systems_that_are_compute_matched_with_each_other():
    """The merged model and the generalists spend the experts' FLOPs plus the merge's fine-tune: not
    matched with the routed experts, but with each other, and the report says which."""
    from training.report import system_compute
    from training.report_render import _matched_groups

    c = {d: {"flops": 1e12} for d in ("math", "reasoning", "conversation", "knowledge", "code")}
    c |= {"seed": {"flops": 1e12}, "merged": {"flops": 1.2e12},
          "baseline-dense": {"flops": 7.21e12}, "baseline-moe": {"flops": 7.5e12}}
    sc = system_compute(c)
    assert sc["flops"]["merged"] == pytest.approx(7.2e12) and not sc["matched"]
    assert sc["matched_groups"] == [["merged", "baseline-dense"]]  # the token-MoE 4% off
    assert _matched_groups(sc) == "; merged and baseline-dense are compute-matched with each other"
    c["baseline-moe"]["flops"] = 6e12  # as much as the experts alone
    assert system_compute(c)["matched_groups"] == [["experts", "baseline-moe"], ["merged", "baseline-dense"]]
    for n in ("merged", "baseline-dense", "baseline-moe"):
        c[n]["flops"] = 6e12 if n != "merged" else 0.0
    sc = system_compute(c)
    assert sc["matched"] and sc["matched_groups"] == [] and _matched_groups(sc) == ""
    c["baseline-moe"]["flops"] = c["baseline-dense"]["flops"] = 0.0  # not trained: nothing to match
    assert system_compute(c)["matched_groups"] == [["experts", "merged"]]
