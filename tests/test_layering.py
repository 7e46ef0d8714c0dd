"""The packages form layers: experts < router < training < serving. A module may import its own
layer and the layers below it, never one above, and neither does an import path written as a
string (``importlib.import_module("serving.x")``, a Ray ``"module:function"``). Ray belongs to
training and serving only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"experts": 0, "router": 1, "training": 2, "serving": 3}
NEEDS = {"ray": RANK["training"]}  # third-party packages allowed only from this layer up
DOTTED = re.compile(r"^(experts|router|training|serving)(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?$")


def references(source: str) -> set[str]:
    """Top-level packages a module imports, by statement or by an import path in a string."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.match(node.value) \
                and ("." in node.value or ":" in node.value):
            names.add(re.split(r"[.:]", node.value)[0])
    return names


def violations(package: str, source: str) -> set[str]:
    rank = RANK[package]
    return {n for n in references(source)
            if RANK.get(n, -1) > rank or NEEDS.get(n, -1) > rank}


@pytest.mark.parametrize("package", list(RANK))
def test_no_module_imports_a_layer_above_its_own(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = {str(f.relative_to(ROOT)): sorted(v) for f in files if (v := violations(package, f.read_text()))}
    assert not bad, f"imports from a layer above: {bad}"


@pytest.mark.parametrize("line", ["import serving", "from serving.app import build_app",
                                  "import importlib\nimportlib.import_module('serving.cli')",
                                  "FN = 'serving.cli:main'"])
def test_the_check_catches_an_upward_import_in_training(line):
    source = (ROOT / "training" / "pipeline.py").read_text() + "\n" + line + "\n"
    assert violations("training", source) == {"serving"}


def test_ray_stays_out_of_experts_and_router():
    assert violations("router", "import ray\n") == {"ray"}
    assert violations("experts", "from ray import serve\n") == {"ray"}
    assert violations("training", "import ray\n") == set()
