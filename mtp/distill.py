"""`python -m specdec.mtp.distill`: fine-tune a trained checkpoint's MTP module toward its own main model.

The MTP module is trained jointly with the paper's objective (cross-entropy against the true
token i+2), but as a drafter what counts is agreeing with the *verifier*: acceptance is decided by
the main model's distribution, not by the data. This pass keeps every main-model tensor (and the
shared embedding and head) frozen and byte-identical, and trains only the MTP block
(`enorm`, `hnorm`, `eh_proj`, the decoder block, `shared_head.norm`) to minimise the soft
cross-entropy to the main model's next-next-token distribution on the training split:

    loss = − Σ_v p_main(v | t_≤i+1) · log q_mtp(v | h_i, t_{i+1})

With `--depth D > 1` the loss is averaged over the chain the drafter actually runs: depth k is fed
depth k−1's normed output and the true token t_{i+k}, attends to the committed depth-1 rows and
its own chain's scratch rows (`DeepSeekV3ForTraining.mtp_chain_forward`), and is scored against
p_main(t_{i+k+1} | t_≤i+k). Depths ≥ 2 reuse the one MTP layer, so without this the layer never
sees its own output as input while training.

`--self-data FILE` (from `python -m specdec.mtp.self_data`) mixes in windows of the main model's own greedy
continuations of training prompts, `--self-frac` of every batch: the text the drafter is run on.

The last `--qat-frac` of the steps see the FP8 round trip of the MTP projections
(quantisation-aware, as in `mtp.train`). The output is the same checkpoint with only the MTP
layer's tensors replaced (FP8 + `weight_scale_inv`, as released), written every `--save-every`
minutes and at the end, so a stopped run leaves its latest state; `python -m specdec.mtp.eval` measures
the agreement before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specdec.model.args import from_hf_config
from specdec.model.checkpoint import CheckpointReader
from specdec.model.export import quantize_state, write_checkpoint
from specdec.mtp.data import build_corpus, train_batch
from specdec.mtp.train import FP8_BLOCK, autocast, dequantized
from specdec.mtp.train_model import DeepSeekV3ForTraining, export_tensors, fake_fp8_weights, load_tensors


def distill_loss(model: DeepSeekV3ForTraining, window: torch.Tensor, depth: int = 1) -> torch.Tensor:
    """Soft cross-entropy of the chained MTP head to the main model, averaged over depths 1..`depth`.

    window `[B, T + depth + 1]`: anchors i = 0..T-1; depth k at anchor i is scored against the main
    model's distribution of t_{i+k+1} given the true prefix (see `mtp_chain_forward`).
    """
    seqlen = window.shape[1] - depth - 1
    with torch.no_grad():
        hidden, logits, _ = model.main_forward(window[:, :-1])  # position j predicts token j+1
    drafts = model.mtp_chain_forward(hidden[:, :seqlen], window[:, 1:seqlen + depth], depth)
    loss = window.new_zeros((), dtype=torch.float32)
    for k, draft_logits in enumerate(drafts, start=1):
        target = logits[:, k:k + seqlen].float().softmax(dim=-1)
        loss = loss - (target * draft_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()
    return loss / depth


def mixed_batch(corpus_train: np.ndarray, self_windows: np.ndarray | None, self_frac: float,
                batch_size: int, window: int, seed: int, step: int) -> torch.Tensor:
    """Step `step`'s batch `[batch_size, window]` int64: `round(self_frac · batch_size)` rows drawn from
    `self_windows` `[N, W ≥ window]` (cropped at a random offset), the rest random corpus windows."""
    n_self = round(self_frac * batch_size) if self_windows is not None else 0
    rows = [train_batch(corpus_train, batch_size - n_self, window, seed, step)] if n_self < batch_size else []
    if n_self:
        rng = np.random.default_rng([seed, step, 1])
        pick = rng.integers(0, len(self_windows), size=n_self)
        offset = rng.integers(0, self_windows.shape[1] - window + 1, size=n_self)
        idx = offset[:, None] + np.arange(window)[None, :]
        rows.append(torch.from_numpy(self_windows[pick[:, None], idx].astype(np.int64)))
    return torch.cat(rows)


def write_distilled(out: Path, ckpt: Path, cfg: dict, stored: dict[str, torch.Tensor],
                    model: DeepSeekV3ForTraining, mtp_prefix: str) -> None:
    """Write `stored` with the MTP layer's tensors replaced by `model`'s (FP8-quantised) to `out`.

    Written to a sibling directory first and swapped in, so `out` is never half-written."""
    new = quantize_state({k: v for k, v in export_tensors(model).items() if k.startswith(mtp_prefix)}, FP8_BLOCK)
    for name in new:  # the MTP layer's copies of embed/head stay as stored (the main ones are frozen)
        if name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
            new[name] = stored[name]
    if set(new) - set(stored):
        raise SystemExit(f"unexpected tensors: {sorted(set(new) - set(stored))[:3]}")
    files = {f.name: f.read_bytes() for f in ckpt.iterdir()
             if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json"}
    tmp, old = out.with_name(out.name + ".writing"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, {**stored, **new}, cfg, files, shard_bytes=1 << 30)
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.mtp.distill", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("specdec/default_model"))
    p.add_argument("--work-dir", type=Path, default=Path(".train"), help="mtp.train's work dir (token cache)")
    p.add_argument("--out", type=Path, required=True)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=12.0, help="wall-clock budget (default 12)")
    budget.add_argument("--steps", type=int, help="a step budget instead of minutes")
    p.add_argument("--max-train-chars", type=int, default=None, help="as mtp.train ran (token cache key)")
    p.add_argument("--max-heldout-chars", type=int, default=4_000_000, help="as mtp.train ran (token cache key)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--depth", type=int, default=3,
                   help="train the chain the drafter runs: depths 1..D, each fed the previous one's output "
                        "(default 3; 1 trains the single MTP step only)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--qat-frac", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--self-data", type=Path, help="windows of the main model's own text (mtp.self_data's .npy)")
    p.add_argument("--self-frac", type=float, default=0.5, help="share of every batch from --self-data (default 0.5)")
    p.add_argument("--save-every", type=float, default=10.0, help="write the checkpoint every this many minutes")
    a = p.parse_args(argv)
    if not 0.0 <= a.self_frac <= 1.0:
        raise SystemExit(f"--self-frac must be in [0, 1], got {a.self_frac}")
    window_len = a.seq_len + a.depth + 1
    self_windows = None
    if a.self_data is not None:
        try:
            self_windows = np.load(a.self_data)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--self-data {a.self_data}: cannot read it as .npy ({e})")
        if self_windows.ndim != 2 or self_windows.shape[1] < window_len or len(self_windows) == 0:
            raise SystemExit(f"--self-data {a.self_data}: need [N, >= {window_len}] token ids "
                             f"(--seq-len + --depth + 1), got shape {list(self_windows.shape)}")
    torch.set_num_threads(a.threads)
    cfg = json.loads((a.ckpt / "config.json").read_text())
    args = from_hf_config(cfg)
    corpus = build_corpus(a.work_dir, args.vocab_size, max_chars=a.max_train_chars,
                          heldout_max_chars=a.max_heldout_chars, log=lambda m: print(m, file=sys.stderr))
    shipped_vocab = json.loads((a.ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    if corpus.tokenizer.get_vocab() != shipped_vocab:
        raise SystemExit(f"{a.work_dir}: its token cache was made with another tokenizer than {a.ckpt}'s")
    stored = CheckpointReader(a.ckpt).read_all()
    if a.depth < 1:
        raise SystemExit(f"--depth must be >= 1, got {a.depth}")
    model = DeepSeekV3ForTraining(args, a.seq_len + a.depth + 1)
    load_tensors(model, dequantized(stored))
    mtp_prefix = f"model.layers.{args.n_layers}."
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(mtp_prefix) and not name.endswith("e_score_correction_bias")
        if param.requires_grad:
            trained.append(param)
    opt = torch.optim.AdamW(trained, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, step = time.time(), 0
    last_save = start

    def progress() -> float:
        return step / a.steps if a.steps else (time.time() - start) / (a.minutes * 60)

    bar = tqdm(desc="distill", unit="step", file=sys.stderr, total=a.steps)
    while progress() < 1.0:
        progress_now = progress()
        for g in opt.param_groups:
            g["lr"] = a.lr * (1.0 - progress_now)  # linear decay to 0 over the budget
        window = mixed_batch(corpus.train, self_windows, a.self_frac, a.batch_size, window_len, a.seed, step)
        qat = progress_now >= 1.0 - a.qat_frac
        opt.zero_grad(set_to_none=True)
        with fake_fp8_weights(model, FP8_BLOCK) if qat else contextlib.nullcontext():
            with autocast(True):
                loss = distill_loss(model, window, a.depth)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", qat=qat, refresh=False)
        if time.time() - last_save > a.save_every * 60:
            write_distilled(a.out, a.ckpt, cfg, stored, model, mtp_prefix)
            last_save = time.time()
    bar.close()
    write_distilled(a.out, a.ckpt, cfg, stored, model, mtp_prefix)
    print(f"distilled the MTP layer for {step} steps ({(time.time() - start) / 60:.1f} min); wrote {a.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
