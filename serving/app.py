"""The typed app builder: ``build_app(AppArgs) -> Application`` (``serve run serving.app:build_app``).

The graph: one ``Expert`` deployment per served domain (the same class bound with different
arguments), the FastAPI ``Ingress`` that holds their handles, and, with
``router_placement: deployment``, a ``Router`` deployment (by default the ingress routes itself).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from experts.checkpoint import TOKENIZER, CheckpointError, read_meta
from experts.config import ModelConfig
from experts.tokenizer import Tokenizer
from router.domains import CHAT_EXPERTS, generation_defaults
from serving.config import AppArgs
from serving.deployments import Expert, Router
from serving.errors import RETRY_AFTER_S
from serving.ingress import Ingress, IngressSettings

log = logging.getLogger(__name__)

STICKY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


class ServedExpert(NamedTuple):
    """What the ingress needs from an expert's checkpoint."""

    config: ModelConfig
    chat: bool  # it reads a native prompt as a chat user turn (see :func:`is_chat_expert`)
    generation: dict[str, float]  # sampling defaults (router.domains.generation_defaults)


def is_chat_expert(name: str, meta: dict[str, Any]) -> bool:
    """An expert answers chat turns when its checkpoint was instruction-tuned (a truthy ``instruct``
    in ``meta.json``) or it was trained on dialogues (``router.domains.CHAT_EXPERTS``)."""
    return bool(meta.get("instruct")) or name in CHAT_EXPERTS


def served_experts(args: AppArgs) -> dict[str, ServedExpert]:
    """Read and verify each expert's checkpoint (fails before deploying, naming the bad file)."""
    served = {}
    for name in args.experts:
        path = args.expert_dir(name)
        meta = read_meta(path, kind="lm", verify=True)  # a corrupt file is refused, not served
        try:
            config = ModelConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}/meta.json: invalid model config ({e})") from e
        served[name] = ServedExpert(config, is_chat_expert(name, meta), generation_defaults(meta))
    return served


def ingress_settings(args: AppArgs, experts: dict[str, ServedExpert]) -> IngressSettings:
    tokenizer = args.expert_dir(args.experts[0]) / TOKENIZER
    if not tokenizer.is_file():
        raise CheckpointError(f"{tokenizer}: missing; expert checkpoints must include the tokenizer")
    return IngressSettings(
        tokenizer_path=str(tokenizer), contexts={n: e.config.max_seq_len for n, e in experts.items()},
        chat_experts=[n for n, e in experts.items() if e.chat],
        generation={n: e.generation for n, e in experts.items() if e.generation},
        vocab_size=min(Tokenizer.load(tokenizer).vocab_size, *(e.config.vocab_size for e in experts.values())),
        max_tokens_cap=args.max_tokens_cap,
        max_body_bytes=args.max_body_bytes, api_key=args.api_key,
        ensemble_threshold=args.ensemble_threshold, ensemble_top_k=args.ensemble_top_k,
        first_token_timeout_s=args.first_token_timeout_s, torch_threads=args.torch_threads,
        router_dir=str(args.router_dir))


def _expert_app(args: AppArgs, name: str) -> Application:
    options: dict[str, Any] = dict(
        name=f"Expert-{name}", num_replicas=args.expert.replicas,
        ray_actor_options=args.expert.actor_options(),
        max_ongoing_requests=2 * args.max_batch,  # streams beyond the slots wait inside the worker
        max_queued_requests=args.max_queued_requests)
    if args.expert.replicas > 1:  # ensemble sessions must come back to the replica that holds them
        options["request_router_config"] = {"request_router_class": STICKY_ROUTER}
    return Expert.options(**options).bind(name, str(args.expert_dir(name)), max_batch=args.max_batch,
                                          torch_threads=args.torch_threads, device=args.device,
                                          decode_weights=args.decode_weights, engine=args.engine)


def _router_app(args: AppArgs) -> Application | None:
    """The Router deployment, or None when the ingress routes (it then loads the same checkpoint)."""
    read_meta(args.router_dir, kind="router", verify=True)
    if args.router_placement == "ingress":
        return None
    return Router.options(num_replicas=args.router.replicas, ray_actor_options=args.router.actor_options(),
                          max_ongoing_requests=args.max_ongoing_requests,
                          max_queued_requests=args.max_queued_requests).bind(
        str(args.router_dir), threshold=args.ensemble_threshold, top_k=args.ensemble_top_k,
        torch_threads=args.torch_threads)


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    """Build the Serve application graph from validated arguments."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    settings = ingress_settings(args, served_experts(args))
    experts = {name: _expert_app(args, name) for name in args.experts}
    log.info("serving %s from %s", ", ".join(args.experts), args.run_dir)
    return Ingress.options(
        num_replicas=args.ingress.replicas, ray_actor_options=args.ingress.actor_options(),
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),
    ).bind(experts, _router_app(args), settings.model_dump())
