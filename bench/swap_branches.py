"""A copy of a finished run with some experts replaced by other runs' branches, to be reported anew.

    python -m bench.swap_branches runs/std runs/c4 reasoning=runs/rr02nf conversation=runs/cg03 \\
        --set '{"train.branch_replay": {"reasoning": 0.2, "conversation": 0.3}}'
    hmoe report runs/c4

``bench.branch_probe`` retrains one branch from a run's seed exactly as the pipeline would, so the
copy is the run that the pipeline would have trained with those branches' settings, except for the
merged model, which is left out (it was built from the old experts). Weights are hard-linked, not
copied; everything else (router, instruction items, metrics) is copied, so a report written into the
copy never touches the source run. ``--set`` writes the swapped branches' settings into the copy's
``run.yaml`` (dotted keys, validated as ``hmoe train`` validates its overrides), so its report shows the configuration it was trained with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from router.domains import check_domain
from training.run_config import load_run_config

LINKED = ("experts", "seed", "baselines")  # model directories: hard-linked
LEFT_OUT = ("merged", "report")  # built from the old experts


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: copy
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=_link)


def swap(src: Path, dst: Path, branches: dict[str, Path], settings: dict | None = None) -> Path:
    """Write ``dst``: ``src`` without its merged model and report, with ``branches[d]``'s expert ``d``."""
    load_run_config(str(src / "run.yaml"), settings)  # before anything is written
    for d, run in branches.items():
        check_domain(d)
        if not (run / "experts" / d / "meta.json").is_file():
            raise SystemExit(f"{run}/experts/{d} is not a finished expert: train it with bench.branch_probe first")
    if dst.exists():
        raise SystemExit(f"{dst} exists: remove it or choose another name")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in sorted(src.iterdir()):
        if item.name in LEFT_OUT:
            continue
        target = tmp / item.name
        if item.name in LINKED:
            _link_tree(item, target)
        elif item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    for d, run in branches.items():
        shutil.rmtree(tmp / "experts" / d)
        _link_tree(run / "experts" / d, tmp / "experts" / d)
    cfg = load_run_config(str(src / "run.yaml"), settings)  # validated: a misspelt setting is an error
    (tmp / "run.yaml").write_text(cfg.model_copy(update={"run_dir": str(dst)}).to_yaml())
    tmp.rename(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="the finished run to copy")
    ap.add_argument("dst", type=Path, help="the new run directory")
    ap.add_argument("branches", nargs="+", help="DOMAIN=RUN_DIR: take experts/DOMAIN from RUN_DIR")
    ap.add_argument("--set", default="{}", help="JSON of dotted run.yaml keys to write into the copy")
    args = ap.parse_args()
    branches = {}
    for b in args.branches:
        d, sep, run = b.partition("=")
        if not sep:
            raise SystemExit(f"{b!r}: write DOMAIN=RUN_DIR, e.g. reasoning=runs/rr02nf")
        branches[d] = Path(run)
    print(swap(args.src, args.dst, branches, json.loads(args.set)))


if __name__ == "__main__":
    main()
