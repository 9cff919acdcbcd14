"""`python -m bench.plain_vs_transformers`: plain greedy decode speed, specdec vs transformers, same weights.

Both decode the same prompts greedily from the same float32 checkpoint on the CPU, in one run,
batch 1; the outputs are checked token-equal, and tokens/s of each plus the ratio are printed
(and written as JSON with `--json`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from model.synthetic import small_config, write_random_checkpoint
from specdec import Engine


def _time_specdec(eng: Engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    outs, t0 = [], time.perf_counter()
    for p in prompts:
        outs.append(eng.generate([p], max_new_tokens=new).token_ids[0])
    return time.perf_counter() - t0, outs


def _time_hf(hf, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    outs, t0 = [], time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            seq = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2,
                              eos_token_id=None)
        outs.append(seq[0, len(p):].tolist())
    return time.perf_counter() - t0, outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plain_vs_transformers", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-path", help="float checkpoint (default: a random small one written to --work-dir)")
    p.add_argument("--work-dir", default="/tmp/specdec-bench")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = Path(a.ckpt_path) if a.ckpt_path else write_random_checkpoint(
        Path(a.work_dir) / "f32", small_config(), fp8=False)
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    eng = Engine.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_seq_len=512)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, eng.args.vocab_size, (16,), generator=gen).tolist() for _ in range(a.prompts)]
    _time_specdec(eng, prompts[:1], 4), _time_hf(hf, prompts[:1], 4)  # warm-up
    t_hf, out_hf = _time_hf(hf, prompts, a.max_new_tokens)
    t_sd, out_sd = _time_specdec(eng, prompts, a.max_new_tokens)
    n = a.prompts * a.max_new_tokens
    same = sum(x == y for x, y in zip(out_sd, out_hf))
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": a.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "checkpoint": str(ckpt), "batch_size": 1, "prompts": a.prompts, "new_tokens_per_prompt": a.max_new_tokens,
        "transformers_tokens_per_s": n / t_hf, "specdec_tokens_per_s": n / t_sd,
        "speedup_vs_transformers": t_hf / t_sd, "identical_outputs": f"{same}/{a.prompts}",
    }
    print("| decoder (plain greedy, batch 1, CPU fp32) | tokens/s |\n|---|---|")
    print(f"| transformers DeepseekV3ForCausalLM.generate | {result['transformers_tokens_per_s']:.1f} |")
    print(f"| specdec Engine.generate | {result['specdec_tokens_per_s']:.1f} |")
    print(f"\nspecdec / transformers: {result['speedup_vs_transformers']:.2f}x; "
          f"identical greedy outputs: {result['identical_outputs']}")
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
