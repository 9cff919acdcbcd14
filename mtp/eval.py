"""`python -m specdec.mtp.eval`: held-out quality of a checkpoint's main model and MTP head, through specdec's loader.

On windows of the standard library's test suite (never trained on), it reports
* perplexity of the main model (next-token cross-entropy, exp'd),
* MTP top-1 agreement: how often the MTP head's argmax for token i+2 (given h_i and the true
  t_{i+1}) equals the main model's argmax for token i+2 (given the true prefix) — the paper's
  "second-token acceptance" under greedy decoding,
* MTP top-1 accuracy against the true token i+2.

Everything runs through `Engine.from_pretrained`, the loader of every HF checkpoint (FP8 included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from specdec.model.errors import SpecdecError
from specdec.mtp.data import heldout_windows, read_texts, split_files, stdlib_root
from specdec import Engine


def heldout_stream(engine: Engine, max_chars: int) -> np.ndarray:
    """Token ids of the held-out files (each followed by EOS), with the checkpoint's own tokenizer."""
    _, heldout = split_files(stdlib_root())
    eos = int(engine.tokenizer.eos_token_id)
    ids: list[int] = []
    for text in read_texts(heldout, max_chars=max_chars):
        ids.extend(engine.tokenizer.encode(text, add_special_tokens=False))
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


@torch.inference_mode()
def evaluate(engine: Engine, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity and MTP agreement/accuracy over `windows` `[N, W]` of token ids."""
    if engine.drafter is None:
        raise SpecdecError(f"{engine.checkpoint}: checkpoint has no MTP layer to evaluate")
    nll, n_tok, agree, correct, n_mtp = 0.0, 0, 0, 0, 0
    n_layers = engine.args.n_layers
    for start in range(0, windows.shape[0], batch_size):
        tokens = windows[start : start + batch_size].to(engine.device)
        batch, width = tokens.shape
        pos = torch.arange(width, device=engine.device).expand(batch, width)
        mask = pos.unsqueeze(-1) >= pos.unsqueeze(1)
        kv = torch.zeros(n_layers + 1, batch, width, engine.args.kv_lora_rank, dtype=engine.model.dtype)
        pe = torch.zeros(n_layers + 1, batch, width, engine.args.qk_rope_head_dim, dtype=engine.model.dtype)
        out = engine.model(tokens, pos, kv, pe, pos, mask)
        logp = out.logits[:, :-1].log_softmax(-1)
        nll -= logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).sum().item()
        n_tok += tokens[:, 1:].numel()
        # MTP at position i: (h_i, t_{i+1}) -> t_{i+2}, for i = 0 .. W-3
        mtp = engine.drafter(tokens[:, 1:-1], out.hidden[:, :-2], pos[:, :-2], kv, pe, pos[:, :-2], mask[:, :-2, :-2])
        mtp_top = mtp.logits.argmax(-1)
        agree += (mtp_top == out.logits[:, 1:-1].argmax(-1)).sum().item()
        correct += (mtp_top == tokens[:, 2:]).sum().item()
        n_mtp += mtp_top.numel()
    return {"heldout_tokens": n_tok, "perplexity": math.exp(nll / n_tok), "mtp_agreement": agree / n_mtp,
            "mtp_accuracy": correct / n_mtp}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.mtp.eval", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-path", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--windows", type=int, default=128, help="held-out windows")
    p.add_argument("--window", type=int, default=256, help="tokens per window")
    p.add_argument("--max-chars", type=int, default=4_000_000, help="held-out text read (characters)")
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    try:
        engine = Engine.from_pretrained(a.ckpt_path, max_seq_len=a.window + 1)
        stream = heldout_stream(engine, a.max_chars)
        result = evaluate(engine, heldout_windows(stream, a.windows, a.window))
    except SpecdecError as e:
        print(f"mtp.eval: error: {e}", file=sys.stderr)
        return 2
    result["checkpoint"] = str(engine.checkpoint)
    print(f"held-out (stdlib test suite): {result['heldout_tokens']} tokens, perplexity {result['perplexity']:.1f}, "
          f"MTP agreement with the main model {100 * result['mtp_agreement']:.1f}%, "
          f"MTP accuracy {100 * result['mtp_accuracy']:.1f}%")
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
