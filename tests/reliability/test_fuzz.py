"""Property-based fuzzing of every endpoint: no input gives a 5xx, every error names what is wrong.

Inputs: malformed JSON, wrong types, huge/negative numbers, NaN/Infinity literals, invalid UTF-8,
control characters, unknown fields, empty or odd message lists, wrong roles and content types,
oversized prompts. After the run the server must still answer a normal request.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import API_KEY, EXPERTS, SUMMARY, count_errors

pytestmark = [pytest.mark.reliability, pytest.mark.ray]

FAST_EXAMPLES = 200
FULL_EXAMPLES = 1000
POST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")
GET_ROUTES = ("/v1/models", "/healthz", "/readyz", "/")
MODELS = ("auto", *EXPERTS, "../../etc/passwd", "math/../code", "/etc/passwd", "", "gpt-4", "MATH")

# ---- values ----------------------------------------------------------------------------------
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), max_size=20),  # control chars
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=4),  # lone surrogates
    st.sampled_from(["<|bos|>", "<|end|>", "<|assistant|>", "\x00", "\u202e", "🙂" * 50, "a" * 5000]),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, nasty_text)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
token_ids = st.lists(st.one_of(st.integers(min_value=-5, max_value=600), numbers), max_size=12)

message = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "function", "", "USER"]), values),
    "content": st.one_of(nasty_text, values,
                         st.lists(st.fixed_dictionaries({}, optional={
                             "type": st.sampled_from(["text", "image_url", "input_audio", 3]),
                             "text": st.one_of(nasty_text, values)}), max_size=3)),
    "name": st.one_of(nasty_text, values)})

sampling = {
    "max_tokens": st.one_of(numbers, st.integers(min_value=0, max_value=20), values),
    "temperature": st.one_of(numbers, st.floats(min_value=0, max_value=2), values),
    "top_p": st.one_of(numbers, values), "top_k": st.one_of(numbers, values),
    "repetition_penalty": st.one_of(numbers, values), "seed": st.one_of(numbers, values),
    "stream": st.one_of(st.booleans(), values),
    "stop": st.one_of(nasty_text, st.lists(nasty_text, max_size=6), values),
    "mode": st.one_of(st.sampled_from(["top1", "ensemble", "auto", "all"]), values),
    "n": st.one_of(numbers, values), "logprobs": st.one_of(numbers, st.integers(0, 5), values),
    "echo": st.one_of(st.booleans(), values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), values),
    "unknown_field": values,
}
model_field = {"model": st.one_of(st.sampled_from(MODELS), values)}

completion_body = st.fixed_dictionaries(
    {"prompt": st.one_of(nasty_text, st.lists(nasty_text, max_size=3), token_ids,
                         st.lists(token_ids, max_size=3), values)},
    optional={**model_field, **sampling})
chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=4), st.just([]), values)},
    optional={**model_field, **sampling, "max_completion_tokens": st.one_of(numbers, values)})
generate_body = st.fixed_dictionaries(
    {"prompt": st.one_of(nasty_text, values)},
    optional={"expert": st.one_of(st.sampled_from(MODELS), values), **sampling})
BODIES = {"/v1/completions": completion_body, "/v1/chat/completions": chat_body, "/generate": generate_body}


def _encode(obj: object) -> bytes:
    """JSON with NaN/Infinity literals and lone surrogates kept (as Python's json writes them)."""
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def raw_body(draw, route: str) -> bytes:
    """A body: valid-ish JSON, or JSON broken by truncation, byte flips, invalid UTF-8 or junk."""
    data = _encode(draw(BODIES[route]))
    kind = draw(st.sampled_from(["json", "json", "json", "truncate", "flip", "utf8", "junk", "wrongtop"]))
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if kind == "utf8":
        return data.replace(b'"', b'"\xff\xfe\xc3', 1) if b'"' in data else b"\xff" + data
    if kind == "junk":
        return draw(st.binary(max_size=64))
    if kind == "wrongtop":
        return draw(st.sampled_from([b"[]", b"null", b"1", b'"x"', b"NaN", b"Infinity", b"[1, 2]", b"true"]))
    return data


request = st.one_of(
    st.tuples(st.just("POST"), st.sampled_from(POST_ROUTES)).flatmap(
        lambda mr: st.tuples(st.just(mr[0]), st.just(mr[1]), raw_body(mr[1]),
                             st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))),
    st.tuples(st.sampled_from(["GET", "DELETE", "PUT", "POST"]), st.sampled_from(GET_ROUTES),
              st.one_of(st.just(b""), st.binary(max_size=16)), st.just("application/json")),
    st.tuples(st.sampled_from(["GET", "PATCH"]), st.sampled_from(POST_ROUTES), st.just(b""), st.just("")),
)


