"""The ``hmoe`` console script (minimal: only ``hmoe data``; other commands are added by their owners)."""

from __future__ import annotations

import argparse
import sys

from training.data.cli import add_data_subparser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmoe", description="hierarchical mixture of small experts")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_subparser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
