"""`python -m specdec.tune`: measure this machine's speed choices, show them and cache them.

Two kinds of choice are measured where they run, never taken from another machine:

1. GEMM formulation per weight shape and row count (`kernels.cpu_gemm`, CPU only): each
   candidate is timed; the table shows the microseconds and the verdict per row bucket.
2. Step costs of adaptive speculation (`specdec.adaptive`): short adaptive runs on a few code
   prompts at each batch size fill the cost table (seconds per step at each draft depth); the
   table shows them as multiples of a plain step, with the acceptance seen and the depth the
   policy settles on.

Both land in the user's cache (`$SPECDEC_CACHE` or `~/.cache/specdec`: `gemm_plans.json`,
`step_costs.json`) and are what `specdec.generate`, the server and `bench` use afterwards.
`--refresh` re-times everything instead of reading the cache.
"""

from __future__ import annotations

import sys

import torch

from specdec.kernels.cpu_gemm import ROW_BUCKETS, GemmTuner, machine_key
from specdec.model.errors import SpecdecError
from specdec.adaptive import row_bucket
from specdec.config import SpecConfig
from specdec.engine import Engine
from specdec.generate import EXIT_USAGE, CliParser, write_json_atomic

PROMPTS = [
    "def fibonacci(n):", "class Stack:", "import os\nimport sys\n\n\ndef main(argv):",
    "    def __init__(self, path, mode='r'):", "for i, line in enumerate(lines):", "def parse_args():",
    "class Node:\n    def __init__(self, value):", "try:\n    import json\nexcept ImportError:",
]


def gemm_table(tuner: GemmTuner) -> list[str]:
    """One line per (shape, row bucket): µs per formulation and the verdict."""
    lines = [f"GEMM formulations ({tuner.key}); µs per call, chosen one marked *"]
    for shape, entry in sorted(tuner.timings().items()):
        cells = []
        for rows, choice in zip(ROW_BUCKETS, entry["plan"]):
            us = entry.get("us", {}).get(str(rows), {})
            cells.append(f"{rows}: " + " ".join(f"{f}{'*' if f == choice else ''} {t:.1f}" for f, t in us.items()))
        lines.append(f"  {shape}")
        lines += [f"    {c}" for c in cells]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="specdec.tune", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-path", help="checkpoint directory; default: the embedded model")
    p.add_argument("--batch-sizes", default="1,4,8,16", help="batch sizes to time steps at (default 1,4,8,16)")
    p.add_argument("--draft-depth", type=int, default=3, help="deepest draft the policy may choose (default 3)")
    p.add_argument("--draft-vocab", type=int, default=None, help="as specdec.generate --draft-vocab")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt in each timing run")
    p.add_argument("--refresh", action="store_true", help="re-time everything instead of reading the cache")
    p.add_argument("--json", dest="json_path", help="also write the tables as JSON (atomically)")
    a = p.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"specdec.tune: error: --batch-sizes: expected comma-separated integers >= 1, got {a.batch_sizes!r}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        tuner = GemmTuner(torch.float32, measure=True, refresh=a.refresh)
        eng = Engine.from_pretrained(a.ckpt_path, device="cpu", tune=tuner)
        print("\n".join(gemm_table(tuner)))
        spec = SpecConfig(depth=a.draft_depth, draft_vocab=a.draft_vocab)
        if eng.drafter is None:
            print(f"{eng.checkpoint}: no MTP layer, so no speculation to tune")
            return 0
        costs = eng.step_costs(spec)
        if a.refresh:
            costs.samples.clear()
            costs.pairs.clear()
        report = {"machine": machine_key(eng.model.dtype), "gemm": tuner.timings(), "steps": {}}
        print(f"\nStep costs of adaptive speculation ({eng.cost_key(spec)})")
        print("  batch | plain ms | cost of depth 1..K in plain steps (back to back) | tau | steps by depth 0..K | most run")
        for batch in batch_sizes:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            for _ in range(2):  # the first run explores every depth, the second refines
                out = eng.generate(prompts, max_new_tokens=a.max_new_tokens, spec=spec)
            plain = costs.cost(0, batch)
            rel = [costs.relative(d, 0, batch) or float("nan") for d in range(1, a.draft_depth + 1)]
            steps = out.stats.depth_steps
            choice = max(range(len(steps)), key=lambda d: steps[d])  # where the second run settled
            print(f"  {batch:5d} | {plain * 1e3:8.2f} | " + " ".join(f"{r:.2f}x" for r in rel)
                  + f" | {out.stats.tau:.2f} | {out.stats.depth_steps} | depth {choice}"
                  + ("" if row_bucket(batch) == batch else f" (bucket {row_bucket(batch)})"))
            report["steps"][str(batch)] = {"plain_ms": plain * 1e3, "cost_in_plain_steps": rel, "tau": out.stats.tau,
                                           "depth_steps": out.stats.depth_steps, "choice": choice}
        costs.save()
        print(f"\ncached in {tuner.cache_path.parent} (gemm_plans.json, step_costs.json)")
        if a.json_path:
            write_json_atomic(a.json_path, report)
    except SpecdecError as e:
        print(f"specdec.tune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
