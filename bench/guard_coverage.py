"""Does the Python syntax guard let real code through? Standard-library functions fed token by token.

Takes functions with docstrings from the installed standard library (``training.data.instruct
.functions``: the prompt is the ``def`` line and docstring, the body what follows; tests and idlelib
left out, at most 3 per file, a seeded sample), asks the guard (``experts.syntax_guard``) about each
token of each body in turn, as the engine would about the model's choice, and counts the bodies in
which some token is refused, with where. A valid body should never be refused: a refusal would push
the model off correct code. Also times each check. Bodies that do not compile with their prompt are
counted apart (the guard rightly refuses them).

    python -m bench.guard_coverage runs/std/experts/code/tokenizer.json --n 400 \\
        --out docs/results/guard_coverage_2026-12-07.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from bench.common import setup
from experts.atomic import atomic_write_text
from experts.syntax_guard import PythonGuard, parses
from experts.tokenizer import Tokenizer
from training.data.instruct import functions


def stdlib_functions(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``(where, prompt, body)`` of up to ``n`` standard-library functions, in a seeded order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"test", "tests", "idlelib", "site-packages"} & set(p.relative_to(root).parts))
    rng = random.Random(seed)
    rng.shuffle(files)
    out: list[tuple[str, str, str]] = []
    for f in files:
        try:
            found = list(functions(f.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
        rng.shuffle(found)
        out += [(f"{f.relative_to(root)}:{name}", prompt, body) for name, prompt, body in found[:3]]
        if len(out) >= n:
            break
    return out[:n]


def first_refusal(guard: PythonGuard, tok: Tokenizer, prompt: str, body: str, times: list[float]) -> str | None:
    """The body up to its first refused token (marked), or None if every token and the end pass."""
    state = guard.open(tok.chat([{"role": "user", "content": prompt}]))
    if state is None:
        return "(prompt not guarded)"
    done = ""
    for t in tok.encode(body):
        t0 = time.perf_counter()
        ok = state.allows(t)
        times.append(time.perf_counter() - t0)
        if not ok:
            return done[-80:] + "[[" + guard.text(t) + "]]"
        state.advance(t)
        done += guard.text(t)
    return None if state.allows(tok.end_id) else done[-80:] + "[[<|end|>]]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer", type=Path, help="a tokenizer.json (a run's experts/code/tokenizer.json)")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = setup()
    tok = Tokenizer.load(args.tokenizer)
    guard, times, rows = PythonGuard(tok), [], []
    for where, prompt, body in stdlib_functions(args.n):
        valid = parses(prompt + "\n" + body)
        rows.append({"function": where, "compiles": valid,
                     "refused_at": first_refusal(guard, tok, prompt, body, times) if valid else None})
    valid = [r for r in rows if r["compiles"]]
    times.sort()
    summary = {"functions": len(rows), "compile": len(valid), "refused": sum(bool(r["refused_at"]) for r in valid),
               "checks": len(times), "check_ms_mean": round(1e3 * statistics.mean(times), 4),
               "check_ms_p99": round(1e3 * times[int(0.99 * len(times))], 4), "check_ms_max": round(1e3 * times[-1], 3)}
    print(json.dumps(summary))
    for r in valid:
        if r["refused_at"]:
            print(r["function"], repr(r["refused_at"]))
    if args.out:
        out = {"tokenizer": str(args.tokenizer), "env": env, "summary": summary,
               "refused": [r for r in valid if r["refused_at"]], "python": sys.version.split()[0]}
        atomic_write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
