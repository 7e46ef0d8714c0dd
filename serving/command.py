"""``hmoe``: the command-line entry point, at the top of the layering.

It assembles each layer's subcommands: ``data``, ``train``, ``report`` and ``export`` from
``training.cli``; ``serve``, ``up`` and ``chat`` from ``serving.cli``. ``python -m serving.command``
is the same command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from serving.cli import add_serving_subparsers
from training.cli import add_training_subparsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmoe", description="hmoe: data, training, reports, serving and export for a hierarchical "
                                 "mixture of small domain experts")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_training_subparsers(sub)
    add_serving_subparsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
