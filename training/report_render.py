"""The run report as Markdown and PNG plots (from the JSON that ``training.report`` builds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any



def _matched_groups(sc: dict) -> str:
    """'; merged, baseline-dense and baseline-moe are compute-matched with each other' (or '')."""
    groups = sc.get("matched_groups") or []
    names = [", ".join(g[:-1]) + f" and {g[-1]}" for g in groups]
    return "".join(f"; {n} are compute-matched with each other" for n in names)

def _fmt(c: dict | None) -> str:
    return f"{c['ppl']:.2f} ({c['bpb']:.3f})" if c else "-"


def markdown(rep: dict[str, Any]) -> str:
    doms, rows, mixed, ev = rep["domains"], rep["matrix"], rep.get("mixed_test", {}), rep.get("eval", {})
    lines = [f"# Report: {rep['run_dir']}", "", "## Perplexity (bits per byte) on each domain's test documents", ""]
    if ev:
        lines += [f"Every row is scored on the same {ev['tokens']} tokens of {ev['documents']} test documents: per "
                  f"domain a seeded sample of up to {ev['max_tokens_per_domain']} scored tokens, each document "
                  f"`<|bos|>` + text + `<|eos|>` truncated to {ev['max_doc_tokens']} tokens and scored in "
                  f"{ev['window']}-token windows. The router routes each document from its first "
                  f"{ev['prefix_tokens']} text tokens (the routing prefix), and no row scores those tokens. "
                  "*mixed* pools every domain's documents (token-weighted).", ""]
    lines += ["| model | " + " | ".join(doms) + " | mixed |", "|---" * (len(doms) + 2) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cells.get(d)) for d in doms) + f" | {_fmt(mixed.get(name))} |")
    lines += ["", f"Own-domain expert is best on every domain: **{rep['experts_best_on_own_domain']}**", ""]
    if rep.get("experts_beat_dense_on_own_domain"):
        lines += ["Own-domain expert beats the dense generalist: "
                  + ", ".join(f"{d} **{v}**" for d, v in rep["experts_beat_dense_on_own_domain"].items()), ""]
    sc = rep.get("system_compute") or {}
    if rep.get("ratios"):
        how = ("compute-matched: training FLOPs within "
               f"{100 * sc['tolerance']:.0f}%" if sc.get("matched") else
               "NOT compute-matched; see the FLOP ratios under Compute" + _matched_groups(sc))
        lines += [f"Mixed-test perplexity ratios ({how}; < 1 is better than the dense generalist): "
                  + ", ".join(f"{k} = **{v:.3f}**" for k, v in rep["ratios"].items()), ""]
    lines += _router_markdown(rep.get("router"), doms)
    lines += _natural_markdown(rep.get("natural"))
    lines += ["## Compute", "", "What each model's training really consumed (tokens seen x FLOPs per token).", "",
              "| model | steps | tokens | active params | starts from | FLOPs |", "|---|---|---|---|---|---|"]
    for name, c in rep["compute"].items():
        lines.append(f"| {name} | {c['steps']} | {c['tokens']} | {c['active_params']:,} | "
                     f"{c.get('init_from') or 'random'} | {(c['flops'] or 0):.4g} |")
    if sc:
        lines += ["", f"Systems: routed experts ({' + '.join(sc['parts']['experts'])}) "
                  + ", ".join(f"{n} {f:.4g} FLOPs ({sc['ratio_to_experts'][n]:.3f}x)" for n, f in sc["flops"].items())
                  + (f". Compute-matched within {100 * sc['tolerance']:.0f}%." if sc["matched"] else
                     f". Not compute-matched (tolerance {100 * sc['tolerance']:.0f}%){_matched_groups(sc)}.")]
    lines += _merged_markdown(rep.get("merged_routing"), doms)
    lines += _tasks_markdown(rep.get("tasks"))
    lines += ["", "## Raw continuations", ""]
    for name, g in rep["generation"].items():
        lines.append(f"- {name}: sampled distinct-2 {g['sampling']['distinct_2']}")
    if rep.get("timing_s"):
        lines += ["", "Report timing (s, wall clock on a possibly shared CPU): "
                  + ", ".join(f"{k} {v}" for k, v in rep["timing_s"].items())]
    lines += ["", "![matrix](matrix_ppl.png)", "", "![loss curves](loss_curves.png)", ""]
    if rep.get("merged_routing"):
        lines += ["![merged routing](merged_routing.png)", ""]
    return "\n".join(lines)


def _merged_markdown(mr: dict | None, doms: list[str]) -> list[str]:
    if not mr:
        return []
    doms = [d for d in doms if d in mr["experts"]]
    lines = ["", "## Merged model: where each layer's router sends a domain's tokens", "",
             f"Share of each domain's test tokens whose top-{mr['top_k']} includes the expert branched on that "
             f"domain (chance {_pct(mr['chance'])}).", "", "| layer | " + " | ".join(doms) + " |",
             "|---" * (len(doms) + 1) + "|"]
    for i, own in enumerate(mr["own"]):
        lines.append(f"| {i} | " + " | ".join(_pct(own.get(d)) for d in doms) + " |")
    return lines + [""]


def task_headline(domain: str, s: dict) -> str:
    """The one figure of a model's task scores on ``domain`` (as the README table shows it)."""
    if not s.get("n"):
        return "-"
    if domain == "code":
        ex = s.get("codeio_exec_accuracy")
        ended = f", ended {_pct(s['finished_rate'])}" if "finished_rate" in s else ""
        head = f"parse {_pct(s['parse_rate'])}{ended}, exec {_pct(ex) if ex is not None else '-'} (n={s['codeio_n']})"
        alone = s.get("greedy_alone")
        return head + (f" (greedy, no guard: parse {_pct(alone['parse_rate'])})" if alone else "")
    if domain == "conversation":
        return f"distinct-2 {s['distinct_2']:.2f}, loops {_pct(s['loop_share'])}"
    head = _exact_match_headline(s)
    if s.get("without_tool"):
        head += f" (model alone: {_exact_match_headline(s['without_tool'])})"
    return head


