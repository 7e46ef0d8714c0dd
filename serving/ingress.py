"""The HTTP ingress: OpenAI-compatible and native routes over the Router and Expert deployments.

A request becomes a :class:`~serving.orchestrate.Job` (prompt ids, sampling parameters, limits
checked here); ``serving.orchestrate.Orchestrator`` routes it and streams its tokens. Routes only
translate between HTTP shapes and the orchestrator; errors map to statuses in ``serving.errors``.
The ingress replicas share which experts are down (``handle.broadcast``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from experts.device import set_threads
from experts.sampling import SamplingParams
from experts.tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, Tokenizer
from router.prefix import prefix_text
from serving import guard
from serving import schemas as S
from serving.batching import TickBatcher
from serving.deployments import RouteTable
from serving.errors import InvalidRequest, ModelNotFound, NotReady, ServingError, install_handlers, to_serving_error
from serving.orchestrate import Generation, Job, Orchestrator, fit_prompt, mixture_scores

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16
TELL_REPLICAS_TIMEOUT_S = 2.0  # telling the other ingress replicas that an expert is down
_PAGE = Path(__file__).parent / "static" / "index.html"


class IngressSettings(BaseModel):
    """What the ingress needs to know about the served models and its limits."""

    tokenizer_path: str
    contexts: dict[str, int]  # expert -> context length (max_seq_len)
    chat_experts: list[str] = []  # experts that read a native prompt as a chat user turn (serving.app)
    generation: dict[str, dict[str, float]] = {}  # expert -> sampling defaults for fields a request omits
    vocab_size: int
    max_tokens_cap: int
    max_body_bytes: int
    api_key: str | None = None
    ensemble_threshold: float = 0.5
    ensemble_top_k: int = 2
    first_token_timeout_s: float = 5.0
    torch_threads: int = 1
    router_dir: str | None = None  # the router checkpoint, loaded here when there is no Router deployment


app = FastAPI(title="hmoe", description="hierarchical mixture of small domain experts",
              version="0.1.0")
app.add_middleware(guard.GuardMiddleware)
install_handlers(app)


def _sse_line(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> S.Usage:
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _json(body: BaseModel, g: Generation) -> JSONResponse:
    headers = {"x-hmoe-expert": ",".join(g.decision["experts"]),
               "x-hmoe-batch": str(int(g.timings.get("max_batch", 0)))}
    return JSONResponse(body.model_dump(), headers=headers)


def _finite(x: float | None) -> float | None:
    """JSON has no -inf: a zero probability is reported as a very negative log-prob."""
    return x if x is None or math.isfinite(x) else -1e30


@serve.deployment(name="Ingress", graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class Ingress:
    """Routes requests to experts; holds a DeploymentHandle per expert, and the router: its own
    ``RouteTable``, or the handle of a Router deployment."""

    def __init__(self, experts: dict[str, DeploymentHandle], router: DeploymentHandle | None,
                 settings: IngressSettings | dict[str, Any]) -> None:
        self.settings = IngressSettings.model_validate(settings)
        self.experts = dict(experts)
        self._replicas: DeploymentHandle | None = None  # this deployment's handle, for broadcasts
        self.router = router
        self._route_local = None
        if router is None:  # the ingress routes itself; the requests of one loop tick share a forward
            set_threads(self.settings.torch_threads)
            table = RouteTable(self.settings.router_dir, threshold=self.settings.ensemble_threshold,
                               top_k=self.settings.ensemble_top_k)
            self._route_local = TickBatcher(table.route_many)
        self.tok = Tokenizer.load(self.settings.tokenizer_path)
        st = self.settings
        self.orch = Orchestrator(self.experts, self.tok, self._route_any, contexts=st.contexts,
                                 chat_experts=st.chat_experts, generation=st.generation,
                                 ensemble_threshold=st.ensemble_threshold, ensemble_top_k=st.ensemble_top_k,
                                 first_token_timeout_s=st.first_token_timeout_s, share=self._tell_replicas)
        self.health = self.orch.health
        self.stop_ids = (self.tok.eos_id, self.tok.end_id)
        self.ready = False
        guard.configure(api_key=self.settings.api_key, max_body_bytes=self.settings.max_body_bytes)

    # ---- the chat page ------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(self) -> HTMLResponse:
        """The static chat page; it calls the API below (with the key the user types, if any)."""
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    # ---- health -------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if not self.ready:
            calls = [h.info.remote() for h in self.experts.values()]
            calls += [self.router.route.remote("")] if self.router is not None else []
            try:
                await asyncio.wait_for(asyncio.gather(*calls), timeout=2.0)
                self.ready = True
            except Exception as e:  # not loaded yet (or failed): not ready
                return NotReady(f"experts are not all loaded yet ({type(e).__name__})").response()
        return JSONResponse({"status": "ready", "experts": sorted(self.experts)})

    # ---- which experts are down, the same on every ingress replica -----------------------------
    async def expert_down(self, name: str) -> None:
        """Another ingress replica marked expert ``name`` down (called through ``handle.broadcast``)."""
        if name in self.experts:
            self.health.mark_down(name, NotReady(f"another ingress replica marked {name} down"), share=False)

    async def _tell_replicas(self, name: str) -> None:
        """Mark ``name`` down on every ingress replica: one with no call in flight to the dead replica
        gets no error of its own, Serve holds its requests until the first-answer deadline."""
        if self._replicas is None:
            ctx = serve.get_replica_context()
            self._replicas = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        await self._replicas.broadcast("expert_down", name).results_async(
            timeout_s=TELL_REPLICAS_TIMEOUT_S, return_exceptions=True)

    # ---- listing and stats --------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> S.ModelList:
        ctx = min(self.settings.contexts.values())
        cards = [S.ModelCard(id="auto", context_length=ctx)]
        cards += [S.ModelCard(id=n, context_length=self.settings.contexts[n]) for n in self.experts]
        return S.ModelList(data=cards)

    @app.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        """Decode batch statistics of each expert (one replica each)."""
        names = list(self.experts)
        got = await asyncio.gather(*(self.experts[n].stats.remote() for n in names))
        out = {"experts": dict(zip(names, got)), "max_batch": max(s["max_batch"] for s in got),
               "health": self.health.status()}
        if self._route_local is not None:  # this ingress replica's router forwards
            out["router"] = {"prompts": self._route_local.calls, "forwards": self._route_local.batches}
        return out

    # ---- the tokenizer (vLLM's routes; lm-evaluation-harness's tokenizer_backend=remote) --------
    @app.post("/tokenize")
    async def tokenize(self, req: S.TokenizeRequest) -> S.TokenizeResponse:
        """Token ids as the server would build them: ``prompt`` as /v1/completions does (with
        ``add_special_tokens``, <|bos|> first), or ``messages`` through the chat template. Special
        tokens written in ``prompt`` map to their ids, as in any tokenizer API."""
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequest("give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            ids = self.tok.chat([{"role": m.role, "content": m.text()} for m in req.messages],
                                add_generation_prompt=req.add_generation_prompt)
        else:
            ids = self.tok.encode(req.prompt, bos=req.add_special_tokens)
        return S.TokenizeResponse(count=len(ids), max_model_len=min(self.settings.contexts.values()), tokens=ids)

    @app.post("/detokenize")
    async def detokenize(self, req: S.DetokenizeRequest) -> S.DetokenizeResponse:
        bad = [i for i in req.tokens if i >= self.tok.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids outside the vocabulary [0, {self.tok.vocab_size}): {bad[:5]}",
                                 param="tokens")
        return S.DetokenizeResponse(prompt=self.tok.decode(req.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict[str, Any]:
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                "chat_template": CHAT_TEMPLATE, "model_max_length": min(self.settings.contexts.values()),
                "vocab_size": self.tok.vocab_size}

    # ---- OpenAI: completions ------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, req: S.CompletionRequest) -> Any:
        prompts = req.prompts()
        if req.stream and len(prompts) > 1:
            raise InvalidRequest("streaming supports one prompt per request", param="prompt")
        self._check_model(req.model, "model")
        jobs = [self._completion_job(p, req) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await self._sse(self._completion_stream(jobs[0], req, rid, created))
        gens = await asyncio.gather(*(self.orch.collect(j) for j in jobs))
        choices = [await self._completion_choice(i, g, req) for i, g in enumerate(gens)]
        usage = _usage(sum(len(j.ids) for j in jobs), sum(len(g.tokens) for g in gens))
        body = S.CompletionResponse(id=rid, created=created, model=req.model, choices=choices,
                                    usage=usage, hmoe=gens[0].summary() if len(gens) == 1 else None)
        return _json(body, gens[0])

    def _completion_job(self, prompt: str | list[int], req: S.CompletionRequest) -> Job:
        if isinstance(prompt, str):
            ids, echo_from, text = [self.tok.bos_id, *self.tok.encode(prompt, specials=False)], 1, prompt
        else:
            ids, echo_from, text = list(prompt), 0, self.tok.decode(prompt)
        budget = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
        if req.echo:  # scoring (lm-eval's loglikelihood): the choices that share a context share an expert
            text = prefix_text(self.tok, text)
        return self._job(ids, echo_from, text, req, req.model, budget)

    async def _completion_choice(self, i: int, g: Generation, req: S.CompletionRequest) -> S.CompletionChoice:
        prefix = ""
        if req.echo:  # the prompt as scored: what was kept of it
            prompt = req.prompts()[i]
            if g.job.truncated:
                prefix = self.tok.decode(g.job.ids[g.job.echo_from:])
            else:
                prefix = prompt if isinstance(prompt, str) else self.tok.decode(prompt)
        logprobs = await self._logprobs(g, req) if req.logprobs is not None else None
        return S.CompletionChoice(index=i, text=prefix + g.text, logprobs=logprobs,
                                  finish_reason=g.finish_reason)

    async def _logprobs(self, g: Generation, req: S.CompletionRequest) -> S.LogProbs:
        """OpenAI's legacy structure over the echoed prompt (if ``echo``) and the completion."""
        job, top = g.job, req.logprobs or 0
        seq = job.ids + g.tokens
        first = job.echo_from if req.echo else len(job.ids)
        names = g.decision["experts"]
        if len(seq) >= 2 and len(names) > 1:  # an ensemble: the mixture it decodes from scores the text
            dists = await asyncio.gather(*(self.experts[n].score.remote(seq, 0, True) for n in names))
            scored = mixture_scores(seq, [torch.from_numpy(d) for d in dists], g.decision["weights"], top)
        elif len(seq) >= 2:
            scored = await self.experts[g.expert].score.remote(seq, top)
        else:
            scored = {"token_logprobs": [None], "top": [None]}
        lp = S.LogProbs()
        offset = 0
        for pos in range(first, len(seq)):
            piece = self._piece(seq[pos])
            lp.tokens.append(piece)
            lp.token_logprobs.append(_finite(scored["token_logprobs"][pos]))
            alts = scored["top"][pos]
            lp.top_logprobs.append(None if alts is None or top == 0 else
                                   {self._piece(t): _finite(v) for t, v in alts})
            lp.text_offset.append(offset)
            offset += len(piece)
        return lp

    def _piece(self, token: int) -> str:
        """One token's text (specials spelled out; ids past the tokenizer's vocabulary are empty)."""
        return self.tok.decode([token], skip_special=False) if token < self.tok.vocab_size else ""

    async def _completion_stream(self, job: Job, req: S.CompletionRequest, rid: str,
                                 created: int) -> AsyncIterator[dict[str, Any]]:
        async for g, delta in self.orch.generate(job):
            if delta or g.finish_reason:
                yield {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                       "choices": [{"index": 0, "text": delta, "logprobs": None,
                                    "finish_reason": g.finish_reason}]}
            if g.finish_reason and req.stream_options and req.stream_options.include_usage:
                yield {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                       "choices": [], "usage": _usage(len(job.ids), len(g.tokens)).model_dump()}

    # ---- OpenAI: chat -------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(self, req: S.ChatRequest) -> Any:
        self._check_model(req.model, "model")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = self.tok.chat(messages)
        users = [m["content"] for m in messages if m["role"] == "user"]
        job = self._job(ids, 0, users[-1] if users else messages[-1]["content"], req, req.model,
                        req.token_budget())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await self._sse(self._chat_stream(job, req, rid, created))
        g = await self.orch.collect(job)
        body = S.ChatResponse(id=rid, created=created, model=req.model, usage=_usage(len(job.ids), len(g.tokens)),
                              choices=[S.ChatChoice(index=0, message=S.ChatChoiceMessage(content=g.text),
                                                    finish_reason=g.finish_reason)],
                              hmoe=g.summary())
        return _json(body, g)

    async def _chat_stream(self, job: Job, req: S.ChatRequest, rid: str, created: int
                           ) -> AsyncIterator[dict[str, Any]]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        first = True
        async for g, delta in self.orch.generate(job):
            if first or delta or g.finish_reason:
                d = {"role": "assistant", "content": delta} if first else {"content": delta}
                first = False
                yield {**head, "choices": [{"index": 0, "delta": d if delta or "role" in d else {},
                                            "finish_reason": g.finish_reason}]}
            if g.finish_reason and req.stream_options and req.stream_options.include_usage:
                yield {**head, "choices": [], "usage": _usage(len(job.ids), len(g.tokens)).model_dump()}

    # ---- native -------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(self, req: S.GenerateRequest) -> Any:
        model = self._check_model(req.expert, "expert") if req.expert else "auto"
        ids = [self.tok.bos_id, *self.tok.encode(req.prompt, specials=False)]
        # the schema's default (64) must not fail on a server whose cap is lower: only an explicit value can
        budget = req.max_tokens if "max_tokens" in req.model_fields_set else min(64, self.settings.max_tokens_cap)
        job = self._job(ids, 1, req.prompt, req, model, budget)
        job.chat = req.chat
        if req.stream:
            return await self._sse(self._native_stream(job))
        g = await self.orch.collect(job)
        return _json(self._native_body(g), g)

    def _native_body(self, g: Generation) -> S.GenerateResponse:
        s = g.summary()
        return S.GenerateResponse(text=g.text, routing=S.Routing(**s["routing"]), prompt_tokens=len(g.job.ids),
                                  truncated=g.job.truncated,
                                  completion_tokens=len(g.tokens), finish_reason=g.finish_reason or "length",
                                  timings=S.Timings(**s["timings"]))

    async def _native_stream(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        first = True
        async for g, delta in self.orch.generate(job):
            if g.finish_reason:
                yield {"text": delta, "done": True, **self._native_body(g).model_dump()}
            elif delta or first:  # the first event carries the routing decision
                event = {"text": delta, "done": False, "completion_tokens": len(g.tokens)}
                if first and g.decision:
                    event["routing"] = g.summary()["routing"]
                    first = False
                yield event

    # ---- jobs ---------------------------------------------------------------------------------
    def _check_model(self, name: str, param: str) -> str:
        if name != "auto" and name not in self.experts:
            choices = ["auto", *self.experts] if param == "model" else list(self.experts)
            raise ModelNotFound(f"unknown {param} {name!r}; choose one of {choices}", param=param)
        return name

    def _job(self, ids: list[int], echo_from: int, route_text: str, req: S.SamplingFields,
             model: str, max_tokens: int | None) -> Job:
        """Check the request against the models' limits and build its Job (400 naming the field)."""
        cap, vocab = self.settings.max_tokens_cap, self.settings.vocab_size
        ctx = self.settings.contexts[model] if model != "auto" else min(self.settings.contexts.values())
        if max_tokens is not None and max_tokens > cap:
            raise InvalidRequest(f"max_tokens={max_tokens} exceeds this server's cap of {cap}", param="max_tokens")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequest(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                                 param="prompt")
        want = cap if max_tokens is None else max_tokens
        head = 1 if ids and ids[0] == self.tok.bos_id else 0  # <|bos|> stays first
        ids, truncated = fit_prompt(ids, ctx, truncate=req.truncate_prompt_tokens, want=want, head=head)
        room = ctx - len(ids)
        if room < 0 or (room == 0 and max_tokens != 0):
            raise InvalidRequest(f"prompt has {len(ids)} tokens but the context is {ctx} tokens "
                                 "(including at least one generated token); shorten it, or set "
                                 "truncate_prompt_tokens (-1: keep what fits)", param="prompt")
        budget = min(cap if max_tokens is None else max_tokens, room)  # the context bounds generation
        params = dict(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                      repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                      presence_penalty=req.presence_penalty, max_new_tokens=budget,
                      stop_ids=() if req.ignore_eos else self.stop_ids, seed=req.seed)
        SamplingParams(**params)  # ValueError -> 400
        unset = frozenset(S.DEFAULTABLE - req.model_fields_set)
        return Job(ids, echo_from, route_text, model, req.mode, budget, params, req.stop_list(), req.stream,
                   truncate=req.truncate_prompt_tokens, truncated=truncated, unset=unset)

    # ---- routing ------------------------------------------------------------------------------
    async def _route_any(self, text: str) -> dict[str, Any]:
        if self._route_local is not None:  # in-process: the requests of one loop tick share a forward
            return await self._route_local(text)
        return await self._route_text(text)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _route_text(self, texts: list[str]) -> list[dict[str, Any]]:
        """Route the prompts of concurrent requests with ONE call to the Router deployment.

        A handle call costs the ingress ~1 ms of CPU (Serve's request routing and Ray's actor
        call); at 8 concurrent clients this halves the router calls per request.
        """
        return await self.router.route_many.remote(list(texts))

    # ---- SSE ----------------------------------------------------------------------------------
    async def _sse(self, events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        """Start the stream (so routing / overload errors still get a status), then stream SSE."""
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None

        async def body() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield _sse_line(first)
                async for event in events:
                    yield _sse_line(event)
            except Exception as e:  # after the 200 is sent: report in-band, then end the stream
                yield _sse_line(to_serving_error(e).body())
            finally:
                await events.aclose()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["Ingress", "IngressSettings", "app", "ServingError"]
