"""Which prompts an expert reads as chat turns, with the real Ingress built without Serve over fake
expert handles that record what they are sent.

An instruction-tuned checkpoint (``instruct`` in its ``meta.json``) and the dialogue expert get a native
prompt as ``<|bos|><|user|>prompt<|end|><|assistant|>`` and stop at ``<|end|>``; any other expert gets
the raw prompt, and /v1/completions is never wrapped.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from experts.tokenizer import Tokenizer
from router.domains import DOMAINS, GROUP_NAMES, GROUP_OF
from serving import schemas as S
from serving.app import ingress_settings, is_chat_expert, served_experts
from serving.config import AppArgs
from serving.ingress import Ingress
from serving.testing import make_tiny_run

EXPERTS = ("math", "conversation", "code")  # math: instruction-tuned; conversation: dialogues; code: plain
PROMPT = "What is 12 + 30?"


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class FakeExpert:
    """An expert's handle that records each prompt and answers from a script (``42<|end|> and on<|eos|>``);
    like the engine, it ends at the first stop id (returned as the last token) or after max_new_tokens."""

    def __init__(self, tok: Tokenizer) -> None:
        self.vocab = tok.vocab_size
        self.script = [*tok.encode("42", specials=False), tok.end_id, *tok.encode(" and on", specials=False),
                       tok.eos_id]
        self.calls: list[tuple[list[int], dict[str, Any]]] = []
        self.sessions: dict[str, list] = {}  # session -> [position in the script, params]
        self.generate_all, self.open, self.step, self.feed, self.close = map(
            _Remote, (self._all, self._open, self._step, self._feed, self._close))

    def _finish(self, token: int, n: int, params: dict[str, Any]) -> str | None:
        return "stop" if token in params["stop_ids"] else "length" if n >= params["max_new_tokens"] else None

    def _all(self, ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((list(ids), dict(params)))
        out: list[int] = []
        for token in self.script:
            out.append(token)
            if reason := self._finish(token, len(out), params):
                return {"tokens": out, "finish_reason": reason}
        return {"tokens": out, "finish_reason": "length"}

    def _open(self, ids: list[int], params: dict[str, Any]) -> str:
        self.calls.append((list(ids), dict(params)))
        sid = f"s{len(self.sessions)}"
        self.sessions[sid] = [0, params]
        return sid

    def _step(self, sid: str) -> np.ndarray:
        dist = np.full(self.vocab, -np.inf, dtype=np.float32)
        dist[self.script[self.sessions[sid][0]]] = 0.0
        return dist

    def _feed(self, sid: str, token: int) -> dict[str, Any]:
        state = self.sessions[sid]
        state[0] += 1
        reason = self._finish(token, state[0], state[1])
        return {"finished": reason is not None, "finish_reason": reason, "logprob": 0.0}

    def _close(self, sid: str) -> None:
        pass


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("run"), experts=EXPERTS, instruct=("math",), tools=("math",))


@pytest.fixture(scope="module")
def tok(run: Path) -> Tokenizer:
    return Tokenizer.load(run / "tokenizer.json")


def _ingress(run: Path, *, top: dict[str, float]) -> Any:
    """The real Ingress over fake experts; the router puts ``top``'s probabilities on those experts."""
    args = AppArgs(run_dir=str(run), experts=list(EXPERTS))
    cls = Ingress.func_or_class.__bases__[0]  # the class under @serve.ingress's ASGI wrapper
    ingress = cls({n: FakeExpert(Tokenizer.load(run / "tokenizer.json")) for n in EXPERTS}, object(),
                  ingress_settings(args, served_experts(args)))

    async def route(text: str) -> dict[str, Any]:
        rest = (1.0 - sum(top.values())) / (len(DOMAINS) - len(top))
        probs = {d: top.get(d, rest) for d in DOMAINS}
        group = GROUP_OF[max(top, key=top.get)]
        return {"group": group, "group_probs": {g: float(g == group) for g in GROUP_NAMES}, "expert_probs": probs}

    ingress.orch.route_text = route
    return ingress


def _run(call: Any) -> dict[str, Any]:
    """A route's JSON body."""
    return json.loads(asyncio.run(call).body)


def test_chat_experts_come_from_the_checkpoints(run):
    args = AppArgs(run_dir=str(run), experts=list(EXPERTS))
    assert ingress_settings(args, served_experts(args)).chat_experts == ["math", "conversation"]
    assert is_chat_expert("code", {"instruct": {"fraction": 0.3, "steps": 84}})
    assert not is_chat_expert("code", {"instruct": {}}) and not is_chat_expert("code", {})
    assert is_chat_expert("conversation", {})  # a checkpoint from before the instruction stage


def test_sampling_fields_a_request_leaves_out_take_the_answering_experts_defaults(run):
    from router.domains import DOMAIN_SAMPLING, generation_defaults

    args = AppArgs(run_dir=str(run), experts=list(EXPERTS))
    assert ingress_settings(args, served_experts(args)).generation == {"math": {"temperature": 0.0}}
    assert generation_defaults({"instruct": {"domains": ["code"]}}) == {"temperature": 0.0,
                                                                       **DOMAIN_SAMPLING["code"]}
    assert generation_defaults({"instruct": {"domains": ["knowledge"]}}) == {"temperature": 0.0}
    assert generation_defaults({"instruct": {"domains": ["math", "conversation"]}}) == {}  # a generalist
    assert generation_defaults({}) == {}  # not instruction-tuned
    for expert, sent, want in (("math", {}, 0.0), ("math", {"temperature": 0.9}, 0.9),
                               ("conversation", {}, 1.0), ("code", {}, 1.0)):
        ingress = _ingress(run, top={expert: 0.9})
        _run(ingress.generate(S.GenerateRequest(prompt=PROMPT, **sent)))
        assert ingress.experts[expert].calls[0][1]["temperature"] == want, (expert, sent)
    ingress = _ingress(run, top={"math": 0.9})  # the OpenAI routes too, and top_p is left alone
    _run(ingress.chat(S.ChatRequest(model="auto", messages=[{"role": "user", "content": PROMPT}], max_tokens=4)))
    assert ingress.experts["math"].calls[0][1]["temperature"] == 0.0
    assert ingress.experts["math"].calls[0][1]["top_p"] == 1.0


