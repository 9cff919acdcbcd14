"""`python -m specdec.bench.figures DIR [DIR ...]`: the README's figures table, generated from `bench latency`
JSON (never typed): per run directory and batch size, plain tokens/s, the adaptive default's
speedup (and decode speedup), tau, and step bound (and the bound with each step priced at the rows
it ran: runs with `--ceiling`; "-" otherwise), and the best fixed chain's speedup, all from the
same interleaved run.

Each DIR holds a `latency.json` written by `python -m specdec.bench latency --chains aK,1,2,...`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def figures_table(run_dirs: list[Path]) -> str:
    """Markdown: a line naming the machine(s) and commit(s) the runs came from, then one table row
    per (run, batch size); a machine column only when the runs come from more than one machine."""
    runs = [json.loads((run / "latency.json").read_text()) for run in run_dirs]
    machines = {}
    for data in runs:
        m = data["machine"]
        name = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} threads"
        machines.setdefault(name, set()).add((m.get("git_commit") or "?")[:7])
    several = len(machines) > 1
    lines = ["; ".join(f"Machine: {name} (commit {', '.join(sorted(commits))})" for name, commits in machines.items()),
             "",
             ("| machine " if several else "") + "| sampling | batch | plain tokens/s | adaptive (default): speedup (decode), tau "
             "| adaptive: step bound (rows as run) | best fixed chain: speedup |",
             "|---" * (7 if several else 6) + "|"]
    for data in runs:
        m, s = data["machine"], data["settings"]
        machine = f"| {m['cpu']}, {m['cores']} cores " if several else ""
        mode = "greedy" if s["temperature"] == 0 else f"T={s['temperature']:g}"
        for batch in s["batch_sizes"]:
            rows = [r for r in data["rows"] if r["batch_size"] == batch]
            plain = next(r for r in rows if r["kind"] == "plain")
            adaptive = [r for r in rows if r["kind"] == "adaptive"]
            chains = [r for r in rows if r["kind"] == "chain"]
            best = max(chains, key=lambda r: r["speedup"]) if chains else None
            a = (f"{adaptive[0]['speedup']:.2f}× ({adaptive[0]['decode_speedup']:.2f}×), {adaptive[0]['tau']:.2f}"
                 if adaptive else "-")
            bound = "-"
            if adaptive and "step_bound" in adaptive[0]:
                bound = f"{adaptive[0]['step_bound']:.2f}×"
                bound += f" ({adaptive[0]['rows_bound']:.2f}×)" if "rows_bound" in adaptive[0] else ""
            b = f"{best['speedup']:.2f}× ({best['label']})" if best else "-"
            lines.append(f"{machine}| {mode} | {batch} | {plain['tokens_per_s']:.0f} | {a} | {bound} | {b} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m specdec.bench.figures DIR [DIR ...] (each with a latency.json)", file=sys.stderr)
        return 2
    dirs = [Path(a) for a in args]
    missing = [d for d in dirs if not (d / "latency.json").is_file()]
    if missing:
        print(f"bench.figures: error: {missing[0]}: no latency.json", file=sys.stderr)
        return 2
    print(figures_table(dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
