"""bench.swap_branches: a run copy with other branches, weights linked, the source left untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.swap_branches import swap
from training.run_config import RunConfigError, load_run_config


def _expert(root: Path, name: str, payload: bytes) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "meta.json").write_text("{}")
    (d / "model.safetensors").write_bytes(payload)


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    src, probe = tmp_path / "std", tmp_path / "probe"
    for d in ("math", "reasoning"):
        _expert(src / "experts", d, d.encode())
    _expert(src, "seed", b"seed")
    _expert(src, "merged", b"merged")
    (src / "router").mkdir()
    (src / "router" / "calibration.json").write_text('{"temperature": 1.3}')
    (src / "run.yaml").write_text(load_run_config("tiny", {"train.steps": 600}).to_yaml())
    _expert(probe / "experts", "reasoning", b"new reasoning")
    return src, probe


def test_the_copy_has_the_new_branch_the_old_rest_and_no_merged_model(runs, tmp_path):
    src, probe = runs
    dst = swap(src, tmp_path / "c", {"reasoning": probe}, {"train.branch_replay": {"reasoning": 0.2}})
    assert (dst / "experts" / "reasoning" / "model.safetensors").read_bytes() == b"new reasoning"
    assert (dst / "experts" / "math" / "model.safetensors").stat().st_ino == \
        (src / "experts" / "math" / "model.safetensors").stat().st_ino  # linked, not copied
    assert not (dst / "merged").exists()
    cfg = yaml.safe_load((dst / "run.yaml").read_text())
    assert cfg["train"]["steps"] == 600 and cfg["train"]["branch_replay"] == {"reasoning": 0.2}
    assert cfg["run_dir"] == str(dst)
    (dst / "router" / "calibration.json").write_text("{}")  # a report writing into the copy
    assert (src / "router" / "calibration.json").read_text() == '{"temperature": 1.3}'
    assert yaml.safe_load((src / "run.yaml").read_text())["train"]["branch_replay"] == 0.0
    assert (src / "experts" / "reasoning" / "model.safetensors").read_bytes() == b"reasoning"


def test_an_unfinished_branch_or_an_existing_copy_is_refused(runs, tmp_path):
    src, probe = runs
    with pytest.raises(SystemExit, match="not a finished expert"):
        swap(src, tmp_path / "c", {"code": probe})
    with pytest.raises(ValueError, match="unknown expert 'poetry'"):
        swap(src, tmp_path / "c", {"poetry": probe})
    with pytest.raises(RunConfigError, match="branch_replai"):
        swap(src, tmp_path / "c", {"reasoning": probe}, {"train.branch_replai": 0.2})
    assert not (tmp_path / "c").exists()
    (tmp_path / "c").mkdir()
    with pytest.raises(SystemExit, match="exists"):
        swap(src, tmp_path / "c", {"reasoning": probe})
