"""`python -m specdec.model.convert`: pre-shard an HF-layout checkpoint for a given model-parallel size.

Writes `model{rank}-mp{N}.safetensors` per rank (tensor names unchanged, each holding only that
rank's slice, FP8 weights kept with their scale windows), `specdec_sharding.json`, and copies
`config.json` and the tokenizer files. The result loads with `--ckpt-path OUT` under
`torchrun --nproc-per-node N`, each rank reading one file. Slicing uses the same module layout
as the loader, so a converted checkpoint gives exactly the same model as slicing at load time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import trange

from specdec.model.args import load_model_args
from specdec.model.export import atomic_directory
from specdec.model.checkpoint import SHARDING_FILE, CheckpointReader, load_state
from specdec.model.errors import SpecdecError
from specdec.model.mtp_layer import MTPLayer
from specdec.model.parallel import ParallelContext
from specdec.model.transformer import Transformer

COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "special_tokens_map.json")


def rank_state(reader: CheckpointReader, path: Path, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """This rank's tensors (main model and MTP layers) by checkpoint name, in their stored dtypes."""
    args = load_model_args(path)
    stored_dtype = reader.shape_dtype("model.embed_tokens.weight")[1]
    with torch.device("meta"):
        main = Transformer(args, ctx, stored_dtype, args.fp8_block_size, 2)
    load_state(main, reader, "", "cpu", False, args.fp8_block_size or 128)
    state = {n: t for n, t in main.state_dict().items()}
    for i in range(args.n_layers, args.n_layers + args.n_mtp_layers):
        prefix = f"model.layers.{i}."
        if not reader.has(prefix + "eh_proj.weight"):
            continue
        with torch.device("meta"):
            mtp = MTPLayer(i, args, ctx, stored_dtype, args.fp8_block_size)
        load_state(mtp, reader, prefix, "cpu", False, args.fp8_block_size or 128)
        state.update({prefix + n: t for n, t in mtp.state_dict().items()})
    return {n: t.contiguous() for n, t in state.items() if t is not None}


def convert(src: str | Path, dst: str | Path, world_size: int) -> Path:
    """Pre-shard `src` into `dst` for `world_size` ranks (written atomically)."""
    src, dst = Path(src), Path(dst)
    if world_size < 1:
        raise SpecdecError(f"--model-parallel must be >= 1, got {world_size}")
    reader = CheckpointReader(src)
    if reader.presharded:
        raise SpecdecError(f"{src}: already pre-sharded; convert from the original HF checkpoint")
    with atomic_directory(dst) as tmp:
        for rank in trange(world_size, desc="ranks"):
            state = rank_state(reader, src, ParallelContext(world_size, rank))
            save_file(state, str(tmp / f"model{rank}-mp{world_size}.safetensors"), metadata={"format": "pt"})
        (tmp / SHARDING_FILE).write_text(json.dumps({"world_size": world_size, "source": str(src)}, indent=2))
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.model.convert", description=__doc__.splitlines()[0])
    p.add_argument("--hf-ckpt-path", required=True, help="HF-layout checkpoint directory")
    p.add_argument("--save-path", required=True, help="output directory (replaced if present)")
    p.add_argument("--model-parallel", type=int, required=True, help="number of ranks to shard for")
    a = p.parse_args(argv)
    try:
        out = convert(a.hf_ckpt_path, a.save_path, a.model_parallel)
    except SpecdecError as e:
        print(f"model.convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.model_parallel} rank shards to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
