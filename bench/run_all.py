"""Run every ``bench/bench_*.py`` module's ``main()`` and write ``bench/results/<name>.json``."""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
from pathlib import Path

from experts.atomic import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks named on the command line (default: all) and write their JSON."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wanted = set(argv if argv is not None else sys.argv[1:])
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_") and (not wanted or m.name in wanted))
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        result = importlib.import_module(f"bench.{name}").main()
        path = RESULTS / f"{name}.json"
        atomic_write_json(path, result)
        print(f"{name}: wrote {path}")
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
