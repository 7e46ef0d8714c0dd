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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.save_report", description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    atomic_write_json(args.out, summary(args.run_dir))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
