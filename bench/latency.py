"""`python -m specdec.bench latency`: throughput and per-token latency by batch size, plain vs MTP.

For each batch size B the prompts are decoded in calls of B rows (the last call filled up by
cycling through the prompts; with `--continuous`, in one call of every prompt with B rows at once,
each finished row taken over by the next prompt), plainly and with every draft shape (chains, trees, `auto` calibrated
at that batch size), all in the same process: one warm-up call per configuration, then `--repeats`
rounds, each decoding every call with every configuration in turn, call after call
(`bench.common.timed_runs`).
Reported: tokens/s (all new tokens / wall seconds of all calls; median of the rounds), TPOT p50/p90
(`stats.tpot_s`: seconds per token after each row's first), TTFT (mean of `stats.ttft_s` over the
calls), speedup (tokens/s over plain's at the same batch size: the median over rounds of the
ratio within a round, `bench.common.paired_speedup`), decode speedup (the same over the seconds
after prefill: the decoding loop alone, which the paper's TPS and a long generation measure)
and, when greedy, whether every row's output is token for token plain decoding's (a mismatch is
a failure: loud line, exit status 1).

`--ceiling` also times one verifier forward over 1 and over W tokens per row (W = depth + 1 for a
chain, nodes + 1 for a tree; `bench.microbench.verify_costs`, first call of the batch size) and
reports, per draft shape, the verify cost ratio t(W) / t(1) and the ceiling tau · t(1) / t(W): the
speedup that shape would reach if drafting, acceptance and commit were free (an adaptive row: the
mean cost over the depths its steps ran). Where the ceiling is
low, verifying W tokens per row costs nearly W plain steps (the step is compute-bound) and no
cheaper drafting can help; where the speedup lies far below it, the drafting side is the cost.
It also times whole steps (draft, verify, accept and MTP commit against one plain step) as the
loop runs them (`bench.microbench.decoder_step_costs`, compiled whole with `--compile`) and reports the step
cost and the step bound tau / step cost: the decode speedup those steps allow, drafting included
(an adaptive row's step cost is the mean over the depths its steps ran). The decode speedup falls
short of it by what the loop spends outside its steps.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Callable, NamedTuple

from specdec.bench import plots
from specdec.bench.common import (PLAIN, BenchError, Report, Shape, Table, batches, fmt, greedy_mismatch, parse_int_list,
                          paired_speedup, parse_shapes, progress, resolve_auto, timed_runs)
from specdec.bench.microbench import decoder_step_costs, verify_costs
from specdec.bench.prompt_set import Prompt
from specdec import Engine, SpecConfig


def run(eng: Engine, prompts: list[Prompt], a: Namespace) -> Report:
    batch_sizes = parse_int_list(a.batch_sizes, "--batch-sizes")
    if not batch_sizes:
        raise BenchError("--batch-sizes: no batch sizes given")
    if a.temperature < 0:
        raise BenchError(f"--temperature must be >= 0, got {a.temperature}")
    shapes = [PLAIN] + parse_shapes(a.chains, a.trees)
    ids = eng.encode([p.prompt for p in prompts])
    greedy = a.temperature == 0

    rows: list[dict] = []
    failures: list[str] = []
    auto_reports: dict[str, str] = {}
    auto_choices: dict[str, str] = {}
    bar = progress(len(batch_sizes) * len(shapes) * (max(a.repeats, 1) + 1), "latency")
    for batch in batch_sizes:
        # --continuous: one call of every prompt, `batch` rows at once, a finished row's place taken
        # by the next prompt; else calls of `batch` prompts each, a call's rows starting together
        groups = [ids] if a.continuous else batches(ids, batch)
        timing_ids = groups[0][:batch]  # the rows the step and verify timings run
        batch_shapes = []
        for shape in shapes:
            if shape.kind == "auto":
                bar.set_postfix_str(f"batch {batch} calibrating auto")
                shape, auto_reports[f"batch {batch}"] = resolve_auto(eng, timing_ids, a.temperature, a.top_p, a.seed,
                                                                     draft_vocab=shape.draft_vocab)
                auto_choices[f"batch {batch}"] = shape.dims
            batch_shapes.append(shape)

        def done(what: str, batch: int = batch) -> None:
            bar.update(1)
            bar.set_postfix_str(f"batch {batch}, done: {what}")

        runs = timed_runs(eng, groups, batch_shapes, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_p=a.top_p, seed=a.seed, repeats=a.repeats, on_call=done,
                          max_batch=batch if a.continuous else None)
        plain = runs[0]
        batch_rows = []
        widths = [1 if r.shape.kind == "plain" else r.shape.spec().n_nodes + 1 for r in runs]
        for r in runs:
            shape = r.shape
            same = None
            if greedy and shape.kind != "plain":
                failure = greedy_mismatch(f"batch {batch}, {shape.label}", r.token_ids, plain.token_ids)
                same = failure is None
                failures += [failure] if failure else []
            s = r.stats
            batch_rows.append({
                "batch_size": batch, "config": shape.key, "label": shape.label, "kind": shape.kind,
                "depth": shape.depth, "topk": shape.topk, "nodes": shape.nodes, "draft_vocab": shape.draft_vocab,
                "calls": s["calls"], "repeats": s["repeats"],
                "tokens": s["tokens"], "wall_s": s["wall_s"], "tokens_per_s": s["tokens_per_s"],
                "tokens_per_s_repeats": s["tokens_per_s_repeats"],
                "tpot_p50_ms": s["tpot_p50_ms"], "tpot_p90_ms": s["tpot_p90_ms"], "ttft_mean_ms": s["ttft_mean_ms"],
                "speedup": paired_speedup(r, plain), "tau": s["tau"],
                "decode_tokens_per_s": s["decode_tokens_per_s"],
                "decode_speedup": paired_speedup(r, plain, "decode_tokens_per_s"),
                "equal_to_plain": same, "best_chain": False, "depth_steps": s.get("depth_steps", []),
                "rows_steps": s.get("rows_steps", []),
            })
        if a.ceiling:
            bar.set_postfix_str(f"batch {batch} verify cost")
            _add_ceiling(eng, timing_ids, batch_rows, widths)
            if eng.drafter is not None:
                bar.set_postfix_str(f"batch {batch} step costs")
                add_step_bound(eng, timing_ids, batch_rows, [r.shape for r in runs], a.temperature, a.top_p)
        chains = [r for r in batch_rows if r["kind"] == "chain"]
        if chains:
            max(chains, key=lambda r: r["tokens_per_s"])["best_chain"] = True
        rows += batch_rows
    bar.close()

    columns = [c for c in _COLUMNS if c.needs is None or any(c.needs in r for r in rows)]
    tables = []
    for batch in batch_sizes:
        calls = rows[[r["batch_size"] for r in rows].index(batch)]["calls"]
        title = (f"batch {batch} (one call of {len(ids)} prompts, {batch} row(s) at once)" if a.continuous
                 else f"batch {batch} ({calls} call(s) of {batch} rows)")
        body = [[c.cell(r) for c in columns] for r in rows if r["batch_size"] == batch]
        tables.append(Table(title, [c.header for c in columns], body))
    mode = "greedy" if greedy else f"T={a.temperature:g}, top-p {a.top_p:g}"
    rounds = max(a.repeats, 1)
    notes = [f"{len(prompts)} prompts, {a.max_new_tokens} new tokens each at most, {mode}; one warm-up call per "
             f"configuration, then {rounds} round(s) each timing every configuration in turn on each call; "
             "tokens/s: median "
             "of the rounds; speedup = tokens/s over plain's at the same batch size, the median over rounds of "
             "the ratio within a round; decode speedup = the same without prefill (new tokens over the seconds "
             "after prefill)"]
    if a.continuous:
        notes.append(f"--continuous: every configuration decodes all {len(prompts)} prompts in one call per "
                     "round with B rows at once, the next prompt taking a finished row's place (continuous "
                     "batching, `Engine.generate(max_batch=B)`); TTFT: until the first B rows' first tokens")
    if eng.compiled is not None:
        notes.append("specdec --compile (torch.compile, inductor): every step compiled whole (adaptive: a plain "
                     "step or the full depth), short prefills compiled; compilation happens in the warm-up calls and "
                     "is not timed")
    if a.ceiling:
        notes.append("verify W: tokens per row one verifier forward checks (1 for plain; adaptive: the widest); "
                     "verify ms: its median time on the first call's prompts (adaptive: the mean over the depths "
                     "its steps ran); verify cost: t(W) / t(1); ceiling: tau / verify cost, the speedup if "
                     "drafting, acceptance and commit were free")
    if any("step_cost" in r for r in rows):
        notes.append("step cost: one whole step (draft, verify, accept, MTP commit) over one plain step, "
                     "same prompts, interleaved, run as the decoding loop runs it (compiled whole with "
                     "--compile and greedy chains, else the decoder's stages); an adaptive row's: the mean over "
                     "the depths its steps ran; step bound: tau / step cost, the decode speedup those steps "
                     "allow (what the loop spends outside its steps, and the prefill, are the gap to it); bound (rows as run): "
                     "plain decoding's steps over this row's, each step priced at the depth and the live rows it "
                     "ran with (a call's last steps run fewer rows as its rows finish; steps timed at 1, 2, 4, ... "
                     "rows, linear in between)")
    notes += [f"auto at {k}: choose_tree picked {v} (depth x topk x nodes)" for k, v in auto_choices.items()]
    if any(r["kind"] == "adaptive" for r in rows):
        notes.append("adaptive K: the engine's default, each step's depth chosen in 0..K from step costs measured "
                     "on this machine and the running acceptance (specdec.adaptive); [d0 …]: share of its steps "
                     "run at each depth, d0 being plain steps")
    settings = {"checkpoint": str(eng.checkpoint), "kv_cache_dtype": eng.kv_cache_dtype, "prompts": len(prompts),
                "batch_sizes": batch_sizes,
                "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
                "shapes": [s.key for s in shapes], "quick": a.quick, "compiled": eng.compiled is not None,
                "ceiling": a.ceiling, "continuous": a.continuous}
    report = Report("latency", "Latency and throughput by batch size", settings, rows, tables, notes, failures,
                    extra={"auto_reports": auto_reports})
    report.plots = [("tokens_per_s", lambda: plots.tokens_per_s_vs_batch(rows)),
                    ("speedup", lambda: plots.speedup_vs_shape(rows))]
    return report


class _Column(NamedTuple):
    """One column of the per-batch tables: shown when some row has the key `needs` (None: always);
    `text(row)` its cell, left empty for a row without `needs` or, when `drafts_only`, for plain."""

    header: str
    text: Callable[[dict], str]
    needs: str | None = None
    drafts_only: bool = False

    def cell(self, row: dict) -> str:
        if (self.needs is not None and self.needs not in row) or (self.drafts_only and row["kind"] == "plain"):
            return ""
        return self.text(row)


def _equal_to_plain(row: dict) -> str:
    return "n/a (sampled)" if row["equal_to_plain"] is None else fmt(row["equal_to_plain"])


_COLUMNS = [
    _Column("config", lambda r: r["label"] + (" (best chain)" if r["best_chain"] else "") + depth_share(r)),
    _Column("verify W", lambda r: str(r["verify_width"]), "verify_width"),
    _Column("verify ms", lambda r: fmt(r["verify_ms"]), "verify_width"),
    _Column("verify cost", lambda r: f"{r['verify_cost']:.2f}x", "verify_width"),
    _Column("ceiling", lambda r: f"{r['ceiling']:.2f}x", "verify_width", drafts_only=True),
    _Column("step cost", lambda r: f"{r['step_cost']:.2f}x", "step_cost"),
    _Column("step bound", lambda r: f"{r['step_bound']:.2f}x", "step_cost", drafts_only=True),
    _Column("bound (rows as run)", lambda r: f"{r['rows_bound']:.2f}x", "rows_bound", drafts_only=True),
    _Column("tau", lambda r: fmt(r["tau"])),
    _Column("tokens/s", lambda r: fmt(r["tokens_per_s"], 1)),
    _Column("TPOT p50 ms", lambda r: fmt(r["tpot_p50_ms"])),
    _Column("TPOT p90 ms", lambda r: fmt(r["tpot_p90_ms"])),
    _Column("TTFT ms", lambda r: fmt(r["ttft_mean_ms"])),
    _Column("speedup", lambda r: f"{r['speedup']:.2f}x"),
    _Column("decode speedup", lambda r: f"{r['decode_speedup']:.2f}x"),
    _Column("= plain", _equal_to_plain, drafts_only=True),
]
"""The per-batch table: the verifier ceiling's and the step bound's columns (`--ceiling`) only when
measured."""


def depth_share(row: dict) -> str:
    """` [d0 12% d2 88%]`: an adaptive row's share of steps per depth ('' for other rows)."""
    steps = row.get("depth_steps") or []
    if row["kind"] != "adaptive" or not sum(steps):
        return ""
    return " [" + " ".join(f"d{d} {100 * n / sum(steps):.0f}%" for d, n in enumerate(steps) if n) + "]"


