"""cluster.yaml is a launcher config that `ray up` accepts (Ray's own schema and checks)."""

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
