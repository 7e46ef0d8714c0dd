"""Orchestration of one request, without Serve or HTTP: route it, then stream its tokens.

A :class:`Job` (prompt ids, sampling parameters, limits already checked) is routed (the expert the
request names, or the router's decision restricted to the served experts, following the request's
mode); each chosen expert gets its prompt (a chat expert, one instruction-tuned or trained on
dialogues, reads a native prompt as a chat user turn), and the tokens come from one expert
(``top1``) or from a per-step mixture of several (``ensemble``, Branch-Train-Merge decoding).
Experts are handle-like objects (Ray Serve's ``DeploymentHandle`` in production, fakes in tests):
``generate_all``, ``generate`` (streaming), and ``open``/``step``/``feed``/``close`` for the
ensemble. A replica that dies or does not answer
in time marks its expert down (``serving.health``), so later requests fail fast with a 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from experts.sampling import SamplingParams, make_generator, sample
from router.domains import DOMAINS, GROUP_NAMES, GROUP_OF
from router.policy import decide
from serving.errors import InvalidRequest, NotReady
from serving.health import ExpertHealth, is_replica_death
from serving.textstream import TextAssembler

RouteText = Callable[[str], Awaitable[dict[str, Any]]]  # prompt text -> the router's full decision


@dataclass
class Job:
    """One prompt to complete, validated against the limits."""

    ids: list[int]
    echo_from: int  # first prompt position that echo reports (1 when the server added BOS)
    route_text: str
    model: str  # "auto" or an expert name
    mode: str
    max_tokens: int
    params: dict[str, Any]  # SamplingParams fields
    stops: list[str]
    stream: bool = False
    chat: bool | None = False  # route_text as a chat user turn (None: for the chat experts it is routed to)
    truncate: int | None = None  # fit_prompt's policy for a prompt over the context
    truncated: bool = False  # the prompt was cut from the left to fit
    t0: float = field(default_factory=time.perf_counter)
    prompts: dict[str, list[int]] = field(default_factory=dict)  # each routed expert's prompt
    unset: frozenset[str] = frozenset()  # sampling fields the request left out (the model's defaults apply)

    @property
    def one_message(self) -> bool:
        """Nothing to watch token by token (no stream, no stop strings): one expert answers it in
        one message, at the end."""
        return not self.stream and not self.stops


def fit_prompt(ids: list[int], ctx: int, *, truncate: int | None, want: int, head: int = 1,
               tail: int = 0) -> tuple[list[int], bool]:
    """The prompt an expert gets, and whether it was cut: ``ids`` cut from the left when ``truncate``
    asks for it, keeping its first ``head`` and last ``tail`` ids (``<|bos|>``, a chat turn's markers).

    ``truncate`` None: unchanged (a prompt over the context is then refused); N > 0: at most N ids
    (vLLM's ``truncate_prompt_tokens``); -1: as many as leave room for ``want`` new tokens, giving the
    prompt at least half the context.
    """
    if truncate is None:
        return ids, False
    limit = ctx - min(max(want, 1), ctx // 2) if truncate == -1 else min(truncate, ctx - 1)
    limit = max(limit, head + tail + 1)
    if len(ids) <= limit:
        return ids, False
    end = len(ids) - tail
    return ids[:head] + ids[end - (limit - head - tail):end] + ids[end:], True


def mixture_scores(seq: list[int], dists: list[torch.Tensor], weights: list[float], top: int) -> dict[str, list]:
    """Log-probs of ``seq`` under the ensemble's distribution ``sum_i w_i p_i`` (what its decoding
    samples from), from each expert's log-distributions ``(len(seq) - 1, V)``; the ``top`` most likely
    ids of the mixture at each position. The shape of an expert's ``score``."""
    w = torch.tensor(weights, dtype=torch.float32)
    mixed = torch.logsumexp(torch.stack(dists).float() + torch.log(w / w.sum())[:, None, None], dim=0)  # (T-1, V)
    token_lp = [None, *mixed.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()]
    if top <= 0:
        return {"token_logprobs": token_lp, "top": [None] * len(seq)}
    vals, idx = mixed.topk(min(top, mixed.shape[-1]), dim=-1)
    return {"token_logprobs": token_lp,
            "top": [None, *[[[t, v] for t, v in zip(i, vs)] for i, vs in zip(idx.tolist(), vals.tolist())]]}


# a one-message answer arrives after the whole generation: allow this much per token on top of
# the first-token deadline (10 tokens/s, far below any expert's speed even when it is loaded)
ANSWER_S_PER_TOKEN = 0.1


def first_answer_deadline_s(first_token_timeout_s: float, job: Job, n_experts: int) -> float:
    """How long an expert may take before its first message, after which it is treated as down."""
    if n_experts == 1 and job.one_message:
        return first_token_timeout_s + ANSWER_S_PER_TOKEN * job.max_tokens
    return first_token_timeout_s


@dataclass
class Generation:
    """What a job produced so far."""

    job: Job
    decision: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def expert(self) -> str:
        return self.decision["experts"][0]

    def summary(self) -> dict[str, Any]:
        self.timings["total_ms"] = round((time.perf_counter() - self.job.t0) * 1000.0, 3)
        return {"routing": {**self.decision, "expert": self.expert}, "timings": dict(self.timings),
                "prompt_tokens": len(self.job.ids), "truncated": self.job.truncated}


class Orchestrator:
    """Routes jobs and streams their tokens from the served experts; holds their health."""

    def __init__(self, experts: dict[str, Any], tokenizer: Any, route_text: RouteText, *,
                 contexts: dict[str, int], chat_experts: Collection[str] = (),
                 generation: dict[str, dict[str, float]] | None = None,
                 ensemble_threshold: float = 0.5, ensemble_top_k: int = 2, first_token_timeout_s: float = 5.0,
                 share: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.experts, self.tok, self.route_text = experts, tokenizer, route_text
        self.contexts, self.chat_experts = contexts, frozenset(chat_experts)
        self.generation = dict(generation or {})
        self.ensemble_threshold, self.ensemble_top_k = ensemble_threshold, ensemble_top_k
        self.first_token_timeout_s = first_token_timeout_s
        self.health = ExpertHealth(self.experts, share=share)

    # ---- routing ------------------------------------------------------------------------------
    async def route(self, job: Job) -> dict[str, Any]:
        """The routing decision restricted to served experts, following the request's mode."""
        if job.model != "auto":  # a domain expert, or a model outside the domains (merged: no group)
            probs = {d: float(d == job.model) for d in DOMAINS} if job.model in DOMAINS else {job.model: 1.0}
            group = GROUP_OF.get(job.model)
            groups = {g: float(g == group) for g in GROUP_NAMES} if group else {}
            return {"group": group, "group_probs": groups, "expert_probs": probs,
                    "experts": [job.model], "weights": [1.0], "mode": "explicit"}
        full = await self.route_text(job.route_text)
        served = {d: p for d, p in full["expert_probs"].items() if d in self.experts}
        if sum(served.values()) <= 0.0:
            served = dict.fromkeys(self.experts, 1.0)
        threshold, top_k = {"top1": (0.0, 1), "ensemble": (1.0, self.ensemble_top_k),
                            "auto": (self.ensemble_threshold, self.ensemble_top_k)}[job.mode]
        d = decide(served, threshold=threshold, top_k=top_k)
        return {"group": full["group"], "group_probs": full["group_probs"], "expert_probs": full["expert_probs"],
                "experts": list(d.experts), "weights": list(d.weights), "mode": d.mode}

    # ---- generation ---------------------------------------------------------------------------
    async def collect(self, job: Job) -> Generation:
        g = None
        async for g, delta in self.generate(job):
            g.text += delta
        return g

    async def generate(self, job: Job) -> AsyncIterator[tuple[Generation, str]]:
        """Yield ``(generation, text delta)`` for every chunk of tokens; the last has finish_reason."""
        g = Generation(job)
        t = time.perf_counter()
        g.decision = await self.route(job)
        g.timings["route_ms"] = round((time.perf_counter() - t) * 1000.0, 3)
        self.set_prompts(job, g.decision["experts"])
        self.set_defaults(job, g.decision["experts"][0])
        if job.max_tokens == 0:
            g.finish_reason = "length"
            yield g, ""
            return
        asm = TextAssembler(self.tok, job.stops)
        source = self._tokens(g.decision, job)
        try:
            async for chunk in source:
                g.tokens += chunk["tokens"]
                g.timings["max_batch"] = max(g.timings.get("max_batch", 0), chunk.get("batch", 0))
                delta = asm.push(chunk["tokens"])
                if asm.stopped:
                    g.finish_reason = "stop"
                elif chunk["finish_reason"]:
                    g.finish_reason = chunk["finish_reason"]
                    delta += asm.finish()
                    g.timings.update(chunk.get("timings") or {})
                yield g, delta
                if g.finish_reason:
                    return
        finally:
            await source.aclose()

    def set_prompts(self, job: Job, names: list[str]) -> None:
        """Give each routed expert its prompt: ``job.ids``, or for a chat expert (every expert when
        ``job.chat`` is True, none when False) ``route_text`` as a chat user turn,
        ``<|bos|><|user|>text<|end|><|assistant|>``, whose answer ends at ``<|end|>``.
        ``job.ids`` becomes the first expert's prompt."""
        chat = [n for n in names if (n in self.chat_experts if job.chat is None else job.chat)]
        job.prompts = dict.fromkeys(names, job.ids)
        if chat:
            ctx = min(self.contexts[n] for n in names)
            turn, cut = fit_prompt(self.tok.chat([{"role": "user", "content": job.route_text}]), ctx,
                                   truncate=job.truncate, want=job.max_tokens, head=2, tail=2)
            room = ctx - len(turn)
            if room < 1:
                raise InvalidRequest(f"prompt has {len(turn)} tokens as a chat turn, over the context; "
                                     "shorten it, or send it with chat: false", param="prompt")
            job.prompts.update(dict.fromkeys(chat, turn))
            job.truncated = job.truncated or cut
            job.max_tokens = min(job.max_tokens, room)
            job.params["max_new_tokens"] = min(job.params["max_new_tokens"], room)
            job.params["stop_ids"] = tuple(dict.fromkeys((*job.params.get("stop_ids", ()), self.tok.end_id)))
        job.ids = job.prompts[names[0]]

    def set_defaults(self, job: Job, name: str) -> None:
        """Fill the sampling fields the request left out with the defaults of the expert that answers
        (the first routed one): the math expert is greedy unless asked otherwise."""
        for key, value in self.generation.get(name, {}).items():
            if key in job.unset:
                job.params[key] = value

    async def _tokens(self, decision: dict[str, Any], job: Job) -> AsyncIterator[dict[str, Any]]:
        """Token chunks from the chosen expert(s); a dead replica marks its expert down (503s)."""
        names = decision["experts"]
        self.health.check(names)
        source = (self._single(names[0], job) if len(names) == 1
                  else self._ensemble(names, decision["weights"], job))
        deadline = first_answer_deadline_s(self.first_token_timeout_s, job, len(names))
        try:
            try:  # Serve holds requests for a dead replica until its replacement is up: bound that,
                # and stop waiting once the expert is marked down (here or on another ingress replica)
                first = await self.health.first_answer(names, source.__anext__(), deadline)
            except asyncio.TimeoutError:
                e = NotReady(f"expert {', '.join(names)} did not start answering within "
                             f"{deadline:g} s; retry shortly", retry_after_s=1)
                for name in names:
                    self.health.mark_down(name, e)
                raise e from None
            yield first
            async for chunk in source:
                yield chunk
        except StopAsyncIteration:
            return
        except Exception as e:
            if is_replica_death(e):
                for name in names:
                    self.health.mark_down(name, e)
            raise
        finally:
            await source.aclose()

    async def _single(self, name: str, job: Job) -> AsyncIterator[dict[str, Any]]:
        if job.one_message:  # nothing to watch token by token: one message
            yield await self.experts[name].generate_all.remote(job.prompts[name], job.params)
            return
        stream = self.experts[name].options(stream=True).generate.remote(job.prompts[name], job.params)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            stream.cancel()  # frees the expert's slot if the client left early (no-op when done)

    async def _ensemble(self, names: list[str], weights: list[float], job: Job) -> AsyncIterator[dict[str, Any]]:
        """Branch-Train-Merge decoding: each step samples from sum_i w_i * p_i(next token)."""
        handles = [self.experts[n] for n in names]
        opened = await asyncio.gather(*(h.open.remote(job.prompts[n], job.params)
                                        for n, h in zip(names, handles)), return_exceptions=True)
        sessions = [(h, s) for h, s in zip(handles, opened) if isinstance(s, str)]
        try:
            failed = [s for s in opened if not isinstance(s, str)]
            if failed:
                raise failed[0]
            log_w = torch.log(torch.tensor(weights, dtype=torch.float32))[:, None]  # (E, 1)
            params = SamplingParams(**job.params)
            gen, seen = make_generator(params.seed), list(job.ids)
            t0 = time.perf_counter()
            for _ in range(job.max_tokens):
                dists = await asyncio.gather(*(h.step.remote(s) for h, s in sessions))
                mixed = torch.logsumexp(torch.stack([torch.from_numpy(d) for d in dists]) + log_w, dim=0)  # (V,)
                token = sample(mixed, params, gen, seen, seen[len(job.ids):])
                seen.append(token)
                outs = await asyncio.gather(*(h.feed.remote(s, token) for h, s in sessions))
                reason = next((o["finish_reason"] for o in outs if o["finished"]), None)
                chunk = {"tokens": [token], "finish_reason": reason, "batch": 1}
                if reason:
                    chunk["timings"] = {"decode_ms": round((time.perf_counter() - t0) * 1000.0, 3)}
                yield chunk
                if reason:
                    return
        finally:
            await asyncio.gather(*(h.close.remote(s) for h, s in sessions), return_exceptions=True)