def add_step_bound(eng: Engine, ids: list[list[int]], rows: list[dict], shapes: list[Shape],
                    temperature: float, top_p: float) -> None:
    """Add step_ms, step_cost (t(step) / t(plain step)) and step_bound (tau / step_cost) to the
    plain row, the chain rows and the adaptive rows of one batch size (`shapes[i]` for `rows[i]`),
    timing whole steps on `ids` as `SpeculativeDecoder.step` runs them (`decoder_step_costs`:
    compiled whole with `--compile`).

    An adaptive row's steps ran at several depths: its step cost is the mean cost of the steps it
    ran (`depth_steps`; depth d timed as a chain step of depth d, depth 0 as a plain step).

    The step bound prices every step at all `len(ids)` rows; the last steps of a call run fewer, as
    its rows finish (a row of high acceptance finishes first; plain decoding's rows finish together
    unless EOS ends one), and the call waits for its slowest row. So each row also gets
    rows_bound: plain decoding's steps over the steps the row ran, each priced at the depth and the
    live rows it ran with (`rows_steps`; steps timed on the first 1, 2, 4, ... of `ids`, linear in
    between): the decode speedup those steps allow, tail included."""
    wanted: dict[tuple[int, int | None], SpecConfig] = {}
    for shape in shapes:
        depths = {"chain": [shape.depth], "adaptive": range(1, shape.depth + 1)}.get(shape.kind, [])
        for depth in depths:
            wanted[(depth, shape.draft_vocab)] = SpecConfig(depth=depth, adaptive=False, draft_vocab=shape.draft_vocab)
    if not wanted:
        return
    by_rows: dict[int, dict[tuple[int, int | None], float]] = {}
    for n in _row_counts(len(ids)):
        plain_s, chain_s = decoder_step_costs(eng, ids[:n], list(wanted.values()), temperature, top_p)
        by_rows[n] = {(0, None): plain_s, **dict(zip(wanted, chain_s))}
    full = by_rows[len(ids)]
    plain_s = full[(0, None)]
    cost = {key: t / plain_s for key, t in full.items()}
    for r, shape in zip(rows, shapes):
        vocab = shape.draft_vocab
        if r.get("rows_steps"):
            r["rows_step_s"] = sum(n * _at_rows(by_rows, (d, vocab if d else None), live)
                                   for d, counts in enumerate(r["rows_steps"]) for live, n in enumerate(counts) if n)
        if shape.kind == "plain":
            r["step_ms"], r["step_cost"] = plain_s * 1e3, 1.0
            continue
        if shape.kind == "chain":
            r["step_cost"] = cost[(shape.depth, vocab)]
        elif shape.kind == "adaptive" and sum(r["depth_steps"]):
            steps = r["depth_steps"]
            r["step_cost"] = sum(n * cost[(d, vocab if d else None)] for d, n in enumerate(steps)) / sum(steps)
        else:
            continue
        r["step_ms"] = r["step_cost"] * plain_s * 1e3
        r["step_bound"] = r["tau"] / r["step_cost"]
    plain_row = next((r for r, shape in zip(rows, shapes) if shape.kind == "plain"), None)
    if plain_row is not None and plain_row.get("rows_step_s"):
        for r in rows:
            if "step_bound" in r and r.get("rows_step_s"):
                r["rows_bound"] = plain_row["rows_step_s"] / r["rows_step_s"]


