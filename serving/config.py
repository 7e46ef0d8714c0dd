"""Typed arguments of the Serve application (``serve run serving.app:build_app key=value``).

Resource defaults fit five experts on a two-core machine: each replica asks for a fraction of a
CPU and runs torch with one thread, so five experts do not oversubscribe the cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.domains import DOMAINS
from training.scoring import MODEL_NAMES, model_dir, model_dirs

MERGED = "merged"  # the Branch-Train-MiX model: served when the run has one, chosen by name only


class DeploymentResources(BaseModel):
    """Replicas and Ray resources of one deployment."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, le=64)
    num_cpus: float = Field(0.3, ge=0.0, le=64.0)
    num_gpus: float = Field(0.0, ge=0.0, le=8.0)

    def actor_options(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


class AppArgs(BaseModel):
    """Everything ``build_app`` needs; every field is bounded and named in errors."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(..., description="run directory with experts/<domain>/ and router/")
    experts: list[str] | None = Field(
        None, min_length=1,
        description="models to serve: domain experts (the router chooses among them), and any other LM "
                    "of the run by name (merged, baseline-dense, baseline-moe), which answers when a request names it "
                    "(or every request, when no domain expert is served). Default: the run's trained domain experts, and its merged model "
                    "when it has one")
    expert: DeploymentResources = Field(default_factory=lambda: DeploymentResources(num_cpus=0.3))
    router: DeploymentResources = Field(default_factory=lambda: DeploymentResources(num_cpus=0.1),
                                        description="the Router deployment (router_placement: deployment)")
    router_placement: Literal["ingress", "deployment"] = Field(
        "ingress", description="ingress: each ingress replica runs the router itself (a small forward, "
                               "cheaper than a hop to another deployment); deployment: a Router deployment, "
                               "scaled on its own (a heavier router, or one on a GPU)")
    ingress: DeploymentResources = Field(
        default_factory=lambda: DeploymentResources(replicas=2, num_cpus=0.1),
        description="two replicas: a wave of concurrent requests is parsed, routed and answered by two "
                    "Python processes instead of queueing through one")
    torch_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads per replica")
    device: str = Field("cpu", description="torch device of the experts: auto, cpu or an accelerator")
    max_batch: int = Field(32, ge=1, le=512, description="decode slots per expert replica")
    decode_weights: Literal["fp32", "int8"] = Field(
        "fp32", description="int8: weight-only int8 projections (about 2x faster decoding on a CPU; "
                            "logits within ~1-2%, see experts.quant); fp32: the checkpoint as trained")
    engine: Literal["process", "thread"] = Field(
        "process", description="where each expert replica runs its decode loop: process (a child "
                               "process with a GIL of its own; batch-8 steps ~25-55% faster beside a busy "
                               "replica event loop) or thread (inside the replica process)")
    max_ongoing_requests: int = Field(64, ge=1, le=10_000, description="per ingress replica")
    max_queued_requests: int = Field(128, ge=-1, le=100_000, description="-1: unbounded")
    max_tokens_cap: int = Field(256, ge=1, le=100_000, description="largest max_tokens a request may ask")
    max_body_bytes: int = Field(1_000_000, ge=1_024, le=100_000_000)
    api_key: str | None = Field(None, min_length=8, description="Bearer token; None disables auth")
    ensemble_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                      description="mode=auto mixes experts when top prob < this")
    ensemble_top_k: int = Field(2, ge=1, le=len(DOMAINS))
    first_token_timeout_s: float = Field(
        5.0, gt=0, description="an expert that has not started answering by then is treated as down: "
                               "503 + Retry-After, and its requests fail fast until it answers a probe "
                               "(a non-streaming answer, sent whole at the end, gets 0.1 s per max_tokens more)")

    @field_validator("experts")
    @classmethod
    def _known_experts(cls, v: list[str] | None) -> list[str] | None:
        for name in v or ():
            if name not in MODEL_NAMES:
                raise ValueError(f"unknown expert {name!r}; choose from {list(MODEL_NAMES)}")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"experts={v} lists an expert twice")
        return v

    @model_validator(mode="after")
    def _run_dir_exists(self) -> "AppArgs":
        if not Path(self.run_dir).is_dir():
            raise ValueError(f"run_dir={self.run_dir!r} is not a directory; train a run first "
                             "(hmoe up --preset quick, or hmoe train)")
        if self.experts is None:
            trained = [n for n in model_dirs(self.run_dir) if n in (*DOMAINS, MERGED)]
            self.experts = trained or list(DOMAINS)  # none trained: the checkpoint check names what is missing
        return self

    # ---- the fixed registry: names -> checkpoint directories (never from a request) ----------
    def expert_dir(self, name: str) -> Path:
        return model_dir(self.run_dir, name)

    @property
    def router_dir(self) -> Path:
        return Path(self.run_dir) / "router"
