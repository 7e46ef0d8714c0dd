"""`hmoe train --spec FILE`: a user's corpus spec (local jsonl files) trains experts end to end, and
the corpus cache is keyed by the spec's content, so no two specs share (or overwrite) a directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from training.data.build import build_corpora, corpus_dir_name
from training.run_config import RunConfigError, load_run_config


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _spec(tmp: Path, *, name: str = "tiny", flavour: str = "a") -> Path:
    rng = random.Random(flavour)
    math = [f"Question: what is {a} plus {b}?\nAnswer: {a + b}" for a, b in
            ((rng.randint(0, 999), rng.randint(0, 999)) for _ in range(400))]
    code = [f'def add_{i}(x):\n    """Add {i} to x ({flavour})."""\n    y = x + {i}\n    return y\n' for i in range(300)]
    _write_jsonl(tmp / f"math-{flavour}.jsonl", math)
    _write_jsonl(tmp / f"code-{flavour}.jsonl", code)
    spec = {"name": name, "vocab_size": 300, "tokenizer_sample_bytes": 50_000, "domains": [
        {"domain": d, "budget_bytes": 40_000,
         "sources": [{"kind": "local", "name": f"my-{d}", "paths": [str(tmp / f"{d}-{flavour}.jsonl")]}]}
        for d in ("math", "code")]}
    path = tmp / f"spec-{flavour}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_spec_sets_the_experts_and_its_own_cache_directory(tmp_path):
    spec_a, spec_b = _spec(tmp_path, flavour="a"), _spec(tmp_path, flavour="b")
    cfg = load_run_config("tiny", {"data.spec": str(spec_a), "data.cache_dir": str(tmp_path / "cache")})
    assert cfg.experts == ("math", "code")  # the spec's domains, in the canonical order
    name = cfg.data.corpus_name()
    assert name.startswith("tiny-") and name != "tiny"  # named like the preset, but never its directory
    a = build_corpora(cfg.data.size, cfg.data.cache_dir, spec=cfg.data.corpus_spec(), progress=False)
    b = build_corpora(cfg.data.size, cfg.data.cache_dir, spec=load_run_config(
        "tiny", {"data.spec": str(spec_b)}).data.corpus_spec(), progress=False)
    assert a.root.name == name and b.root.name != name and a.root.parent == b.root.parent
    assert (a.root / "manifest.json").is_file()  # b did not overwrite a
    assert "(a)" in a.docs("code", "train")[0]["text"] and "(b)" in b.docs("code", "train")[0]["text"]
    from training.data.spec import default_spec

    assert corpus_dir_name(default_spec("tiny")) == "tiny"


def test_a_bad_spec_is_refused_with_what_to_change(tmp_path):
    with pytest.raises(RunConfigError, match="does not exist"):
        load_run_config("tiny", {"data.spec": str(tmp_path / "nope.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndomains: [{domain: poetry, budget_bytes: 10, sources: [{name: a}]}]\n")
    with pytest.raises(RunConfigError, match="not a valid corpus spec"):
        load_run_config("tiny", {"data.spec": str(bad)})
    with pytest.raises(RunConfigError, match="--experts math,code"):
        load_run_config("tiny", {"data.spec": str(_spec(tmp_path)), "experts": "math,knowledge"})


@pytest.mark.ray
def test_a_spec_of_local_files_trains_experts_and_a_report(ray_local, tmp_path):
    from experts.checkpoint import read_meta
    from training.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    cfg = load_run_config("tiny", {"data.spec": str(_spec(tmp_path)), "data.cache_dir": str(tmp_path / "cache"),
                                   "run_dir": str(run_dir), "train.steps": 6, "train.eval_every": 3,
                                   "train.ckpt_every": 3, "router.steps": 20, "router.per_domain": 40,
                                   "report.gen_items": 2})
    run_pipeline(cfg)
    for d in ("math", "code"):
        assert read_meta(run_dir / "experts" / d, kind="lm")["train"]["steps"] > 0
    assert not (run_dir / "experts" / "knowledge").exists()
    assert read_meta(run_dir / "router", kind="router")
    rep = json.loads((run_dir / "report" / "report.json").read_text())
    assert rep["domains"] == ["math", "code"] and {"math", "code"} <= set(rep["matrix"])
    assert (tmp_path / "cache" / cfg.data.corpus_name() / "manifest.json").is_file()