def _row_counts(batch: int) -> list[int]:
    """The live-row counts whose steps are timed for a batch of `batch` rows: 1, 2, 4, ... and `batch`."""
    return sorted({1 << i for i in range(batch.bit_length()) if 1 << i < batch} | {batch})


def _at_rows(by_rows: dict[int, dict], key: tuple[int, int | None], live: int) -> float:
    """Seconds of a step `key` (depth, draft vocab) over `live` rows: timed (`by_rows[n][key]`) or
    linear between the nearest timed row counts."""
    if live in by_rows:
        return by_rows[live][key]
    lo = max(n for n in by_rows if n < live)
    hi = min(n for n in by_rows if n > live)
    return by_rows[lo][key] + (by_rows[hi][key] - by_rows[lo][key]) * (live - lo) / (hi - lo)


def _add_ceiling(eng: Engine, ids: list[list[int]], rows: list[dict], widths: list[int]) -> None:
    """Add verify_width (W: `widths[i]` for `rows[i]`, tokens per row one verify step checks),
    verify_ms, verify_cost (t(W) / t(1)) and ceiling (tau / verify_cost) to each row of one batch
    size, timing the verifier on `ids` (see the module docstring). An adaptive row's steps verified
    d + 1 tokens at each depth d they ran (`depth_steps`): its verify ms and cost are the mean over
    its steps, W the widest."""
    adaptive = [r["depth_steps"] for r in rows if r["kind"] == "adaptive" and sum(r["depth_steps"])]
    extra = {d + 1 for steps in adaptive for d in range(len(steps))}
    costs = verify_costs(eng, ids, sorted({1, *widths, *extra}))
    for r, w in zip(rows, widths):
        steps = r["depth_steps"] if r["kind"] == "adaptive" and sum(r["depth_steps"]) else None
        seconds = costs[w] if steps is None else sum(n * costs[d + 1] for d, n in enumerate(steps)) / sum(steps)
        r["verify_width"], r["verify_ms"] = w, seconds * 1e3
        r["verify_cost"] = seconds / costs[1]
        r["ceiling"] = r["tau"] / r["verify_cost"]
