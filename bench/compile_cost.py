"""`python -m specdec.bench compile`: what `--compile` costs a user, first with empty inductor caches and
then on a second run that finds them on disk, against the default eager path.

Three fresh processes run the same job (the prompts at batch `--batch-size`, greedy, MTP as
`specdec.generate` runs it: adaptive depth ≤ 3; compiled, each step plain or of depth 3), each timing
the engine load, the job's first call (with `--compile`: tracing and compiling every graph it needs)
and the same job called again (steady speed):

  eager          default flags
  compile, cold  `--compile` with an empty `TORCHINDUCTOR_CACHE_DIR`
  compile, warm  `--compile` again over the cache the cold run left

Reported per process: load s, first call s, steady call s and tokens/s; the compile overhead (first
call − steady call), and the break-even: new tokens after which the compiled process, overhead
included, has finished sooner than the eager one (overhead ÷ (1/eager tokens/s − 1/compiled tokens/s)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

from specdec.bench.common import BenchError, Report, Table, fmt
from specdec.bench.prompt_set import Prompt
MODES = (("eager", False, None), ("compile, cold", True, "cold"), ("compile, warm", True, "warm"))


def _child(ckpt: str | None, prompts: list[str], batch: int, max_new_tokens: int, compile: bool, out: str) -> None:
    """In a fresh process: load, run the job twice, write the timings to `out` (JSON)."""
    import torch

    from specdec import Engine, SpecConfig

    t0 = time.perf_counter()
    eng = Engine.from_pretrained(ckpt, max_seq_len=1024, compile=compile)
    load_s = time.perf_counter() - t0
    spec = SpecConfig(depth=3)
    batches = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    calls, tokens = [], 0
    for _ in range(2):
        start, tokens = time.perf_counter(), 0
        for group in batches:
            tokens += sum(map(len, eng.generate(group, max_new_tokens=max_new_tokens, spec=spec).token_ids))
        calls.append(time.perf_counter() - start)
    Path(out).write_text(json.dumps({"load_s": load_s, "first_s": calls[0], "steady_s": calls[1], "tokens": tokens,
                                     "threads": torch.get_num_threads()}))


def compare(rows: list[dict]) -> None:
    """Add `speedup` (steady tokens/s ÷ the eager row's) and `break_even_tokens` (None: never pays) to
    every row after the first (eager); rows carry load_s, overhead_s and tokens_per_s."""
    eager = rows[0]
    for r in rows[1:]:
        gain = 1 / eager["tokens_per_s"] - 1 / r["tokens_per_s"]  # seconds saved per new token
        extra = r["load_s"] - eager["load_s"] + r["overhead_s"] - eager["overhead_s"]
        r["break_even_tokens"] = max(extra, 0.0) / gain if gain > 0 else None
        r["speedup"] = r["tokens_per_s"] / eager["tokens_per_s"]


def run(checkpoint: Path, prompts: list[Prompt], a: Namespace) -> Report:
    if a.batch_size < 1:
        raise BenchError(f"--batch-size must be >= 1, got {a.batch_size}")
    ckpt = str(checkpoint)
    texts = [p.prompt for p in prompts]
    rows = []
    with tempfile.TemporaryDirectory(prefix="specdec-inductor-") as cache_dir:
        for label, compile, _ in MODES:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                job = json.dumps([ckpt, texts, a.batch_size, a.max_new_tokens, compile, out.name])
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "specdec.bench.compile_cost", job], env=env,
                                      capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise BenchError(f"bench compile: the {label} process failed: {proc.stderr.strip()[-500:]}")
                r = json.loads(Path(out.name).read_text())
            rows.append({"mode": label, "process_s": wall, **r, "tokens_per_s": r["tokens"] / r["steady_s"],
                         "overhead_s": r["first_s"] - r["steady_s"]})
    compare(rows)
    table = Table("--compile: first and second run against the default eager path",
                  ["mode", "process s", "load s", "first call s", "steady call s", "tokens/s", "× eager",
                   "compile overhead s", "break-even tokens"],
                  [[r["mode"], fmt(r["process_s"], 1), fmt(r["load_s"], 1), fmt(r["first_s"], 1),
                    fmt(r["steady_s"], 1), fmt(r["tokens_per_s"], 1), fmt(r.get("speedup")),
                    fmt(r["overhead_s"], 1), fmt(r.get("break_even_tokens"), 0)] for r in rows])
    settings = {"checkpoint": ckpt, "prompts": len(prompts), "batch_size": a.batch_size,
                "max_new_tokens": a.max_new_tokens}
    notes = ["each mode in a fresh process; the cold and warm compiled runs share one TORCHINDUCTOR_CACHE_DIR, "
             "empty before the cold one; adaptive MTP depth <= 3 (default flags; compiled: a step is plain or of depth 3)",
             "compile overhead: first call - steady call (the eager row: first-call costs of its own, e.g. "
             "measuring step costs); break-even: new tokens after which the compiled process has finished "
             "sooner, its extra load and overhead included"]
    return Report("compile", "Compiled speed without the wait", settings, rows, [table], notes)


if __name__ == "__main__":
    _child(*json.loads(sys.argv[1]))
