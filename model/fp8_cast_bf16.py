"""`python -m specdec.model.fp8_cast_bf16`: turn an FP8 checkpoint into a BF16 one (same layout, no scales).

Shard by shard: every FP8 weight is multiplied by its 128×128 `weight_scale_inv` blocks and
stored as BF16, the scales are dropped from shards and index, and `quantization_config` is
removed from config.json. Other files (tokenizer) are copied. Output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from specdec import kernels
from specdec.model.export import atomic_directory
from specdec.model.checkpoint import SCALE_SUFFIX, CheckpointReader
from specdec.model.errors import CheckpointError, SpecdecError


def cast(src: str | Path, dst: str | Path, block: int = 128, dtype: torch.dtype = torch.bfloat16,
         show_progress: bool = True) -> Path:
    """Dequantise every FP8 tensor of `src` into `dtype` (BF16 by default) in a new checkpoint at `dst`.

    Other tensors are widened to `dtype` when it is wider (float32 copies) and otherwise kept as
    stored (e.g. the release's float32 router biases stay float32 in a BF16 copy).
    """
    src, dst = Path(src), Path(dst)
    reader = CheckpointReader(src)
    if reader.presharded:
        raise SpecdecError(f"{src}: pre-sharded checkpoints cannot be cast; cast the HF checkpoint first")
    with atomic_directory(dst) as tmp:
        shards = sorted(set(reader.weight_map.values()))
        weight_map: dict[str, str] = {}
        for shard in tqdm(shards, desc="casting shards", unit="shard", disable=not show_progress):
            out: dict[str, torch.Tensor] = {}
            for name in (n for n, s in reader.weight_map.items() if s == shard):
                if name.endswith(SCALE_SUFFIX):
                    continue
                t = reader.read(name)
                if t.dtype == torch.float8_e4m3fn:
                    if not reader.has(name + SCALE_SUFFIX):
                        raise CheckpointError(f"{src}: FP8 tensor {name} has no {name + SCALE_SUFFIX}")
                    t = kernels.weight_dequant(t, reader.read(name + SCALE_SUFFIX).float(), block, out_dtype=dtype)
                elif t.element_size() < dtype.itemsize:
                    t = t.to(dtype)
                out[name] = t.contiguous()
                weight_map[name] = shard
            save_file(out, str(tmp / shard), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads((src / "config.json").read_text())
        config.pop("quantization_config", None)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    "config.json", "model.safetensors.index.json"):
                shutil.copyfile(f, tmp / f.name)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.model.fp8_cast_bf16", description=__doc__.splitlines()[0])
    p.add_argument("--input-fp8-hf-path", required=True)
    p.add_argument("--output-bf16-hf-path", required=True)
    a = p.parse_args(argv)
    try:
        out = cast(a.input_fp8_hf_path, a.output_bf16_hf_path)
    except SpecdecError as e:
        print(f"model.fp8_cast_bf16: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote BF16 checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
