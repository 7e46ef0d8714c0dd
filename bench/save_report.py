"""Keep a run's report as a small result file: ``python -m bench.save_report RUN_DIR OUT.json``.

The report's JSON without its loss curves (which are most of its bytes), plus the run
configuration and the machine it ran on, so a figure quoted in ``docs/benchmarks.md`` can point
at a committed file.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import yaml

from experts.atomic import atomic_write_json


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary(run_dir: Path) -> dict:
    import os

    rep = json.loads((run_dir / "report" / "report.json").read_text())
    rep.pop("curves", None)
    rep["run_config"] = yaml.safe_load((run_dir / "run.yaml").read_text())
    rep["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    return rep


ROWS = (("own expert", None), ("seed", "seed"), ("dense generalist", "baseline-dense"),
        ("token-MoE generalist", "baseline-moe"), ("router-top1", "router-top1"),
        ("router-mixture", "router-mixture"))


def tables(rep: dict) -> str:
    """The summary tables of docs/benchmarks.md and the README: perplexity per domain and mixed
    (with the ratio to the dense generalist), then bits per byte on the natural-text sets."""
    doms, mat, mixed = rep["domains"], rep["matrix"], rep.get("mixed_test", {})
    dense = mixed.get("baseline-dense", {}).get("ppl")
    out = ["| model | " + " | ".join(doms) + " | mixed |", "| --- |" + " ---: |" * (len(doms) + 1)]
    for label, name in ROWS:
        if name is not None and name not in mat:
            continue
        cells = [mat[d if name is None else name].get(d, {}).get("ppl") for d in doms]
        mix = mixed.get(name, {}).get("ppl") if name else None
        ratio = f" ({mix / dense:.3f}x dense)" if mix and dense and name != "baseline-dense" else ""
        out.append(f"| {label} | " + " | ".join(f"{c:.2f}" if c else "" for c in cells)
                   + f" | {f'{mix:.2f}' if mix else ''}{ratio} |")
    nat = rep.get("natural")
    if nat:
        nm = nat["matrix"]
        out += ["", "| bits per byte, natural text | " + " | ".join(nat["domains"]) + " |",
                "| --- |" + " ---: |" * len(nat["domains"])]
        for label, name in ROWS:
            if name is not None and name not in nm:
                continue
            cells = [nm[d if name is None else name].get(d, {}).get("bpb") for d in nat["domains"]]
            out.append(f"| {label} | " + " | ".join(f"{c:.3f}" if c else "" for c in cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.save_report", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--markdown", action="store_true", help="also print the summary tables")
    args = ap.parse_args(argv)
    rep = summary(args.run_dir)
    atomic_write_json(args.out, rep)
    print(f"wrote {args.out}")
    if args.markdown:
        print(tables(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
