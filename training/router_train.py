"""Training the router with the shared loop (``training.loop``), then temperature calibration.

It lives in ``training/`` (not ``router/``): the router package holds the model and the policy
and never imports ``training``; this module plugs the router into the one training loop.

Loss: the NLL of the hierarchical expert probability, -log P(g(y)) - log P(y | g(y)), which is
exactly CE(group) + CE(expert within the true group). Single-expert groups (``code``) contribute
only the group term.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experts.atomic import atomic_write_json
from experts.checkpoint import save_checkpoint
from router.calibration import expert_nll, fit_temperature
from router.domains import DOMAINS, check_domain
from router.model import EXPERT_GROUP, RouterConfig, RouterModel, collate, encode_prompt, hierarchical_log_probs
from router.prefix import prefix_text
from training.data import load_corpora, router_examples
from training.data.router_data import with_labels
from training.loop import LoopConfig, train

log = logging.getLogger(__name__)

Example = tuple[list[int], int]  # (token ids, index into DOMAINS)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tokens (B, T), mask (B, T), labels (B,)


@dataclass(frozen=True, kw_only=True)
class RouterTrainConfig:
    """Router data and optimisation settings (the loop's own knobs are in ``LoopConfig``)."""

    batch_size: int = 64
    max_steps: int = 1200
    lr: float = 3e-3
    eval_every: int = 200
    per_domain: int | None = 3000  # router examples per domain and training split (None: all)
    val_per_domain: int | None = 500
    crop_prob: float = 0.3  # train on a random prefix of the prompt this often (short prompts)
    min_share: float = 0.5  # repeat a rare domain's examples until it has this share of the largest one
    min_crop: int = 4
    opening_share: float = 0.5  # document openings per domain, as a share of per_domain (0: prompts only)
    view_share: float = 0.5  # user-style rephrasings per domain (training.data.prompt_views), share of per_domain
    # examples led by a generic label ("Problem:", "Q:", ...: training.data.router_data); 0 by
    # measurement: at 0.1 the standard router got third-party math prompts right 85% (93% at 0)
    label_share: float = 0.0
    router_only: bool = True  # add the router-only prompts of training.data.router_prompts
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "min_crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterTrainConfig.{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"RouterTrainConfig.min_share={self.min_share!r} is invalid: must be in [0, 1]")
        if not self.opening_share >= 0.0:
            raise ValueError(f"RouterTrainConfig.opening_share={self.opening_share!r} is invalid: must be >= 0")
        if not 0.0 <= self.label_share <= 1.0:
            raise ValueError(f"RouterTrainConfig.label_share={self.label_share!r} is invalid: must be in [0, 1]")
        if not 0.0 <= self.crop_prob <= 1.0:
            raise ValueError(f"RouterTrainConfig.crop_prob={self.crop_prob!r} is invalid: must be in [0, 1]")
        if not self.lr > 0:
            raise ValueError(f"RouterTrainConfig.lr={self.lr!r} is invalid: must be > 0")


def balance(examples: list[Example], min_share: float) -> list[Example]:
    """Repeat each domain's examples (whole copies) until it has >= ``min_share`` x the largest count."""
    by_label: dict[int, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    target = min_share * max((len(v) for v in by_label.values()), default=0)
    out = list(examples)
    for items in by_label.values():
        out += items * max(0, math.ceil(target / len(items)) - 1)
    return out


def encode_examples(examples: Sequence[tuple[str, str]], tokenizer: Any, cfg: RouterConfig) -> list[Example]:
    """(prompt, domain) pairs -> (ids the router reads, label), encoded as routing encodes them
    (``router.model.encode_prompt``); empty prompts are dropped."""
    out = []
    for prompt, domain in examples:
        ids = encode_prompt(tokenizer, prompt, cfg)
        if ids and prompt.strip():
            out.append((ids, DOMAINS.index(check_domain(domain))))
    return out


class ShuffledBatches:
    """Endless shuffled epochs of router batches, resumable exactly from ``state_dict()``."""

    def __init__(self, examples: list[Example], *, batch_size: int, max_len: int, seed: int,
                 crop_prob: float = 0.0, min_crop: int = 4, pad_id: int = 0) -> None:
        if not examples:
            raise ValueError("no router training examples: check the corpus and router_examples()")
        self.examples, self.batch_size, self.max_len = examples, batch_size, max_len
        self.seed, self.crop_prob, self.min_crop, self.pad_id = seed, crop_prob, min_crop, pad_id
        self.epoch, self.pos = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def __next__(self) -> Batch:
        if self.pos >= len(self.examples):
            self.epoch, self.pos = self.epoch + 1, 0
        order = torch.randperm(len(self.examples), generator=self._generator(self.epoch)).tolist()
        idx = order[self.pos: self.pos + self.batch_size]
        g = self._generator(10_000_019 + self.epoch * 100_003 + self.pos)  # crops depend on position only
        seqs = [self._crop(self.examples[i][0], g) for i in idx]
        self.pos += self.batch_size
        tokens, mask = collate(seqs, self.max_len, self.pad_id)
        return tokens, mask, torch.tensor([self.examples[i][1] for i in idx])

    def _crop(self, ids: list[int], g: torch.Generator) -> list[int]:
        if float(torch.rand((), generator=g)) >= self.crop_prob or len(ids) <= self.min_crop:
            return ids
        return ids[: int(torch.randint(self.min_crop, len(ids) + 1, (), generator=g))]


def fixed_batches(examples: list[Example], batch_size: int, max_len: int, pad_id: int = 0) -> list[Batch]:
    """Validation / test batches in a fixed order."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        tokens, mask = collate([ids for ids, _ in chunk], max_len, pad_id)
        out.append((tokens, mask, torch.tensor([y for _, y in chunk])))
    return out


def router_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Hierarchical NLL = CE(group) + CE(expert | true group), plus accuracies."""
    tokens, mask, labels = (t.to(next(model.parameters()).device) for t in batch)
    out = model(tokens, mask)
    g_logp, e_logp = hierarchical_log_probs(out.group_logits, out.expert_logits)  # (B, G), (B, E)
    group_labels = torch.tensor(EXPERT_GROUP, device=labels.device)[labels]  # (B,)
    loss = -e_logp.gather(1, labels[:, None]).mean()
    group_ce = -g_logp.gather(1, group_labels[:, None]).mean()
    with torch.no_grad():
        metrics = {"group_ce": float(group_ce), "expert_ce": float(loss - group_ce),
                   "group_acc": float((g_logp.argmax(-1) == group_labels).float().mean()),
                   "expert_acc": float((e_logp.argmax(-1) == labels).float().mean())}
    return loss, metrics


@torch.no_grad()
def collect_logits(model: RouterModel, batches: Sequence[Batch]) -> tuple[torch.Tensor, ...]:
    """(group_logits (N, G), expert_logits (N, E), labels (N,)) over ``batches``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g, e, y = [], [], []
    for tokens, mask, labels in batches:
        out = model(tokens.to(device), mask.to(device))
        g.append(out.group_logits.float().cpu())
        e.append(out.expert_logits.float().cpu())
        y.append(labels)
    model.train(was_training)
    if not y:
        return torch.zeros(0, 3), torch.zeros(0, len(DOMAINS)), torch.zeros(0, dtype=torch.long)
    return torch.cat(g), torch.cat(e), torch.cat(y)


class RouterTask:
    """The router as a ``training.loop.Task``; ``save_model`` also fits the temperature."""

    def __init__(self, cfg: RouterConfig, train: list[Example], val: list[Example], *,
                 tokenizer_file: str | Path | None, train_cfg: RouterTrainConfig = RouterTrainConfig(),
                 pad_id: int = 0, name: str = "router", out_dir: str = "router") -> None:
        self.cfg, self.train_cfg, self.name, self.out_dir = cfg, train_cfg, name, out_dir
        self.train, self.val, self.pad_id, self.tokenizer_file = train, val, pad_id, tokenizer_file
        self.temperature: float | None = None
        self._val = fixed_batches(val, train_cfg.batch_size, cfg.max_len, pad_id)

    def build_model(self) -> nn.Module:
        return RouterModel(self.cfg)

    def train_batches(self) -> ShuffledBatches:
        tc = self.train_cfg
        return ShuffledBatches(self.train, batch_size=tc.batch_size, max_len=self.cfg.max_len, seed=tc.seed,
                               crop_prob=tc.crop_prob, min_crop=tc.min_crop, pad_id=self.pad_id)

    def val_batches(self) -> list[Batch]:
        return self._val

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return router_loss(model, batch)

    def batch_tokens(self, batch: Batch) -> int:
        return int(batch[1].sum())

    def model_config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def flops_per_token(self) -> float:
        """6 x (embedding rows touched per token + the MLP amortised over a typical 64-token prompt)."""
        mlp = self.cfg.n_features * self.cfg.hidden + self.cfg.hidden * (3 + len(DOMAINS))
        return 6.0 * (2 * self.cfg.d_embed + mlp / 64)

    def save_model(self, model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
        """Fit T on the validation split, then write the router checkpoint."""
        g, e, y = collect_logits(model, self._val)
        self.temperature = fit_temperature(g, e, y)
        calib = {"temperature": self.temperature, "val_examples": int(y.numel()),
                 "val_nll_t1": float(expert_nll(g, e, y, 1.0)) if y.numel() else None,
                 "val_nll": float(expert_nll(g, e, y, self.temperature)) if y.numel() else None}
        save_checkpoint(path, model.state_dict(), config=self.cfg.to_dict(), kind="router",
                        tokenizer_file=self.tokenizer_file, extra_json={"calibration": calib}, meta=meta)
        log.info("router checkpoint written to %s (T=%.3f)", path, self.temperature)


def document_openings(corpus: Any, tokenizer: Any, split: str, per_domain: int | None, *,
                      seed: int = 0) -> list[tuple[str, str]]:
    """(routing prefix of a document, domain): a seeded sample of ``per_domain`` per domain.

    Documents are a prompt type of their own (a pasted file starts with a license header or imports,
    a factbook entry with its title). The report routes every test document from the same prefix
    (``router.prefix``), so the router is trained on exactly what it is evaluated on.
    """
    import random

    out = []
    for domain in corpus.domains:
        texts = [r["text"] for r in corpus.docs(domain, split) if r["text"].strip()]
        random.Random(f"openings:{seed}:{domain}").shuffle(texts)
        openings: dict[str, None] = {}  # insertion-ordered set
        for text in texts:
            if per_domain is not None and len(openings) >= per_domain:
                break
            opening = prefix_text(tokenizer, text)
            if opening.strip():
                openings.setdefault(opening, None)
        out += [(o, domain) for o in openings]
    random.Random(seed).shuffle(out)
    return out


def _examples(corpus: Any, tokenizer: Any, split: str, per_domain: int | None, seed: int,
              tc: RouterTrainConfig | None = None) -> list[tuple[str, str]]:
    """Prompts (``training.data.router_examples``) plus document openings (``tc.opening_share``)."""

    views = tc.view_share if tc is not None else 0.0
    out = list(router_examples(corpus, split, per_domain=per_domain, seed=seed, view_share=views,
                               router_only=tc is not None and tc.router_only))
    if tc is not None and tc.opening_share > 0:
        n = None if per_domain is None else max(1, math.ceil(tc.opening_share * per_domain))
        out += document_openings(corpus, tokenizer, split, n, seed=seed)
    if tc is not None and tc.label_share > 0:
        out = with_labels(out, tc.label_share, seed)
    return out


def train_router(corpus: Any, tokenizer: Any, run_dir: str | Path, cfg: RouterConfig | None = None, *,
                 train_cfg: RouterTrainConfig | None = None, examples: dict[str, Sequence] | None = None,
                 tokenizer_file: str | Path | None = None, out_dir: str = "router",
                 **loop_overrides: Any):
    """Train, calibrate and save the router under ``run_dir/out_dir``; returns the loop's ``TrainResult``.

    Examples come from ``training.data.router_examples(corpus, split, ...)`` plus document openings
    (:func:`document_openings`, ``train_cfg.opening_share``) unless ``examples``
    (``{"train": [(prompt, domain)], "val": [...]}``) is given. ``loop_overrides`` go to
    ``training.loop.LoopConfig`` (e.g. ``num_threads``, ``device``, ``progress``).
    ``result.extra["temperature"]`` holds the fitted temperature.
    """

    tc = train_cfg or RouterTrainConfig()
    cfg = (cfg or RouterConfig()).replace(vocab_size=tokenizer.vocab_size)
    if examples is None:
        examples = {"train": _examples(corpus, tokenizer, "train", tc.per_domain, tc.seed, tc),
                    "val": _examples(corpus, tokenizer, "val", tc.val_per_domain, tc.seed, tc)}
    train_ex = balance(encode_examples(examples["train"], tokenizer, cfg), tc.min_share)
    val_ex = encode_examples(examples.get("val", []), tokenizer, cfg)
    log.info("router: %d train / %d val examples", len(train_ex), len(val_ex))
    loop_cfg = LoopConfig(**{"max_steps": tc.max_steps, "lr": tc.lr, "min_lr": tc.lr / 10,
                             "warmup_steps": min(50, tc.max_steps // 10), "eval_every": tc.eval_every,
                             "eval_batches": 0, "ckpt_every": 0, "seed": tc.seed, "weight_decay": 0.01,
                             "optimizer": "adamw", "schedule": "cosine", "log_every": 10,
                             **loop_overrides})
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_file is None and hasattr(tokenizer, "save"):
            tokenizer_file = Path(tmp) / "tokenizer.json"
            tokenizer.save(tokenizer_file)
        task = RouterTask(cfg, train_ex, val_ex, tokenizer_file=tokenizer_file, train_cfg=tc,
                          pad_id=getattr(tokenizer, "pad_id", 0), out_dir=out_dir)
        result = train(task, loop_cfg, run_dir)
    result.extra["temperature"] = task.temperature
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.router_train --size quick --run-dir DIR``: train on built corpora, evaluate on test."""
    import argparse
    import json

    from experts.device import set_threads
    from router.evaluate import evaluate_router, plot_confusion
    from router.router import load_router

    ap = argparse.ArgumentParser(prog="python -m training.router_train", description=main.__doc__)
    ap.add_argument("--size", default="quick")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=RouterTrainConfig.max_steps)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--view-share", type=float, default=RouterTrainConfig.view_share,
                    help="user-style rephrasings per domain, as a share of the prompts (0: none)")
    ap.add_argument("--label-share", type=float, default=RouterTrainConfig.label_share,
                    help="examples led by a generic label such as 'Problem:' (0: none)")
    ap.add_argument("--no-router-only", dest="router_only", action="store_false",
                    help="leave out the router-only prompts of training.data.router_prompts")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(args.threads)
    corpus = load_corpora(args.cache_dir, args.size)
    result = train_router(corpus, corpus.tokenizer(), args.run_dir,
                          train_cfg=RouterTrainConfig(max_steps=args.steps, view_share=args.view_share,
                                                      label_share=args.label_share, router_only=args.router_only),
                          tokenizer_file=corpus.tokenizer_path,
                          num_threads=args.threads, device="cpu", progress=False)
    metrics = evaluate_router(load_router(Path(args.run_dir) / "router"),
                              router_examples(corpus, "test", per_domain=100_000, seed=0))
    plot_confusion(metrics["confusion"], Path(args.run_dir) / "router_confusion.png")
    atomic_write_json(Path(args.run_dir) / "router_eval.json", metrics)
    print(json.dumps({"train_s": result.elapsed_s, **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
