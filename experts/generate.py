"""Generation over token ids: a continuous-batching ``Engine`` on the slot KV cache, and ``generate``.

Nothing here knows about text: prompts are lists of ids, outputs are ids (the tokenizer wraps this).

Conventions:
- A request's ``seen`` ids (for the repetition penalty) are its prompt plus what it generated.
- ``StepOut.logprob`` is the log-probability of the chosen id under the *model's* distribution
  (raw logits, before penalty / temperature / top-k / top-p), as an API's ``logprobs`` reports it.
- A stop id is returned as the last token of its request (``finish_reason == "stop"``).
- A request also finishes with ``"length"`` when its context is full (it cannot feed the token).
- ``generate`` seeds row ``i`` with ``params.seed + i`` so identical prompts in one batch differ.
- A ``tool`` (``experts.calculator.Calculator``) sees each request's generated ids after every token
  and may return ids to feed next instead of sampling them (one per step, through the same forward).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any
import dataclasses
from dataclasses import dataclass, field

import torch

from experts.model import KVCache, Transformer
from experts.sampling import SamplingParams, make_generator, sample, sample_allowed
from experts.scoring import token_logprobs

log = logging.getLogger(__name__)


@dataclass
class StepOut:
    token: int | None  # None only for a request with max_new_tokens == 0
    logprob: float | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None while running


@dataclass
class _Request:
    params: SamplingParams
    generator: torch.Generator
    seen: list[int]
    external: bool = False
    n_new: int = 0
    next_logits: torch.Tensor | None = None  # (V,) fp32 logits for the next position
    next_argmax: int = -1  # argmax of next_logits (the greedy choice without a penalty)
    next_max: float = 0.0  # next_logits[next_argmax]
    next_lse: float | None = None  # logsumexp(next_logits); None when log-probs are off
    finish_reason: str | None = None
    reported: bool = False  # for max_new_tokens == 0: the empty result was returned once
    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)  # ids a tool wrote, fed before sampling resumes
    guard: Any = None  # the request's ``experts.syntax_guard.GuardState``: which ids may come next

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def choose(self) -> int:
        """The next id: a tool's, else the precomputed argmax when greedy without a penalty, else ``sample``."""
        if self.forced:
            return self.forced.pop(0)
        p = self.params
        if self.guard is not None:
            return sample_allowed(self.next_logits, p, self.generator, self.seen, self.tokens, self.guard.allows,
                                  self.guard.max_tries)
        if p.greedy and not p.penalised:
            return self.next_argmax
        return sample(self.next_logits, p, self.generator, self.seen, self.tokens)

    def accept(self, token: int, max_len: int) -> StepOut:
        """Record ``token`` and decide whether the request is finished."""
        logprob = None
        if self.next_lse is not None:
            top = self.next_max if token == self.next_argmax else float(self.next_logits[token])
            logprob = top - self.next_lse
        self.seen.append(token)
        self.tokens.append(token)
        if self.guard is not None:
            self.guard.advance(token)
        self.n_new += 1
        if token in self.params.stop_ids:
            self.finish_reason = "stop"
        elif self.n_new >= self.params.max_new_tokens or len(self.seen) > max_len:
            self.finish_reason = "length"
        return StepOut(token, logprob, self.finished, self.finish_reason)


def check_prompt(prompt: Sequence[int], vocab_size: int, max_len: int) -> list[int]:
    """Validate a prompt of ids; raise ``ValueError`` with an actionable message."""
    ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("prompt is empty: at least one token id (e.g. BOS) is needed")
    if len(ids) > max_len:
        raise ValueError(f"prompt has {len(ids)} tokens but the model's context is {max_len} "
                         "(max_seq_len); truncate or shorten the prompt")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt contains ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids


class Engine:
    """Continuous batching: requests join at any time; ``step()`` decodes every running slot at once."""

    def __init__(self, model: Transformer, *, max_batch: int, max_len: int | None = None,
                 logprobs: bool = True, tool: Callable[[list[int]], list[int]] | None = None,
                 guard: Any = None):
        """``logprobs=False`` skips the per-step logsumexp (``StepOut.logprob`` is None): a caller
        that never reads them (the server scores prompts separately) saves ~10% of a batch-8 step.
        ``tool`` maps a request's generated ids to ids to feed next (``experts.calculator``);
        ``guard.open(prompt_ids)`` gives a request's guard of the ids it may take (``allows``,
        ``advance``, ``max_tries``), or None (``experts.syntax_guard``)."""
        self.model, self.cfg = model, model.cfg
        self.logprobs, self.tool, self.guard = logprobs, tool, guard
        if model.training:
            log.warning("Engine got a model in training mode; dropout will perturb generation")
        p = next(model.parameters())
        self.cache = KVCache(self.cfg, max_batch=max_batch, max_len=max_len, device=p.device, dtype=p.dtype)
        self.device = p.device
        self._requests: dict[int, _Request] = {}

    # ---- request lifecycle -------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.cache.max_batch - len(self._requests)

    @property
    def has_work(self) -> bool:
        """True while some non-external request still has tokens (or a result) to produce."""
        return any(not r.external and (not r.finished or not r.reported) for r in self._requests.values())

    def add(self, prompt_ids: Sequence[int], params: SamplingParams, *, external: bool = False) -> int:
        """Prefill a prompt into a free slot and return the slot.

        ``external=True`` puts the slot in external-choice mode: ``step()`` skips it and the
        caller drives it with ``logprobs_next(slot)`` and ``feed(slot, token)`` (ensembles).
        """
        return self.add_many([prompt_ids], [params], external=external)[0]

    def add_many(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *,
                 external: bool = False) -> list[int]:
        """Prefill several prompts with ONE forward (right-padded to the longest); return their slots.

        A batch of newcomers costs about one prefill instead of one each: on a CPU the small
        forwards of a decode-sized model are mostly fixed per-call overhead.
        """
        return self.add_checked([self.check(p) for p in prompts], params, external=external)

    def check(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ids, or ``ValueError`` saying what to change (``check_prompt``)."""
        return check_prompt(prompt_ids, self.cfg.vocab_size, self.cache.max_len)

    def add_checked(self, ids: list[list[int]], params: Sequence[SamplingParams], *,
                    external: bool = False) -> list[int]:
        """``add_many`` for prompts that already passed ``check`` (the serving worker checks each
        request alone, so that one bad prompt fails by itself, then prefills the good ones together)."""
        if len(params) != len(ids):
            raise ValueError(f"got {len(params)} SamplingParams for {len(ids)} prompts")
        free = [s for s in range(self.cache.max_batch) if s not in self._requests]
        if len(free) < len(ids):
            raise RuntimeError(f"{len(ids)} prompts but {self.cache.max_batch - len(free)} of the "
                               f"{self.cache.max_batch} slots are busy; release a finished slot first")
        slots = free[:len(ids)]
        try:  # all or nothing: a failure (a bad seed, a failed forward) leaves no slot taken
            self._prefill(slots, ids, params, external)
        except BaseException:
            for slot in slots:
                self.release(slot)
            raise
        return slots

    def _prefill(self, slots: list[int], ids: list[list[int]], params: Sequence[SamplingParams],
                 external: bool) -> None:
        run = []
        for slot, row, p in zip(slots, ids, params):
            req = _Request(p, make_generator(p.seed, self.device), list(row), external,
                           guard=self.guard.open(row) if self.guard is not None else None)
            self._requests[slot] = req
            self.cache.reset(slot)
            if p.max_new_tokens == 0:
                req.finish_reason = "length"
            else:
                run.append((slot, row))
        if run:
            T = max(len(row) for _, row in run)
            tokens = torch.tensor([row + [0] * (T - len(row)) for _, row in run], device=self.device)  # (B, T)
            valid = [len(row) for _, row in run] if any(len(row) != T for _, row in run) else None
            self._forward([s for s, _ in run], tokens, valid, self.model.known_openings([row for _, row in run]))

    def release(self, slot: int) -> None:
        """Free a slot (finished or not)."""
        self._requests.pop(slot, None)

    # ---- decoding -----------------------------------------------------------------------------
    def step(self) -> dict[int, StepOut]:
        """Sample one token for every running slot, then run ONE batched forward for those continuing."""
        outs: dict[int, StepOut] = {}
        cont: list[tuple[int, int]] = []
        for slot, r in self._requests.items():
            if r.external or r.reported:
                continue
            if r.finished:  # max_new_tokens == 0: report the empty result once
                outs[slot], r.reported = StepOut(None, None, True, r.finish_reason), True
                continue
            out = r.accept(r.choose(), self.cache.max_len)
            outs[slot], r.reported = out, out.finished
            if not out.finished:
                cont.append((slot, out.token))
                if self.tool is not None and not r.forced:
                    r.forced = [t for t in self.tool(r.tokens) if t not in r.params.stop_ids]
        if cont:
            slots = [s for s, _ in cont]
            self._forward(slots, torch.tensor([[t] for _, t in cont], device=self.device))
        return outs

    def logprobs_next(self, slot: int) -> torch.Tensor:
        """The model's full next-token log-distribution ``(V,)`` for ``slot`` (no sampling applied)."""
        r = self._req(slot)
        if r.finished:
            raise ValueError(f"slot {slot} is finished ({r.finish_reason}); nothing to predict")
        return torch.log_softmax(r.next_logits, dim=-1)

    def feed(self, slot: int, token: int) -> StepOut:
        """Append a token chosen outside (e.g. by an ensemble) and compute the next distribution."""
        r = self._req(slot)
        if r.finished:
            raise ValueError(f"slot {slot} is finished ({r.finish_reason}); release it")
        if not 0 <= int(token) < self.cfg.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.cfg.vocab_size})")
        out = r.accept(int(token), self.cache.max_len)
        r.reported = out.finished
        if not out.finished:
            self._forward([slot], torch.tensor([[int(token)]], device=self.device))
        return out

    @torch.inference_mode()
    def score(self, ids: Sequence[int]) -> list[float | None]:
        """Log-prob of each id given the ids before it; the first entry is None (nothing precedes it)."""
        ids = check_prompt(ids, self.cfg.vocab_size, self.cfg.max_seq_len)
        return [None, *token_logprobs(self.model, [ids])[0].logprobs.tolist()]

    # ---- internals ----------------------------------------------------------------------------
    def _req(self, slot: int) -> _Request:
        if slot not in self._requests:
            raise KeyError(f"slot {slot} has no request")
        return self._requests[slot]

    @torch.inference_mode()
    def _forward(self, slots: list[int], tokens: torch.Tensor, valid: list[int] | None = None,
                 opening: torch.Tensor | None = None) -> None:
        self.cache.bind(slots, valid)
        logits = self.model(tokens, cache=self.cache, last_only=True, opening=opening).logits[:, -1]  # (B, V)
        _set_next([self._requests[s] for s in slots], logits, logprobs=self.logprobs)


