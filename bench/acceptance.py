"""`python -m specdec.bench acceptance`: how often the MTP drafter's tokens survive verification.

Sweep: draft shapes (chains of depth 1..K, trees DEPTHxTOPKxNODES, `auto`) × temperatures ×
draft modes (one-hot drafts always; sampled drafts only at T > 0, greedy drafts are the argmax).
Every configuration decodes the same prompts in the same batches with the same seeds; plain
decoding at each temperature runs too, for the speedup column and (greedy) the equality check.
Each temperature's configurations are timed in interleaved rounds (`bench.common.timed_runs`;
speedup: the median over rounds of the ratio within a round).

Reported per configuration, pooled over all prompts (rates weighted by row-steps):
tau (tokens per verifier forward and row, bonus included), acceptance per position,
unconditional (share of row-steps whose first i+1 drafts were all accepted) and conditional
(the same given the first i were: uncond[i] / uncond[i-1]), draft acceptance rate (accepted /
drafted tokens), tokens/s and speedup over plain decoding at the same temperature.
"""

from __future__ import annotations

from argparse import Namespace

from specdec.bench import plots
from specdec.bench.common import (PLAIN, BenchError, Report, Table, batches, fmt, greedy_mismatch, fmt_list, parse_float_list,
                          paired_speedup, parse_shapes, progress, resolve_auto, timed_runs)
from specdec.bench.prompt_set import Prompt
from specdec import Engine

DRAFT_MODES = ("onehot", "sample")


def plan(shapes, temperatures: list[float], modes: list[str]) -> list[tuple[float, str, object]]:
    """(temperature, draft mode, shape) runs in order: plain first at each temperature; sampled
    drafts only at T > 0; greedy always drafts the argmax (mode 'onehot')."""
    runs = []
    for t in temperatures:
        runs.append((t, "-", PLAIN))
        for mode in (["onehot"] if t == 0 else modes):
            runs += [(t, mode, s) for s in shapes]
    return runs


def run(eng: Engine, prompts: list[Prompt], a: Namespace) -> Report:
    shapes = parse_shapes(a.chains, a.trees)
    if not shapes:
        raise BenchError("acceptance: no draft shapes (--chains and --trees are both empty)")
    temperatures = parse_float_list(a.temperatures, "--temperatures")
    modes = [m.strip() for m in a.draft_modes.split(",") if m.strip()]
    if not temperatures or not modes or any(m not in DRAFT_MODES for m in modes):
        raise BenchError(f"--temperatures/--draft-modes: need at least one temperature and modes among "
                         f"{', '.join(DRAFT_MODES)}, got {a.temperatures!r} / {a.draft_modes!r}")
    if a.batch_size < 1:
        raise BenchError(f"--batch-size must be >= 1, got {a.batch_size}")
    ids = eng.encode([p.prompt for p in prompts])
    groups = batches(ids, a.batch_size)
    runs = plan(shapes, temperatures, modes)

    rows: list[dict] = []
    failures: list[str] = []
    auto_reports: dict[str, str] = {}
    auto_choices: dict[str, str] = {}
    bar = progress(len(runs) * (max(a.repeats, 1) + 1), "acceptance")
    timed: list[tuple[float, str, object]] = []  # (temperature, mode, Run) in plan order
    for temperature in temperatures:  # each temperature's configurations timed in interleaved rounds
        group = []
        for t, mode, shape in runs:
            if t != temperature:
                continue
            if shape.kind == "auto":
                bar.set_postfix_str(f"T={temperature:g} {mode} calibrating auto")
                shape, text = resolve_auto(eng, groups[0], temperature, a.top_p, a.seed, mode, shape.draft_vocab)
                auto_reports[f"T={temperature:g} {mode}"] = text
                auto_choices[f"T={temperature:g} {mode}"] = shape.dims
            group.append((mode, shape))

        def done(what: str, temperature: float = temperature) -> None:
            bar.update(1)
            bar.set_postfix_str(f"T={temperature:g}, done: {what}")

        group_runs = timed_runs(eng, groups, [shape for _, shape in group], max_new_tokens=a.max_new_tokens,
                                temperature=temperature, top_p=a.top_p, seed=a.seed,
                                draft_mode=[m if m != "-" else "onehot" for m, _ in group], repeats=a.repeats,
                                on_call=done)
        timed += [(temperature, mode, r) for (mode, _), r in zip(group, group_runs)]
    bar.close()

    for temperature, mode, r in timed:
        shape = r.shape
        plain = next(run for t, _, run in timed if t == temperature and run.shape.kind == "plain")
        same = None
        if temperature == 0 and shape.kind != "plain":
            failure = greedy_mismatch(f"greedy {shape.label}", r.token_ids, plain.token_ids)
            same = failure is None
            failures += [failure] if failure else []
        s = r.stats
        rows.append({
            "temperature": temperature, "draft_mode": mode, "kind": shape.kind, "config": shape.key,
            "label": shape.label, "depth": shape.depth, "topk": shape.topk, "nodes": shape.nodes,
            "draft_vocab": shape.draft_vocab,
            "tau": s["tau"], "acceptance_unconditional": s["acceptance_unconditional"],
            "acceptance_conditional": s["acceptance_conditional"],
            "draft_acceptance_rate": s["draft_acceptance_rate"], "row_steps": s["row_steps"],
            "verify_steps": s["verify_steps"], "tokens": s["tokens"], "wall_s": s["wall_s"],
            "tokens_per_s": s["tokens_per_s"], "speedup": paired_speedup(r, plain),
            "equal_to_plain": same,
        })

    tables = []
    for t in temperatures:
        heading = "T = 0 (greedy; drafts are the MTP argmax)" if t == 0 else f"T = {t:g}, top-p {a.top_p:g}"
        body = [[r["label"], r["draft_mode"], fmt(r["tau"]), fmt_list(r["acceptance_unconditional"]),
                 fmt_list(r["acceptance_conditional"]), fmt(r["draft_acceptance_rate"]),
                 fmt(r["tokens_per_s"], 1), f"{r['speedup']:.2f}x",
                 "" if r["kind"] == "plain" or r["equal_to_plain"] is None else fmt(r["equal_to_plain"])]
                for r in rows if r["temperature"] == t]
        tables.append(Table(heading, ["config", "drafts", "tau", "acceptance per position (uncond.)",
                                      "acceptance per position (cond.)", "draft acc. rate", "tokens/s",
                                      "speedup", "= plain"], body))
    notes = [f"{len(prompts)} prompts in {len(groups)} call(s) of {a.batch_size} rows; rates pooled over "
             "row-steps; cond.[i] = uncond.[i] / uncond.[i-1]; tree shapes are depth x topk x verified nodes"]
    notes += [f"auto at {k}: choose_tree picked {v} (depth x topk x nodes)" for k, v in auto_choices.items()]
    settings = {"checkpoint": str(eng.checkpoint), "kv_cache_dtype": eng.kv_cache_dtype, "prompts": len(prompts),
                "batch_size": a.batch_size,
                "max_new_tokens": a.max_new_tokens, "temperatures": temperatures, "draft_modes": modes,
                "top_p": a.top_p, "seed": a.seed, "shapes": [s.key for s in shapes], "quick": a.quick}
    report = Report("acceptance", "MTP draft acceptance", settings, rows, tables, notes, failures,
                    extra={"auto_reports": auto_reports})
    report.plots = [("per_position", lambda: plots.acceptance_per_position(rows)),
                    ("speedup", lambda: plots.acceptance_speedup(rows))]
    return report