# ---- the invariant -----------------------------------------------------------------------------
def check_response(r: httpx.Response, errors: dict[str, int]) -> None:
    """No 5xx; an error is an OpenAI-style body whose message says what is wrong."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert {"message", "type", "param"} <= set(err), err
        assert isinstance(err["message"], str) and len(err["message"]) >= 10, err
        assert isinstance(err["type"], str) and err["type"], err
        if r.status_code == 422 and err["param"] is None:  # a whole-body problem: the message says so
            assert "body" in err["message"] or "JSON" in err["message"], err
        count_errors(errors, f"{r.status_code} {err.get('code')}")
    else:
        count_errors(errors, str(r.status_code))
        if r.headers.get("content-type", "").startswith("application/json"):
            r.json()


def _fuzz(client: httpx.Client, examples: int) -> dict[str, int]:
    errors: dict[str, int] = {}
    tried = [0]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(request)
    def run(req: tuple[str, str, bytes, str]) -> None:
        method, path, body, ctype = req
        tried[0] += 1
        headers = {"Content-Type": ctype} if ctype else {}
        r = client.request(method, path, content=body, headers=headers)
        check_response(r, errors)

    t0 = time.perf_counter()
    run()
    errors["_elapsed_s"] = round(time.perf_counter() - t0, 1)
    errors["_tried"] = tried[0]
    return errors


def _normal_request_works(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "math", "prompt": "What is 2 + 2?", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def _run_and_record(client: httpx.Client, examples: int, label: str) -> None:
    stats = _fuzz(client, examples)
    tried = stats.pop("_tried")
    print(f"fuzz ({label}): tried {tried} inputs in {stats.pop('_elapsed_s')} s: {stats}")
    SUMMARY["inputs_tried"][label] = SUMMARY["inputs_tried"].get(label, 0) + tried
    for k, v in stats.items():
        count_errors(SUMMARY["errors_by_class"], f"fuzz {k}", v)
    SUMMARY["requests_served"] += sum(v for k, v in stats.items() if k == "200")
    _normal_request_works(client)


def test_fuzz_every_endpoint_fast(client):
    """~200 inputs across all routes (runs in make test)."""
    _run_and_record(client, FAST_EXAMPLES, "fuzz_fast")


@pytest.mark.reliability_full
def test_fuzz_every_endpoint_full(client):
    _run_and_record(client, FULL_EXAMPLES, "fuzz_full")


@pytest.mark.parametrize("route", POST_ROUTES)
def test_huge_prompts(client, route):
    """A 1 MB prompt is refused (413); 900 kB (422) too; 150 kB (longer than the context) is refused
    by the OpenAI routes (400) and cut to fit by /generate, which says so."""
    truncates = route == "/generate"
    for size, status in ((1_000_001, 413), (900_000, 422), (150_000, 200 if truncates else 400)):
        text = "ab 12 " * (size // 6)
        body = ({"messages": [{"role": "user", "content": text}]} if route.endswith("chat/completions")
                else {"prompt": text, "max_tokens": 2})
        r = client.post(route, json=body)
        check_response(r, SUMMARY["errors_by_class"])
        assert r.status_code == status, (route, size, r.status_code, r.text[:300])
        if status == 200:
            assert r.json()["truncated"] is True
            continue
        err = r.json()["error"]
        assert err["param"] in (None, "prompt", "messages.content", "messages.0.content") or "prompt" in err["message"]
    SUMMARY["inputs_tried"]["huge_prompts"] = SUMMARY["inputs_tried"].get("huge_prompts", 0) + 3
    _normal_request_works(client)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "messages.content"),
    ({"messages": "hello"}, "messages"),
])
def test_chat_message_errors_name_the_field(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                                 b'{"prompt": "x", "max_tokens": -Infinity}', b'{"prompt": "x", "seed": 1e400}'])
def test_nan_infinity_literals(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    check_response(r, SUMMARY["errors_by_class"])
    assert 400 <= r.status_code < 500, r.text


def test_auth_checked_before_parsing(server):
    r = httpx.post(f"{server}/v1/completions", content=b"\xff{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    ok = httpx.post(f"{server}/v1/completions", content=b"\xff{not json",
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    err = ok.json()["error"]
    assert ok.status_code == 400 and ("JSON" in err["message"] or "body" in err["message"]), err