def _exact_match_headline(s: dict) -> str:
    arith = {f: v for f, v in s["by_family"].items() if f.startswith("arithmetic_")}
    head = f"EM {_pct(s['exact_match'])}"
    if arith:
        n = sum(v["n"] for v in arith.values())
        head += f"; 2-3 digit +-x {_pct(sum(v['exact_match'] * v['n'] for v in arith.values()) / n)}"
    return head


def _tasks_markdown(tasks: dict | None) -> list[str]:
    if not tasks:
        return []
    others = sorted({n for d, by in tasks.items() for n in by if n != d})  # generalists, merged
    cols = ["own expert", *others]
    lines = ["", "## Task scores on held-out items", "",
             "Each item is asked as a chat user turn and answered greedily (conversation: sampled at "
             "temperature 0.8) until the end of the turn. Math and reasoning: exact match of the extracted final "
             "answer (with the calculator for models trained to call it, and in parentheses the model alone); "
             "knowledge: exact match on trained facts asked in a held-out phrasing; code: completions "
             "that parse, and codeio functions that return the reference output when run in a subprocess, "
             "decoded as the server decodes code (the Python syntax guard and the penalties of "
             "`router.domains.DOMAIN_SAMPLING`), "
             "and in parentheses the parse rate of plain greedy decoding; "
             "conversation: distinct-2 and the share of replies with a repeated word 4-gram.", "",
             "| domain | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for d, by in tasks.items():
        lines.append(f"| {d} | " + " | ".join(task_headline(d, by[n]) if n in by else "-" for n in [d, *others])
                     + " |")
    for d, by in tasks.items():
        fams = by.get(d, next(iter(by.values()))).get("by_family")
        if fams:
            lines += ["", f"{d} exact match by family: " + ", ".join(
                f"{f} " + "/".join(_pct(by[n]["by_family"].get(f, {}).get("exact_match")) for n in by)
                for f in fams) + f" ({' / '.join(by)})"]
    lines += ["", "| domain | model | question | reference | output |", "|---|---|---|---|---|"]
    cell = lambda t: str(t).replace("|", "\\|").replace("\n", "\\n")[:120]  # noqa: E731
    for d, by in tasks.items():
        for n, s in by.items():
            for ex in s.get("examples", [])[:3]:
                lines.append(f"| {d} | {n} | {cell(ex['question'])} | {cell(ex['answer'])} | `{cell(ex['output'])}` |")
    return lines + [""]


def _natural_markdown(nat: dict | None) -> list[str]:
    if not nat:
        return []
    doms = nat["domains"]
    lines = ["## Evaluation-only natural text (bits per byte)", "",
             "Each domain's natural-text set comes from a source that no training corpus uses "
             "(`training.data.evalsets`); scored after the routing prefix like the test documents.", "",
             "| model | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for name, cells in nat["matrix"].items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[d]['bpb']:.3f}" if d in cells else "-" for d in doms) + " |")
    lines += ["", "Own expert lowest of the five: " + ", ".join(f"{d} **{v}**" for d, v in nat["own_expert_best"].items())]
    if nat.get("router_top1_within_2pct_of_own"):
        lines += ["", "router-top1 within 2% of the own expert: "
                  + ", ".join(f"{d} **{v}**" for d, v in nat["router_top1_within_2pct_of_own"].items())]
    return lines + [""]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _router_markdown(r: dict | None, doms: list[str]) -> list[str]:
    """The router section (``training.router_report`` fills ``rep["router"]``): routing accuracy per domain."""
    if not r:
        return []
    lines = ["## Router", "", "| routing accuracy | " + " | ".join(doms) + " | all |", "|---" * (len(doms) + 2) + "|"]
    for key, label in (("opening_accuracy", "learned, openings of all test documents"),
                       ("routed_accuracy", "learned, openings of the scored documents"),
                       ("opening_likelihood_accuracy", "likelihood (BTM), openings of the scored documents"),
                       ("prompt_accuracy", "learned, test prompts"),
                       ("probe_accuracy", "learned, hand-written probes (`router.probes.PROBES`; they shaped the "
                                          "prompt views)"),
                       ("heldout_probe_accuracy", "learned, second hand-written probe set (`HELDOUT`; close to `PROBES`, "
                                                  "not independent)"),
                       ("eval_prompt_accuracy", "learned, third-party evaluation-only prompts "
                                                "(`training.data.eval_prompts`)")):
        acc = r.get(key)
        if acc:
            lines.append(f"| {label} (n={acc.get('n')}) | " + " | ".join(_pct(acc["by_domain"].get(d)) for d in doms)
                         + f" | {_pct(acc.get('all'))} |")
    return lines + [""] + _eval_prompts_markdown(r.get("eval_prompts"), doms)


