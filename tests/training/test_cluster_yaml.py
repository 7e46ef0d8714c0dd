"""cluster.yaml is a launcher config that `ray up` accepts (Ray's own schema and checks), and its
setup commands install the project on a fresh node (run for real, about 90 s)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _config()
    jsonschema.validate(cfg, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs: defaults filled, then checks
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"cpu_worker", "gpu_worker"} <= set(types)
    setup = " ".join(cfg["setup_commands"])
    assert setup.index("torch") < setup.index("-e")  # torch installed before the project


def test_schema_rejects_a_broken_config():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _config()
    del cfg["available_node_types"]["cpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


def test_setup_commands_install_the_project_on_a_fresh_home(tmp_path):
    """The head's and CPU workers' ``setup_commands``, run for real in a shell, with HOME a temporary
    directory that holds a copy of the repository (as ``file_mounts`` puts it there) and the torch
    install pointed at the machine's local wheel instead of download.pytorch.org."""
    import os
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (tmp_path / "hmoe" / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tmp_path / "hmoe" / f)
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("VIRTUAL_ENV", None)
    for cmd in _config()["setup_commands"]:
        cmd = cmd.replace("--index-url https://download.pytorch.org/whl/cpu", "")
        done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{cmd!r} failed:\n{done.stderr[-2000:]}"
    venv = tmp_path / "hmoe" / ".venv" / "bin"
    check = subprocess.run([str(venv / "python"), "-c", "import torch, ray, experts.model, training.cli"],
                           env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]
    assert subprocess.run([str(venv / "hmoe"), "--help"], env=env, capture_output=True).returncode == 0
