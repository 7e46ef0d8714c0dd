"""Task-level scores of the report: each model answers held-out items (``training.data.instruct``).

Every item is asked as a chat user turn and answered greedily (conversation: sampled) until the end
of the assistant turn, the way the server asks an instruction-tuned expert.

- **math, reasoning**: exact match after extracting the final answer (:func:`extract_answer`), per
  generator family;
- **knowledge**: exact match (case and surrounding punctuation ignored) on trained facts asked in a
  held-out phrasing;
- **code**: the share of completions that parse (``ast``) as the prompt's function, and on codeio
  items the share whose function returns the reference's output, run in a subprocess
  (``training.code_exec``; never in this process);
- **conversation**: sampled replies to held-out first turns: mean distinct-2 and the share of replies
  with a repeated word 4-gram (a loop).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from experts.calculator import same_number
from training.data.instruct import parses, task_items

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
EXAMPLES = 6  # examples shown per (model, domain)


def _is_number(s: str) -> bool:
    return _NUMBER.fullmatch(s.strip().replace(",", "")) is not None


def extract_answer(output: str, reference: str) -> str:
    """The final answer in ``output``: the value after ``####`` if there is one; else, for a numeric
    reference, the first number after the last ``=`` (``345 + 278 = 623``), or the first number when
    there is no ``=``; else the first line."""
    if "####" in output:
        return output.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    if _is_number(reference):
        m = _NUMBER.search(output.rsplit("=", 1)[-1].replace(",", ""))
        return m.group(0) if m else ""
    return output.strip().split("\n")[0].strip()


def _norm(s: str) -> str:
    return " ".join(s.strip().strip(".!?\"'").lower().split())


def is_correct(output: str, reference: str) -> bool:
    got, ref = extract_answer(output, reference), extract_answer(reference, reference)
    if _is_number(ref) and _is_number(got) and "/" not in ref + got:
        return same_number(got, ref)
    return _norm(got) == _norm(ref)


def distinct_2(ids: list[int]) -> float:
    """Unique bigrams / bigrams of a generated sequence (1.0 = no repetition)."""
    grams = list(zip(ids, ids[1:]))
    return len(set(grams)) / len(grams) if grams else 0.0


def has_loop(text: str, n: int = 4) -> bool:
    """True if some word ``n``-gram occurs twice in ``text``."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def generate_ids(model: torch.nn.Module, prompts: list[list[int]], params: Any, tool: Any = None,
                 guard: Any = None) -> list[list[int]]:
    """The generated ids of every prompt (``experts.generate``, batched, with the model's ``tool``
    and ``guard``)."""
    from experts.generate import generate

    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate(model, prompts, params, tool=tool, guard=guard):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return outs


def answer(model: torch.nn.Module, tok: Any, items: list[dict], max_new: int, *,
           temperature: float = 0.0, seed: int = 0, tool: Any = None, guard: Any = None,
           keep_stop: bool = False, room: int | None = None, **penalties: float) -> list[list[int]]:
    """Each item's first user turn as a chat prompt, answered until ``<|end|>`` (token ids; with
    ``keep_stop`` an answer that ended keeps its last, stop id). A prompt keeps its last tokens to
    leave ``room`` (default ``max_new``) in the context; an answer also ends when the context is
    full. ``penalties``: ``SamplingParams``' repetition, frequency and presence penalties."""
    from experts.sampling import SamplingParams

    keep = model.cfg.max_seq_len - (max_new if room is None else room)
    prompts = [tok.chat(it["messages"][:1])[-keep:] for it in items]
    params = SamplingParams(temperature=temperature, top_k=50 if temperature else 0, max_new_tokens=max_new,
                            stop_ids=(tok.end_id, tok.eos_id), seed=seed, **penalties)
    outs = generate_ids(model, prompts, params, tool, guard)
    return outs if keep_stop else [[t for t in o if t not in params.stop_ids] for o in outs]


def code_answers(model: torch.nn.Module, tok: Any, items: list[dict], max_new: int,
                 **kw: Any) -> tuple[list[str], list[bool]]:
    """Each item's answer as text, and whether it ended before ``max_new`` tokens (``answer``'s ``kw``)."""
    outs = answer(model, tok, items, max_new, keep_stop=True, **kw)
    stops = (tok.end_id, tok.eos_id)
    return ([tok.decode([t for t in o if t not in stops]) for o in outs],
            [bool(o) and o[-1] in stops for o in outs])


def _examples(items: list[dict], texts: list[str], keys: list[bool] | None = None) -> list[dict]:
    picked, seen = [], set()
    for i, it in enumerate(items):  # one per family first, then the rest in order
        if it["family"] not in seen:
            seen.add(it["family"])
            picked.append(i)
    picked += [i for i in range(len(items)) if i not in picked]
    return [{"family": items[i]["family"], "question": items[i]["messages"][0]["content"][:300],
             "answer": items[i]["answer"][:300], "output": texts[i][:300],
             **({"correct": keys[i]} if keys is not None else {})} for i in picked[:EXAMPLES]]


