"""Model names resolve through a fixed registry; no pickle loading; the API key guards every route."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from .conftest import API_KEY, EXPERTS, ROOT, SUMMARY

pytestmark = pytest.mark.reliability

EVIL_NAMES = ["../../etc/passwd", "math/../code", "/etc/passwd", "/", "..", ".", "math/", "./math",
              "math\x00", "experts/math", "~/.ssh/id_rsa", "%2e%2e%2fetc", "C:\\Windows", "MATH", " math"]
OUR_PACKAGES = ("experts", "router", "training", "serving", "bench", "tests")


# ---- the fixed registry ----------------------------------------------------------------------
@pytest.mark.parametrize("name", EVIL_NAMES)
def test_model_names_never_become_paths(name):
    """The registry check rejects the name without opening, listing or stat-ing anything."""
    from router.domains import check_domain
    from serving.errors import ModelNotFound
    from serving.ingress import Ingress

    fake = SimpleNamespace(experts={e: object() for e in EXPERTS})
    touched: list[tuple[str, tuple]] = []
    watching = [True]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event.split(".")[0] in ("open", "os", "shutil", "glob", "pathlib"):
            touched.append((event, args))

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one switches itself off
    try:
        with pytest.raises(ModelNotFound):
            Ingress.func_or_class._check_model(fake, name, "model")
        with pytest.raises(ValueError):
            check_domain(name)
    finally:
        watching[0] = False
    assert touched == [], touched


@pytest.mark.ray
def test_evil_model_names_404_over_http(client):
    for name in EVIL_NAMES:
        for path, body in (("/v1/completions", {"model": name, "prompt": "x", "max_tokens": 1}),
                           ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]}),
                           ("/generate", {"expert": name, "prompt": "x", "max_tokens": 1})):
            r = client.post(path, json=body)
            if name.strip() == "" or len(name) > 64:
                assert r.status_code == 422, r.text
                continue
            assert r.status_code == 404, (path, name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and "unknown" in err["message"]
            assert "root:" not in r.text  # nothing from the filesystem
    SUMMARY["checks"]["evil_model_names_404"] = len(EVIL_NAMES) * 3


# ---- no pickle -------------------------------------------------------------------------------
def _python_files() -> list[Path]:
    return [f for pkg in OUR_PACKAGES for f in (ROOT / pkg).rglob("*.py") if ".venv" not in f.parts]


def _pickle_uses(tree: ast.AST) -> list[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"import {m}" for m in mods if m and m.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib")]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name == "torch.load":
            w = kw.get("weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                bad.append(f"{name}(...) without weights_only=True")
        if name.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib") or name.endswith(("pickle.load", "pickle.loads")):
            bad.append(f"{name}(...)")
        a = kw.get("allow_pickle")
        if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
            bad.append(f"{name}(allow_pickle=...)")
    return bad


def test_no_pickle_loading_anywhere():
    files = _python_files()
    assert len(files) > 20
    found = {}
    for f in files:
        uses = _pickle_uses(ast.parse(f.read_text(encoding="utf-8"), filename=str(f)))
        if uses:
            found[str(f.relative_to(ROOT))] = uses
    SUMMARY["checks"]["pickle_scan_files"] = len(files)
    assert found == {}, found


def test_pickle_scanner_catches_what_it_should():
    src = ("import pickle\nimport torch\nfrom cloudpickle import loads\n"
           "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
           "pickle.loads(b'')\nnp.load('a.npy', allow_pickle=True)\n")
    bad = _pickle_uses(ast.parse(src))
    assert len(bad) == 6, bad  # two imports, two unsafe torch.load, pickle.loads, allow_pickle


# ---- the API key on every route --------------------------------------------------------------
def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the ingress app, found by walking it (new routes included)."""
    from serving.ingress import app

    out = []

    def walk(routes, prefix: str) -> None:
        for r in routes:
            if hasattr(r, "path"):
                out.extend((m, prefix + r.path) for m in sorted(getattr(r, "methods", None) or {"GET"}) if m != "HEAD")
            else:  # an included router (serve.ingress includes the class's routes this way)
                sub = getattr(r, "original_router", None) or getattr(r, "router", None)
                ctx = getattr(r, "include_context", None)
                walk(getattr(sub, "routes", []), prefix + (getattr(ctx, "prefix", "") or getattr(sub, "prefix", "")))

    walk(app.routes, "")
    return out


@pytest.mark.ray
def test_api_key_required_on_every_route_but_health_and_page(server):
    from serving.guard import OPEN_PATHS

    routes = _routes()
    paths = {p for _, p in routes}
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/v1/models", "/healthz", "/readyz"} <= paths
    assert OPEN_PATHS == {"/healthz", "/readyz", "/"}
    checked = 0
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0000"}, {"Authorization": API_KEY},
                        {"Authorization": f"Basic {API_KEY}"}):
            r = httpx.request(method, server + path, headers=headers, json={} if method == "POST" else None,
                              timeout=30)
            checked += 1
            if path in OPEN_PATHS:
                assert r.status_code == 200, (method, path, r.status_code)
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
                assert r.headers.get("www-authenticate") == "Bearer"
        ok = httpx.request(method, server + path, headers={"Authorization": f"Bearer {API_KEY}"},
                           json={} if method == "POST" else None, timeout=30)
        assert ok.status_code != 401, (method, path)
    SUMMARY["checks"]["auth_routes_checked"] = {"routes": len(routes), "requests": checked}
