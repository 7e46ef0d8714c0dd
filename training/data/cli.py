"""``hmoe data build|show``: build the cached corpora and print a per-domain table."""

from __future__ import annotations

import argparse
import logging
import time

from training.data.build import DataError, build_corpora, cache_root, corpus_dir_name, load_corpora, verify
from training.data.spec import SIZE_BYTES, CorpusSpec


def add_data_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data build`` and ``data show`` on the main CLI's sub-parsers."""
    data = subparsers.add_parser("data", help="build or inspect the training corpora")
    sub = data.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser("build", help="build (or reuse) the corpora, tokenizer and packed tokens")
    build.add_argument("--size", choices=list(SIZE_BYTES), default="quick")
    build.add_argument("--spec", help="a corpus spec YAML file instead of the built-in sources")
    build.add_argument("--cache-dir", help="default: $HMOE_DATA_DIR or .hmoe/data")
    build.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    show = sub.add_parser("show", help="per-domain counts and sizes")
    show.add_argument("--size", choices=list(SIZE_BYTES), default="quick")
    show.add_argument("--spec", help="the corpus spec YAML it was built from")
    show.add_argument("--cache-dir")
    show.add_argument("--verify", action="store_true", help="also check every file's SHA-256")
    data.set_defaults(func=run_data)
    return data


def run_data(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.data_command == "build":
            spec = CorpusSpec.from_yaml(args.spec) if args.spec else None
            t0 = time.time()
            corpus = build_corpora(args.size, args.cache_dir, spec=spec, force=args.force)
            print(f"built {corpus.root} in {time.time() - t0:.1f}s")
        else:
            spec = CorpusSpec.from_yaml(args.spec) if args.spec else None
            corpus = load_corpora(args.cache_dir, corpus_dir_name(spec) if spec else args.size)
            if args.verify:
                verify(corpus)
                print("verified: every file matches its manifest")
        print(format_table(corpus))
    except DataError as e:
        print(f"error: {e}")
        return 2
    return 0


def format_table(corpus) -> str:
    """One row per domain: documents, MB of text and tokens per split, chars/token on test."""
    head = f"{'domain':<13}{'docs tr/va/te':>22}{'MB train':>10}{'MB val':>8}{'MB test':>9}" \
           f"{'Mtok train':>11}{'chars/tok test':>16}"
    rows = [f"corpus {corpus.name} at {corpus.root}", head, "-" * len(head)]
    for d in corpus.domains:
        m = corpus.manifest(d)
        c, b, t = m["counts"], m["bytes"], m["tokens"]
        docs = f"{c['train']}/{c['val']}/{c['test']}"
        cpt = m["chars"]["test"] / max(t["test"], 1)
        rows.append(f"{d:<13}{docs:>22}{b['train'] / 1e6:>10.2f}{b['val'] / 1e6:>8.2f}{b['test'] / 1e6:>9.2f}"
                    f"{t['train'] / 1e6:>11.2f}{cpt:>16.2f}")
    return "\n".join(rows)


__all__ = ["add_data_subparser", "run_data", "cache_root"]
