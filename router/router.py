"""``Router``: the trained classifier, its tokenizer and temperature, behind ``route(prompt)``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from experts.checkpoint import TOKENIZER, CheckpointError
from experts.classifier import load_classifier
from router.domains import DOMAINS, GROUP_NAMES
from router.model import RouterConfig, RouterModel, collate, encode_prompt
from router.policy import Decision, check_policy_args, decide, default_decision

log = logging.getLogger(__name__)

CALIBRATION = "calibration.json"


class TextEncoder(Protocol):
    """What the router needs from a tokenizer (``experts.tokenizer.Tokenizer`` fits)."""

    pad_id: int

    def encode(self, text: str) -> list[int]: ...


class Router:
    """Route prompts to experts: P(group) x P(expert | group) at a calibrated temperature."""

    def __init__(self, model: RouterModel, tokenizer: TextEncoder, *, temperature: float = 1.0,
                 threshold: float = 0.5, top_k: int = 2) -> None:
        check_policy_args(threshold, top_k)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: must be > 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.threshold, self.top_k = threshold, top_k

    @property
    def cfg(self) -> RouterConfig:
        return self.model.cfg

    def encode(self, prompt: str) -> list[int]:
        """The ids the router reads (``router.model.encode_prompt``: the first ``max_len`` tokens)."""
        return encode_prompt(self.tokenizer, prompt, self.cfg)

    @torch.no_grad()
    def probs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(group) (B, 3), P(expert) (B, 5)) for non-empty prompts (columns: GROUP_NAMES, DOMAINS)."""
        device = next(self.model.parameters()).device
        tokens, mask = collate([self.encode(p) for p in prompts], self.cfg.max_len,
                               getattr(self.tokenizer, "pad_id", 0))
        return self.model.probs(tokens.to(device), mask.to(device), temperature=self.temperature)

    def route(self, prompt: str) -> Decision:
        """Route one prompt; an empty or whitespace-only prompt goes to ``DEFAULT_EXPERT``."""
        return self.route_batch([prompt])[0]

    def route_batch(self, prompts: Sequence[str]) -> list[Decision]:
        """Route many prompts in one forward pass (empty prompts get the default decision)."""
        live = [i for i, p in enumerate(prompts) if p and p.strip()]
        out: list[Decision] = [default_decision()] * len(prompts)
        if live:
            _, e_probs = self.probs([prompts[i] for i in live])
            for i, row in zip(live, e_probs.cpu().tolist()):
                out[i] = decide(dict(zip(DOMAINS, row)), threshold=self.threshold, top_k=self.top_k)
        return out

    def __repr__(self) -> str:
        return (f"Router(groups={list(GROUP_NAMES)}, temperature={self.temperature:.3f}, "
                f"threshold={self.threshold}, top_k={self.top_k})")


def load_router(path: str | Path, *, device: str | torch.device = "cpu", threshold: float = 0.5,
                top_k: int = 2, tokenizer: Any = None, verify: bool = True) -> Router:
    """Load a router checkpoint (kind "router"): model, tokenizer.json and calibrated temperature."""
    path = Path(path)
    model, cfg = load_classifier(path, verify=verify)
    temperature = 1.0
    if (path / CALIBRATION).is_file():
        temperature = float(json.loads((path / CALIBRATION).read_text()).get("temperature", 1.0))
    if tokenizer is None:
        from experts.tokenizer import Tokenizer

        if not (path / TOKENIZER).is_file():
            raise CheckpointError(f"{path / TOKENIZER}: missing; the router checkpoint needs its tokenizer")
        tokenizer = Tokenizer.load(path / TOKENIZER)
    log.info("loaded router from %s (T=%.3f)", path, temperature)
    return Router(model.to(device), tokenizer, temperature=temperature, threshold=threshold, top_k=top_k)
