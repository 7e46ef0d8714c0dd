"""Where a Branch-Train-MiX merge loses quality: which averaged weights cost each expert most.

For every domain of a run with a seed and branched experts, the loss (nats per token) on seeded
windows of its test tokens of:

- the expert itself, the seed, and every finished LM of the run (generalists, the merged model);
- the expert with only its embeddings (and tied head) replaced by the experts' plain mean, with
  them replaced by the per-token weighted mean (``training.merge.token_weights``), with only its
  input embeddings or only its output head so replaced, and with only its attention replaced by
  the mean: what each part of the merge costs that expert;
- the merged model before any fine-tune, with every token sent to its own domain's expert
  (oracle routing), with plain and with per-token weighted embeddings, and a merge that routes
  attention and head too (``route="all"``, weighted input embeddings), so routed; and that merge
  routed by its own top-2 routers, not fine-tuned, started at the domain centroids
  (``centroid_gates``) reading each token's input or the running mean of the sequence's
  (``moe.gate_context``), or fitted as classifiers of the domain on the running mean (``fitted_gates``;
  with top-2 and with top-1 routing);

and how far each expert's weights moved from the seed (``|expert - seed| / |seed|``).

    python -m bench.merge_diagnosis runs/standard --out docs/results/merge_diagnosis.json \\
        [--extra name=CKPT_DIR ...]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch

from experts.checkpoint import load_lm
from experts.model import Transformer
from training.data import load_corpora
from training.merge import forced_route, merge_models, sample_windows, start_gates, token_weights, weighted_mean
from training.run_config import load_run_config
from training.scoring import model_dirs

WINDOWS, LENGTH = 16, 256


@torch.no_grad()
def nats(model: torch.nn.Module, x: torch.Tensor) -> float:
    logits = model(x[:, :-1]).logits
    return round(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item(), 4)


def with_mean(model: torch.nn.Module, experts: list, pick: Callable[[str], bool],
              weights: torch.Tensor | None = None) -> torch.nn.Module:
    """``model`` with the parameters ``pick`` selects replaced by the experts' (weighted) mean."""
    out, states = copy.deepcopy(model), [e.state_dict() for e in experts]
    sd = out.state_dict()
    for k in sd:
        if pick(k):
            sd[k] = weighted_mean([s[k] for s in states], weights)
    out.load_state_dict(sd)
    return out


def untied(model: Transformer) -> Transformer:
    """The same function with its output head a separate copy of the tied embedding matrix."""
    if not model.cfg.tie_embeddings:
        return model
    out = Transformer(model.cfg.replace(tie_embeddings=False))
    sd = model.state_dict()
    out.load_state_dict({**sd, "output.weight": sd["tok_embeddings.weight"].clone()})
    return out.eval()


def oracle(merged: torch.nn.Module, expert: int, x: torch.Tensor) -> float:
    """``nats`` with every token of every layer sent to ``expert`` with weight 1."""
    with forced_route(merged, expert):
        return nats(merged, x)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--extra", action="append", default=[], help="name=CKPT_DIR: another model to score")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    cfg = load_run_config(str(run / "run.yaml"))
    corpus = load_corpora(cfg.data.cache_dir, cfg.data.corpus_name())
    domains = list(cfg.experts)
    experts = [load_lm(run / "experts" / d)[0].eval() for d in domains]
    others = {n: p for n, p in model_dirs(run).items() if n not in domains}
    others.update(dict(e.split("=", 1) for e in args.extra))
    loaded = {n: load_lm(p)[0].eval() for n, p in others.items()}
    vocab = experts[0].cfg.vocab_size
    w = token_weights([str(corpus.tokens_path(d, "train")) for d in domains], vocab)
    emb = lambda k: k in ("tok_embeddings.weight", "output.weight")  # noqa: E731
    attn = lambda k: ".attention." in k  # noqa: E731
    seed_sd = loaded["seed"].state_dict() if "seed" in loaded else None
    separate = [untied(e) for e in experts]
    out: dict = {"run": str(run), "windows": WINDOWS, "length": LENGTH, "by_domain": {}}
    centroid = {}
    for init, context, k in (("centroids", "token", 2), ("centroids", "mean", 2), ("fitted", "mean", 2),
                             ("fitted", "mean", 1)):
        m = merge_models(experts, k, w, route="all", gate_context=context).eval()  # merged_job's gate start
        start_gates(m, init, [corpus.tokens_path(d, "train") for d in domains], cfg.train.seq_len, cfg.seed + 300)
        centroid[f"merge route=all, top-{k} {init} gates, gate_context {context}"] = m
    for i, d in enumerate(domains):
        x = sample_windows(str(corpus.tokens_path(d, "test")), WINDOWS, LENGTH + 1)
        row = {"expert": nats(experts[i], x), **{n: nats(m, x) for n, m in loaded.items()},
               "expert, embeddings plain mean": nats(with_mean(experts[i], experts, emb), x),
               "expert, embeddings weighted per token": nats(with_mean(experts[i], experts, emb, w), x),
               "expert, input embeddings weighted per token": nats(with_mean(
                   separate[i], separate, lambda k: k == "tok_embeddings.weight", w), x),
               "expert, output head weighted per token": nats(with_mean(
                   separate[i], separate, lambda k: k == "output.weight", w), x),
               "expert, attention mean": nats(with_mean(experts[i], experts, attn), x),
               "merge, oracle routing, plain means": oracle(merge_models(experts, 1).eval(), i, x),
               "merge, oracle routing, weighted embeddings": oracle(merge_models(experts, 1, w).eval(), i, x),
               "merge route=all, oracle routing": oracle(merge_models(experts, 1, w, route="all").eval(), i, x),
               **{n: nats(m, x) for n, m in centroid.items()}}
        if seed_sd is not None:
            sd = experts[i].state_dict()
            row["drift from seed"] = {k: round(((sd[k] - seed_sd[k]).norm() / seed_sd[k].norm()).item(), 3)
                                      for k in ("tok_embeddings.weight", "layers.0.attention.wqkv.weight",
                                                "layers.0.feed_forward.w1.weight")}
        out["by_domain"][d] = row
        print(d, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