def _set_next(reqs: list[_Request], logits_BV: torch.Tensor, *, logprobs: bool = True) -> None:
    """Give each request its next-token logits row, plus argmax / max / logsumexp for the batch.

    Batched reductions and one ``tolist`` each replace per-row tensor ops in ``choose`` and
    ``accept``: at batch 8 this saves ~0.3 ms per decode step on a CPU. The logsumexp reuses the
    max: ``m + log(sum(exp(x - m)))``.
    """
    top_B, arg_B = logits_BV.max(dim=-1)
    lse: list[float | None] = [None] * len(reqs)
    if logprobs:
        lse = (top_B + (logits_BV - top_B[:, None]).exp_().sum(dim=-1).log_()).tolist()
    for r, row, a, m, z in zip(reqs, logits_BV, arg_B.tolist(), top_B.tolist(), lse):
        r.next_logits, r.next_argmax, r.next_max, r.next_lse = row, a, m, z


def _per_row(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt; a single one is shared, with seed ``seed + i`` for row i."""
    if isinstance(params, SamplingParams):
        if params.seed is None:
            return [params] * n
        return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)


def generate(model: Transformer, prompts: list[list[int]],
             params: SamplingParams | Sequence[SamplingParams], *,
             use_cache: bool = True, tool: Callable[[list[int]], list[int]] | None = None,
             guard: Any = None) -> Iterator[list[int | None]]:
    """Yield, per decode step, the new token of every prompt (None once a row has finished).

    ``use_cache=False`` re-runs the full forward each step (reference path for parity / benchmarks;
    it takes no ``tool`` or ``guard``).
    """
    cfg = model.cfg
    rows = _per_row(params, len(prompts))
    prompts = [check_prompt(p, cfg.vocab_size, cfg.max_seq_len) for p in prompts]
    if not use_cache:
        if tool is not None or guard is not None:
            raise ValueError("generate(use_cache=False) is the reference path and takes no tool or guard")
        yield from _generate_no_cache(model, prompts, rows)
        return
    max_len = min(cfg.max_seq_len, max(len(p) for p in prompts) + max(r.max_new_tokens for r in rows))
    engine = Engine(model, max_batch=len(prompts), max_len=max_len, tool=tool, guard=guard)
    slots = engine.add_many(prompts, rows)
    while engine.has_work:
        outs = engine.step()
        tokens = [outs[s].token if s in outs else None for s in slots]
        if any(t is not None for t in tokens):
            yield tokens


@torch.inference_mode()
def _generate_no_cache(model: Transformer, prompts: list[list[int]],
                       rows: list[SamplingParams]) -> Iterator[list[int | None]]:
    """Each step: one right-padded batched forward over the full sequences (causal, so padding is inert)."""
    device = next(model.parameters()).device
    reqs = [_Request(r, make_generator(r.seed, device), list(p)) for p, r in zip(prompts, rows)]
    for r in reqs:
        if r.params.max_new_tokens == 0:
            r.finish_reason = "length"
    while any(not r.finished for r in reqs):
        live = [i for i, r in enumerate(reqs) if not r.finished]
        T = max(len(reqs[i].seen) for i in live)
        x = torch.zeros(len(live), T, dtype=torch.long, device=device)  # (B, T) right-padded
        for b, i in enumerate(live):
            x[b, :len(reqs[i].seen)] = torch.tensor(reqs[i].seen)
        logits = model(x, opening=model.known_openings([prompts[i] for i in live])).logits  # (B, T, V)
        last = torch.tensor([len(reqs[i].seen) - 1 for i in live], device=device)
        _set_next([reqs[i] for i in live], logits[torch.arange(len(live), device=device), last])
        step: list[int | None] = [None] * len(reqs)
        for i in live:
            step[i] = reqs[i].accept(reqs[i].choose(), model.cfg.max_seq_len).token
        yield step