def test_a_routed_native_prompt_is_a_chat_turn_for_an_instruction_tuned_expert(run, tok):
    turn = tok.chat([{"role": "user", "content": PROMPT}])
    assert turn[:2] == [tok.bos_id, tok.user_id] and turn[-2:] == [tok.end_id, tok.assistant_id]
    raw = [tok.bos_id, *tok.encode(PROMPT, specials=False)]
    for expert, want in (("math", turn), ("conversation", turn), ("code", raw)):
        ingress = _ingress(run, top={expert: 0.9})
        body = _run(ingress.generate(S.GenerateRequest(prompt=PROMPT, temperature=0)))
        assert body["routing"]["experts"] == [expert] and body["routing"]["mode"] != "explicit"
        (ids, params), = ingress.experts[expert].calls
        assert ids == want and body["prompt_tokens"] == len(want), expert
        assert {tok.eos_id, tok.end_id} <= set(params["stop_ids"])
        if want == turn:  # the answer ends with the turn, and <|end|> is not shown
            assert body["text"] == "42" and body["finish_reason"] == "stop"
            assert body["completion_tokens"] == len(tok.encode("42", specials=False)) + 1  # with <|end|>

    ingress = _ingress(run, top={"math": 0.9})
    _run(ingress.generate(S.GenerateRequest(prompt=PROMPT, chat=False)))  # raw continuation, asked for
    assert ingress.experts["math"].calls[0][0] == raw


def test_completions_are_never_wrapped_and_chat_completions_always_are(run, tok):
    raw = [tok.bos_id, *tok.encode(PROMPT, specials=False)]
    for model in ("auto", "math", "conversation"):
        ingress = _ingress(run, top={"math": 0.9})
        body = _run(ingress.completions(S.CompletionRequest(model=model, prompt=PROMPT, max_tokens=8)))
        assert body["hmoe"]["routing"]["experts"] == [model if model != "auto" else "math"]
        assert ingress.experts[body["hmoe"]["routing"]["expert"]].calls[0][0] == raw, model

    messages = [{"role": "user", "content": PROMPT}]
    ingress = _ingress(run, top={"math": 0.9})
    body = _run(ingress.chat(S.ChatRequest(model="code", messages=messages, max_tokens=8)))
    (ids, params), = ingress.experts["code"].calls
    assert ids == tok.chat(messages) and tok.end_id in params["stop_ids"]
    assert body["choices"][0]["message"]["content"] == "42" and body["choices"][0]["finish_reason"] == "stop"


def test_an_ensemble_gives_each_expert_its_own_prompt(run, tok):
    ingress = _ingress(run, top={"math": 0.5, "code": 0.4})
    body = _run(ingress.generate(S.GenerateRequest(prompt=PROMPT, mode="ensemble", temperature=0)))
    assert body["routing"]["experts"] == ["math", "code"] and body["text"] == "42"
    assert ingress.experts["math"].calls[0][0] == tok.chat([{"role": "user", "content": PROMPT}])
    assert ingress.experts["code"].calls[0][0] == [tok.bos_id, *tok.encode(PROMPT, specials=False)]


def test_an_expert_whose_checkpoint_lists_the_calculator_is_served_with_it(run):
    from experts.calculator import Calculator
    from serving.engine_loop import load_engine

    assert isinstance(load_engine(str(run / "experts" / "math"), max_batch=1).tool, Calculator)
    assert load_engine(str(run / "experts" / "code"), max_batch=1).tool is None


def test_a_code_expert_is_served_with_the_syntax_guard(tmp_path):
    from experts.syntax_guard import PythonGuard
    from router.domains import guarded
    from serving.engine_loop import load_engine

    assert guarded({"instruct": {"domains": ["code"]}})
    assert not guarded({"instruct": {"domains": ["code", "math"]}}) and not guarded({})  # a generalist; raw LM
    run = make_tiny_run(tmp_path, experts=("math", "code"), instruct=("math", "code"), tools=("math",))
    assert isinstance(load_engine(str(run / "experts" / "code"), max_batch=1).guard, PythonGuard)
    assert load_engine(str(run / "experts" / "math"), max_batch=1).guard is None
    args = AppArgs(run_dir=str(run), experts=["math", "code"])
    assert ingress_settings(args, served_experts(args)).generation["code"] == {"temperature": 0.0,
                                                                               "frequency_penalty": 1.5}


def test_openai_penalties_reach_the_expert(run):
    ingress = _ingress(run, top={"code": 0.9})
    _run(ingress.generate(S.GenerateRequest(prompt=PROMPT, frequency_penalty=0.7, presence_penalty=-0.5)))
    params = ingress.experts["code"].calls[0][1]
    assert (params["frequency_penalty"], params["presence_penalty"]) == (0.7, -0.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        S.GenerateRequest(prompt=PROMPT, frequency_penalty=3.0)
