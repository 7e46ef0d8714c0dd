"""Run configuration: presets load, overrides apply, bad input gives errors that name the field."""

from __future__ import annotations

import pytest

from training.run_config import RunConfigError, load_run_config, preset_names


@pytest.mark.parametrize("name", ["tiny", "quick", "standard", "gpu"])
def test_presets_validate(name):
    assert name in preset_names()
    cfg = load_run_config(name)
    assert cfg.name == name and len(cfg.experts) == 5
    assert cfg.train.seq_len <= cfg.model.build().max_seq_len


def test_overrides_apply():
    cfg = load_run_config("tiny", {"train.steps": 7, "experts": "math,code", "baselines.enabled": True,
                                   "run_dir": "/tmp/x", "seed": None})
    assert cfg.train.steps == 7 and cfg.experts == ("math", "code") and cfg.baselines.enabled
    assert cfg.run_dir == "/tmp/x" and cfg.seed == 0


@pytest.mark.parametrize("override, field", [
    ({"train.steps": 0}, "train.steps"),
    ({"typo_key": 1}, "typo_key"),
    ({"train.lr": -1.0}, "train.lr"),
    ({"experts": "math,poetry"}, "poetry"),
    ({"model.overrides": {"d_model": 100}}, "d_model"),
    ({"model.overrides": {"width": 3}}, "width"),
    ({"train.seq_len": 100000}, "max_seq_len"),
    ({"resources.num_cpus": 0}, "resources.num_cpus"),
    ({"train.min_lr": 1.0}, "min_lr"),
])
def test_bad_values_are_named(override, field):
    with pytest.raises(RunConfigError, match=field):
        load_run_config("tiny", override)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(RunConfigError, match="unknown preset"):
        load_run_config("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RunConfigError, match="not valid YAML"):
        load_run_config(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(RunConfigError, match="mapping"):
        load_run_config(str(bad))