def _eval_prompts_markdown(e: dict | None, doms: list[str]) -> list[str]:
    """Group / expert accuracy, confusion and failure examples on the evaluation-only prompts."""
    if not e:
        return []
    halves = "; ".join(f"{h} half (n={v['n']}): group {_pct(v['group_accuracy'])}, expert {_pct(v['expert_accuracy'])}"
                       for h, v in e.get("halves", {}).items() if v)
    lines = ["### Router on evaluation-only prompts", "",
             "Prompts written by third parties, from packages that no training corpus reads (CHAMP, BIG-Bench "
             "Hard exemplars, ChatterBot's corpus, boltons; see `training.data.eval_prompts`); never trained on. Its dev "
             "half was used to choose changes to the router's prompt views; the test half is only reported. "
             f"n={e['n']} (" + ", ".join(f"{d} {e['n_by_domain'].get(d, 0)}" for d in doms) + "): group accuracy "
             f"**{_pct(e['group_accuracy'])}**, expert accuracy **{_pct(e['expert_accuracy'])}** "
             f"(goal: group >= 90%, expert >= 80%). {halves}.", "",
             "| true \\ routed | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
    for t in doms:
        lines.append(f"| {t} | " + " | ".join(str(e["confusion"].get(t, {}).get(d, 0)) for d in doms) + " |")
    lines += ["", "| true | routed | P(routed) | prompt |", "|---|---|---|---|"]
    cell = lambda t: " ".join(str(t).split()).replace("|", "\\|")[:140]  # noqa: E731
    lines += [f"| {f['true']} | {f['routed']} | {f['p_routed']:.2f} | {cell(f['prompt'])} |" for f in e["failures"]]
    if e.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(e["skipped"])]
    return lines + [""]


def plots(rep: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["matrix"])
    cells = {n: {**rep["matrix"][n], **({"mixed": rep["mixed_test"][n]} if n in rep.get("mixed_test", {}) else {})}
             for n in names}
    doms = rep["domains"] + (["mixed"] if rep.get("mixed_test") else [])
    grid = [[math.log(cells[n].get(d, {}).get("ppl", float("nan"))) for d in doms] for n in names]
    finite = [v for row in grid for v in row if v == v]
    mid = (min(finite) + max(finite)) / 2 if finite else 0.0
    fig, ax = plt.subplots(figsize=(1.4 * len(doms) + 2, 0.6 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(doms)), doms, rotation=30)
    ax.set_yticks(range(len(names)), names)
    for i, n in enumerate(names):
        for j, d in enumerate(doms):
            if d in cells[n]:
                light = grid[i][j] < mid  # yellow end of viridis_r
                ax.text(j, i, f"{cells[n][d]['ppl']:.1f}", ha="center", va="center",
                        color="k" if light else "w", fontsize=8)
    fig.colorbar(im, ax=ax, label="log perplexity")
    ax.set_title("test-document perplexity: model (row) on domain (column)")
    fig.tight_layout()
    fig.savefig(out / "matrix_ppl.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, c in rep["curves"].items():
        if name not in rep["compute"]:  # LM curves only (the router's loss is another quantity)
            continue
        for ax, key in zip(axes, ("train", "val")):
            if c[key]:
                ax.plot([p[1] for p in c[key]], [p[2] for p in c[key]], label=name)
    for ax, key in zip(axes, ("train", "val")):
        ax.set_xlabel("tokens")
        ax.set_title(f"{key} loss")
        ax.set_yscale("log")
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    if rep.get("merged_routing"):
        _merged_plot(plt, rep["merged_routing"], out / "merged_routing.png")


def _merged_plot(plt: Any, mr: dict, path: Path) -> None:
    """Grouped bars: per layer, the share of each domain's tokens routed to that domain's expert."""
    doms = [d for d in mr["own"][0] if d in mr["experts"]] if mr["own"] else []
    fig, ax = plt.subplots(figsize=(1.6 * len(mr["own"]) + 5, 4))
    width = 0.8 / max(1, len(doms))
    for j, d in enumerate(doms):
        ax.bar([i + j * width for i in range(len(mr["own"]))], [own.get(d) or 0 for own in mr["own"]],
               width, label=d)
    ax.axhline(mr["chance"], color="k", linestyle="--", linewidth=1, label=f"chance (top-{mr['top_k']})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mr["own"]))], [f"layer {i}" for i in range(len(mr["own"]))])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of the domain's tokens in its expert's top-{mr['top_k']}")
    ax.set_title("merged model: tokens routed to their own domain's expert")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
