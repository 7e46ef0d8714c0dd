"""Every bad input gets a 4xx with an OpenAI-style body naming the field; nothing gives a 5xx."""

from __future__ import annotations

import httpx
import pytest

from serving.errors import to_serving_error

from .conftest import API_KEY, MAX_BODY, MAX_TOKENS_CAP

pytestmark = pytest.mark.ray


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5),
                                         ("max_tokens", -1), ("top_k", -2), ("seed", -5)])
def test_field_bounds_422_name_the_field(client, field, value):
    r = client.post("/v1/completions", json={"model": "auto", "prompt": "x", field: value})
    assert _error(r, 422)["param"] == field


def test_native_rejects_unknown_fields(client):
    assert _error(client.post("/generate", json={"prompt": "x", "bogus": 1}), 422)["param"] == "bogus"
    assert _error(client.post("/generate", json={"prompt": "x", "mode": "all"}), 422)["param"] == "mode"


def test_limits_400(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": MAX_TOKENS_CAP + 1})
    assert _error(r, 400)["param"] == "max_tokens"
    long_prompt = [5] * 200  # over the tiny models' 128-token context
    assert _error(client.post("/v1/completions", json={"prompt": long_prompt}), 400)["param"] == "prompt"
    assert _error(client.post("/v1/completions", json={"prompt": [[10**6 - 1]]}), 400)["param"] == "prompt"
    assert _error(client.post("/v1/completions", json={"prompt": []}), 422)["param"] == "prompt"
    refuse = {"prompt": "word " * 300, "expert": "math", "truncate_prompt_tokens": None}
    assert "truncate_prompt_tokens" in _error(client.post("/generate", json=refuse), 400)["message"]


def test_unknown_model_404(client):
    err = _error(client.post("/v1/completions", json={"model": "../../etc/passwd", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert _error(client.post("/generate", json={"prompt": "x", "expert": "gpt-4"}), 404)["param"] == "expert"


def test_malformed_json_400(client):
    r = client.post("/v1/completions", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
    assert _error(r, 400)["code"] == "invalid_json"


def test_body_too_large_413(client):
    assert _error(client.post("/v1/completions", json={"prompt": "a" * (MAX_BODY + 10)}), 413)


def test_api_key_401(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "x"})
    assert _error(r, 401)["type"] == "authentication_error"
    r = httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong-key-000"})
    assert _error(r, 401)
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_unknown_route_404_and_service_survives(client):
    assert _error(client.get("/v2/nothing"), 404)
    for body in ({"prompt": "x", "stop": ["a"] * 9}, {"messages": []}, {"prompt": {"a": 1}}):
        assert client.post("/v1/completions", json=body).status_code < 500
    hdr = {"Content-Type": "application/json"}
    for raw in (b'{"prompt": "\\udcff\\ud800 lone surrogates"}', b'{"prompt": "\xff\xfe"}', b"[1, 2]", b""):
        r = client.post("/v1/completions", content=raw, headers=hdr)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 422
    assert client.get("/readyz").status_code == 200


def test_backpressure_maps_to_503_retry_after():
    from ray.serve.exceptions import BackPressureError

    err = to_serving_error(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    resp = err.response()
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    assert to_serving_error(ValueError("SamplingParams.top_p=0 is invalid")).status == 400
    assert to_serving_error(RuntimeError("boom")).status == 500


def test_json_without_its_content_type_is_read_as_json(client):
    """``curl -d '{...}'`` labels the body as a form; it is still the request's JSON."""
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = client.post("/generate", content=b'{"prompt": "x", "max_tokens": 2, "expert": "math"}', headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["routing"]["expert"] == "math"
    r = client.post("/generate", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert _error(r, 400)["code"] == "invalid_json"
    r = client.post("/generate", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 422  # a content type the client named is taken at its word