def exact_match_scores(items: list[dict], texts: list[str]) -> dict[str, Any]:
    ok = [is_correct(t, it["answer"]) for it, t in zip(items, texts)]
    fam: dict[str, list[bool]] = defaultdict(list)
    for it, k in zip(items, ok):
        fam[it["family"]].append(k)
    return {"n": len(items), "exact_match": sum(ok) / max(1, len(ok)),
            "by_family": {f: {"n": len(v), "exact_match": sum(v) / len(v)} for f, v in sorted(fam.items())},
            "examples": _examples(items, texts, ok)}


def code_scores(items: list[dict], texts: list[str], finished: list[bool] | None = None, *,
                timeout_s: float = 10.0, examples: bool = True) -> dict[str, Any]:
    """Parse rate and codeio execution accuracy; with ``finished`` (the answer ended before the token
    budget), also the share that ended and the parse rate of those (a cut-off answer rarely parses)."""
    from training.code_exec import codeio_check
    from training.data.sources import codeio_rows

    programs = [it["messages"][0]["content"] + "\n" + t for it, t in zip(items, texts)]
    parsed = [parses(p) for p in programs]
    ended = {}
    if finished is not None:
        done = [p for p, f in zip(parsed, finished) if f]
        ended = {"finished_rate": sum(finished) / max(1, len(finished)),
                 "parse_rate_finished": sum(done) / len(done) if done else None}
    rows, runs = codeio_rows(), []
    for it, prog in zip(items, programs):
        row = rows.get(it["key"].split(":")[1]) if it["family"] == "codeio" else None
        if row is None or not prog.lstrip().startswith("def main_solution"):
            continue
        preamble = row["code_sample"].split("def main_solution", 1)[0]
        res = codeio_check(row["code_sample"], preamble + prog, row["input_generator"], timeout_s=timeout_s)
        if not res.error.startswith("reference"):
            runs.append(res.ok)
    return {"n": len(items), "parse_rate": sum(parsed) / max(1, len(parsed)), **ended,
            "codeio_n": len(runs), "codeio_exec_accuracy": sum(runs) / len(runs) if runs else None,
            **({"examples": _examples(items, texts, parsed)} if examples else {})}


def conversation_scores(items: list[dict], ids: list[list[int]], texts: list[str]) -> dict[str, Any]:
    d2 = [distinct_2(o) for o in ids]
    loops = [has_loop(t) for t in texts]
    return {"n": len(items), "distinct_2": sum(d2) / max(1, len(d2)), "loop_share": sum(loops) / max(1, len(loops)),
            "examples": _examples(items, texts)}


def domain_scores(model: torch.nn.Module, tok: Any, domain: str, items: list[dict], max_new: int,
                  tool: Any = None) -> dict[str, Any]:
    """One model's task scores on one domain's held-out items, generated with its ``tool`` as served.
    With a tool, math scores also give ``without_tool``: the same items, the model alone."""
    if not items:
        return {"n": 0}
    if domain == "conversation":
        ids = answer(model, tok, items, max_new, temperature=0.8, tool=tool)
        return conversation_scores(items, ids, [tok.decode(o) for o in ids])
    if domain == "code":  # decoded as served (router.domains), and greedy alone
        from experts.syntax_guard import PythonGuard
        from router.domains import DOMAIN_SAMPLING, GUARDED_DOMAINS

        guard = PythonGuard(tok) if domain in GUARDED_DOMAINS else None
        texts, finished = code_answers(model, tok, items, 2 * max_new, tool=tool, guard=guard,
                                       **DOMAIN_SAMPLING.get(domain, {}))
        scores = code_scores(items, texts, finished=finished)
        plain = code_scores(items, *code_answers(model, tok, items, 2 * max_new, tool=tool), examples=False)
        scores["greedy_alone"] = plain
        return scores
    texts = [tok.decode(o) for o in answer(model, tok, items, max_new, tool=tool)]
    scores = exact_match_scores(items, texts)
    if tool is not None and domain == "math":
        alone = exact_match_scores(items, [tok.decode(o) for o in answer(model, tok, items, max_new)])
        scores["without_tool"] = {k: alone[k] for k in ("exact_match", "by_family")}
    return scores


def task_section(models: dict[str, torch.nn.Module], corpus: Any, tok: Any, per_family: int,
                 max_new: int, metas: dict[str, dict] | None = None) -> dict[str, Any]:
    """Per domain, the task scores of its own expert and of every generalist (dense, token-MoE, merged);
    a model whose checkpoint ``metas`` list the calculator answers with it (``experts.calculator``)."""
    from experts.calculator import tool_for
    from router.domains import DOMAINS

    generalists = [n for n in models if n not in DOMAINS and n != "seed"]
    tools = {n: tool_for((metas or {}).get(n), tok) for n in models}
    out: dict[str, Any] = {}
    for d in corpus.domains:
        names = ([d] if d in models else []) + generalists
        if not names or not per_family:
            continue
        items = task_items(corpus, d, per_family)
        out[d] = {n: domain_scores(models[n], tok, d, items, max_new, tools[n]) for n in names}
    return out
