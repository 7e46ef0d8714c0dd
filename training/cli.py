"""The training layer's subcommands of ``hmoe`` (the command itself is ``serving.command``).

``hmoe data build|show`` (corpora), ``hmoe train`` (the whole run through Ray; also the
entrypoint of ``ray job submit ... -- hmoe train``), ``hmoe report RUN_DIR``, ``hmoe merge``, and
``hmoe export``, which writes a run's model as a Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.data.cli import add_data_subparser


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained expert, or the merged model, for transformers "
                                      "(Llama/Qwen3; the merged model as Mixtral/Qwen3-MoE)")
    p.add_argument("run_dir", help="run directory (runs/<name>)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--expert", required=True,
                   help="the model to export: a domain expert (e.g. math), merged, baseline-dense or seed")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from experts.checkpoint import CheckpointError
    from experts.export import ExportError, export_hf
    from training.scoring import model_dir

    try:
        ckpt = model_dir(args.run_dir, args.expert)
        out = export_hf(ckpt, args.out)
    except (ExportError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {out}\nload it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from training.run_config import preset_names

    p = sub.add_parser("train", help="train the experts (and baselines, router) through Ray")
    p.add_argument("--preset", default="tiny", help=f"one of {preset_names()} or a YAML file")
    p.add_argument("--run-dir", help="where checkpoints, metrics and the report go (default runs/<name>)")
    p.add_argument("--steps", type=int, help="optimizer steps per expert (the budget is experts x steps)")
    p.add_argument("--seed-fraction", type=float,
                   help="share of the budget that trains a seed LM on the mixed corpus before the experts "
                        "branch from it (0: independent experts)")
    p.add_argument("--experts", help="comma-separated subset of the five domains, e.g. math,code")
    p.add_argument("--baselines", action="store_true", default=None,
                   help="also train dense and token-MoE generalists at equal compute")
    p.add_argument("--merge", action="store_true", default=None,
                   help="also merge the experts into one token-level MoE and fine-tune it (Branch-Train-MiX); "
                        "the generalists then get the merged system's compute")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--num-cpus", type=float, help="CPUs per training task (torch threads)")
    p.add_argument("--num-gpus", type=float, help="GPUs per training task")
    p.add_argument("--cache-dir", help="corpus cache (default $HMOE_DATA_DIR or .hmoe/data)")
    p.add_argument("--spec", help="a corpus spec YAML (local files, hub data sets) instead of the preset's "
                                  "built-in corpus; experts default to its domains")
    p.add_argument("--no-router", action="store_true", help="do not train the router")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--ray-address", help="Ray cluster to join ('auto': the latest `ray start` on this "
                                         "machine); default $RAY_ADDRESS, else a private local instance")
    p.set_defaults(func=run_train)


def _overrides(args: argparse.Namespace) -> dict:
    ov = {"run_dir": args.run_dir, "train.steps": args.steps, "train.seed_fraction": args.seed_fraction,
          "experts": args.experts,
          "baselines.enabled": args.baselines, "merge.enabled": args.merge, "seed": args.seed, "device": args.device,
          "resources.num_cpus": args.num_cpus, "resources.num_gpus": args.num_gpus,
          "data.cache_dir": args.cache_dir,
          "data.spec": str(Path(args.spec).resolve()) if args.spec else None}
    if args.no_router:
        ov["router.enabled"] = False
    return ov


def run_train(args: argparse.Namespace) -> int:
    from training.pipeline import run_pipeline
    from training.run_config import RunConfigError, load_run_config

    try:
        cfg = load_run_config(args.preset, _overrides(args))
    except RunConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    summary = run_pipeline(cfg, ray_address=args.ray_address, report=not args.no_report)
    print(f"trained {len(summary['models'])} models in {time.perf_counter() - t0:.1f}s -> {summary['run_dir']}")
    if not args.no_report:
        print((Path(summary["run_dir"]) / "report" / "report.md").read_text())
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a run's experts into one MoE and fine-tune it (Branch-Train-MiX)")
    p.add_argument("run_dir", help="a finished run (runs/<name>)")
    p.add_argument("--top-k", type=int, help="routed experts per token (default: the run's merge.top_k)")
    p.add_argument("--steps", type=int, help="fine-tuning steps on the mixed corpus (default: merge.steps)")
    p.add_argument("--train", choices=["all", "routers"], help="what the fine-tune updates (default: merge.train)")
    p.add_argument("--gate-init", choices=["zero", "centroids", "fitted"],
                   help="how the routers start (default: merge.gate_init)")
    p.add_argument("--route", choices=["ffn", "all", "full"],
                   help="what becomes routed experts: the FFNs, also attention and head, or also the input "
                        "embeddings (default: merge.route)")
    p.add_argument("--gate-context", choices=["token", "mean", "doc"],
                   help="what the routers read: each token's input, the running mean of its sequence's, or "
                        "of its document's (default: merge.gate_context)")
    p.add_argument("--gate-scope", choices=["layer", "model"],
                   help="a router in every routed module, or one router choosing each token's experts for "
                        "every layer (default: merge.gate_scope)")
    p.add_argument("--lr-scale", type=float,
                   help="the fine-tune's learning rates as a multiple of the experts' (default: merge.lr_scale)")
    p.add_argument("--router-lr", type=float,
                   help="the routers' learning rate as a multiple of the experts' (default: merge.router_lr, "
                        "else --lr-scale)")
    p.add_argument("--ray-address", help="Ray cluster to join; default a private local instance")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from experts.checkpoint import CheckpointError
    from training.pipeline import merge_run
    from training.run_config import RunConfigError, load_run_config

    ov = {"merge.enabled": True, "merge.top_k": args.top_k, "merge.steps": args.steps, "merge.train": args.train,
          "merge.gate_init": args.gate_init, "merge.route": args.route, "merge.gate_context": args.gate_context,
          "merge.lr_scale": args.lr_scale, "merge.router_lr": args.router_lr, "merge.gate_scope": args.gate_scope,
          "run_dir": str(Path(args.run_dir).resolve())}  # a copied run merges into the copy, not where it came from
    try:
        cfg = load_run_config(str(Path(args.run_dir) / "run.yaml"), ov)
        out = merge_run(cfg, ray_address=args.ray_address)
    except (RunConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model -> {out}\n" + (out.parent / "report" / "report.md").read_text())
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="(re)write the per-expert perplexity report of a run")
    p.add_argument("run_dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the Markdown")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from experts.checkpoint import CheckpointError
    from training.report import write_report
    from training.run_config import RunConfigError

    try:
        rep = write_report(args.run_dir, device=args.device)
    except (CheckpointError, RunConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.run_dir) / "report"
    print(json.dumps(rep, indent=2) if args.json else (out / "report.md").read_text())
    return 0


def add_training_subparsers(sub: argparse._SubParsersAction) -> None:
    """Add ``data``, ``train``, ``report``, ``merge`` and ``export`` to the ``hmoe`` command."""
    add_data_subparser(sub)
    _add_train(sub)
    _add_report(sub)
    _add_merge(sub)
    _add_export(sub)
