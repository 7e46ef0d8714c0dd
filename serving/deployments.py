"""Serve deployments behind the ingress: ``Expert`` (bound once per domain) and ``Router``.

Both receive resolved checkpoint paths from ``build_app`` (the fixed registry); nothing a
request carries ever becomes a path.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from experts.device import set_threads
from experts.sampling import SamplingParams
from serving.engine_worker import EngineWorker, ProcessEngineWorker, load_engine

log = logging.getLogger(__name__)


@serve.deployment(name="Expert", graceful_shutdown_timeout_s=5, health_check_period_s=10)
class Expert:
    """One domain expert: an Engine stepped by its own loop (in a child process, or on a thread with
    ``engine="thread"``), streaming tokens per request."""

    def __init__(self, name: str, ckpt_dir: str, *, max_batch: int, torch_threads: int,
                 device: str = "cpu", decode_weights: str = "fp32", engine: str = "process") -> None:
        spec = dict(ckpt_dir=ckpt_dir, max_batch=max_batch, torch_threads=torch_threads, device=device,
                    decode_weights=decode_weights)
        # process: the engine loop has a GIL of its own (the replica's event loop slows a thread's steps)
        self.worker = ProcessEngineWorker(spec) if engine == "process" else EngineWorker(load_engine(**spec))
        self.name, self.cfg = name, self.worker.config
        log.info("expert %s serving %s (%d slots, engine on a %s)", name, ckpt_dir, max_batch, engine)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "context_length": self.cfg.max_seq_len,
                "vocab_size": self.cfg.vocab_size, "params": self.cfg.num_params()}

    async def generate(self, prompt_ids: list[int], params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks of new tokens (call with ``handle.options(stream=True)``)."""
        async for chunk in self.worker.generate(prompt_ids, SamplingParams(**params)):
            yield chunk

    async def generate_all(self, prompt_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        """The whole generation as one chunk: one message instead of one per token (non-streaming)."""
        chunk: dict[str, Any] = {}
        async for chunk in self.worker.generate(prompt_ids, SamplingParams(**params), collect=True):
            pass  # collect=True: exactly one chunk, at the end
        return chunk

    async def score(self, ids: list[int], top: int = 0, dists: bool = False) -> dict[str, Any]:
        """Prompt log-probs for ``echo`` (the first token has none); ``dists``: the whole
        log-distribution at each position, which the ingress mixes for an ensemble."""
        return await self.worker.score(ids, top, dists)

    # ---- ensemble session API: the ingress picks every token ----------------------------------
    async def open(self, prompt_ids: list[int], params: dict[str, Any]) -> str:
        return await self.worker.open_session(prompt_ids, SamplingParams(**params))

    async def step(self, session: str) -> Any:
        """Next-token log-probabilities ``(V,)`` as a float32 numpy array."""
        return await self.worker.session_logprobs(session)

    async def feed(self, session: str, token: int) -> dict[str, Any]:
        return await self.worker.session_feed(session, token)

    async def close(self, session: str) -> None:
        await self.worker.close_session(session)

    async def stats(self) -> dict[str, Any]:
        return {"name": self.name, **(await self.worker.stats_dict())}

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine process died is replaced."""
        self.worker.check()

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()


class RouteTable:
    """The learned router (or, for tests, fixed probabilities) as plain dict decisions.

    Used inside the ingress (``router_placement: ingress``, the default) or behind the ``Router``
    deployment (``router_placement: deployment``).
    """

    def __init__(self, router_dir: str, *, threshold: float, top_k: int) -> None:
        from router.router import load_router

        self.router = load_router(Path(router_dir), threshold=threshold, top_k=top_k)

    def route_many(self, prompts: list[str]) -> list[dict[str, Any]]:
        """Decisions for several prompts in one forward pass (``router.policy.Decision`` fields)."""
        return [d.to_dict() for d in self.router.route_batch(prompts)]


@serve.deployment(name="Router", graceful_shutdown_timeout_s=5)
class Router:
    """A ``RouteTable`` as a deployment of its own, behind ``route(prompt)`` / ``route_many(prompts)``."""

    def __init__(self, router_dir: str, *, threshold: float, top_k: int, torch_threads: int = 1) -> None:
        set_threads(torch_threads)
        self.table = RouteTable(router_dir, threshold=threshold, top_k=top_k)

    async def route(self, prompt: str) -> dict[str, Any]:
        """The routing decision as a plain dict (``router.policy.Decision`` fields)."""
        return (await self.route_many([prompt]))[0]

    async def route_many(self, prompts: list[str]) -> list[dict[str, Any]]:
        """Decisions for several prompts in one forward pass (the ingress batches concurrent requests).

        ``async`` although it never awaits: the forward takes ~0.5 ms, less than the hand-off to
        Serve's thread pool that a plain method costs."""
        return self.table.route_many(prompts)
