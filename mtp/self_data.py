"""`python -m specdec.mtp.self_data`: windows of the main model's own greedy text, for `mtp.distill --self-data`.

A drafter is judged on what the verifier generates, not on the corpus: acceptance is measured on
the main model's continuations of a prompt. This writes such continuations as training windows:
each is a `--prompt-len` window of the *training* split (never held-out text) followed by the
main model's greedy continuation of it (`--new-tokens`, decoded losslessly with MTP speculation,
which gives exactly plain greedy's tokens), so a window is `prompt-len + new-tokens` token ids.
Rows that stop early (end of sequence) are dropped.

Output: one `.npy` of int32 `[N, prompt-len + new-tokens]`, rewritten atomically after every batch,
so a run stopped at any time leaves a usable file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specdec.mtp.data import build_corpus, window_starts
from specdec.config import SpecConfig
from specdec.engine import Engine


def save_windows(path: Path, windows: list[np.ndarray]) -> None:
    """Write `windows` (each `[W]` int32) as one `[N, W]` int32 array at `path`, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.stack(windows).astype(np.int32))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.mtp.self_data", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("specdec/default_model"))
    p.add_argument("--work-dir", type=Path, default=Path(".train"), help="mtp.train's work dir (token cache)")
    p.add_argument("--out", type=Path, required=True, help="output .npy")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget (default 15)")
    budget.add_argument("--windows", type=int, help="stop after this many windows instead")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=196)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-chars", type=int, default=None, help="as mtp.train ran (token cache key)")
    p.add_argument("--max-heldout-chars", type=int, default=4_000_000, help="as mtp.train ran (token cache key)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    if a.prompt_len < 1 or a.new_tokens < 1 or a.batch_size < 1:
        raise SystemExit("--prompt-len, --new-tokens and --batch-size must be >= 1")
    if a.out.suffix != ".npy":
        raise SystemExit(f"--out {a.out}: must end in .npy")
    torch.set_num_threads(a.threads)
    eng = Engine.from_pretrained(a.ckpt, max_seq_len=a.prompt_len + a.new_tokens + 8)
    corpus = build_corpus(a.work_dir, eng.args.vocab_size, max_chars=a.max_train_chars,
                          heldout_max_chars=a.max_heldout_chars, log=lambda m: print(m, file=sys.stderr))
    windows: list[np.ndarray] = []
    start, batch = time.time(), 0
    bar = tqdm(desc="self-data", unit="window", file=sys.stderr, total=a.windows)
    while (len(windows) < a.windows) if a.windows else (time.time() - start < a.minutes * 60):
        starts = window_starts(len(corpus.train), a.prompt_len, a.batch_size, a.seed, batch)
        prompts = [corpus.train[s:s + a.prompt_len].astype(np.int64).tolist() for s in starts]
        out = eng.generate(prompts, max_new_tokens=a.new_tokens, spec=SpecConfig(depth=3))
        for prompt, new in zip(prompts, out.token_ids):
            if len(new) == a.new_tokens:
                windows.append(np.asarray(prompt + list(new), dtype=np.int32))
                bar.update(1)
        batch += 1
        if windows:
            save_windows(a.out, windows)
    bar.close()
    print(f"wrote {len(windows)} windows of {a.prompt_len + a.new_tokens} tokens to {a.out} "
          f"({(time.time() - start) / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
