"""Writing checkpoints in the released DeepSeek-V3 layout (config, index, FP8 shards + scales, tokenizer).

Used by the synthetic-checkpoint generator, the trainer's export and the tests, so every model
specdec ships or tests goes through exactly the loader that reads the 671B release.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from specdec import kernels

# Projections inside decoder blocks are FP8 in the release; eh_proj, embeddings, heads, norms, router stay BF16.
_FP8_NAME = re.compile(r"^model\.layers\.\d+\.(?!eh_proj).*_proj(_with_mqa)?\.weight$")


def is_fp8_tensor(name: str) -> bool:
    """Whether the release stores tensor `name` as FP8 with a `_scale_inv`."""
    return bool(_FP8_NAME.match(name))


def quantize_state(tensors: dict[str, torch.Tensor], block: int = 128,
                   float_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """FP8-quantise block projections (adding `<name>_scale_inv`); cast the rest to `float_dtype`.

    `e_score_correction_bias` stays float32 as in the release.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if is_fp8_tensor(name):
            out[name], out[name + "_scale_inv"] = kernels.weight_quant(t.float(), block)
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        else:
            out[name] = t.to(float_dtype)
    return out


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `out_dir` that replaces `out_dir` only if the block succeeds."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    tokenizer_files: dict[str, str | bytes],
    shard_bytes: int = 1 << 30,
) -> Path:
    """Write an HF-layout checkpoint atomically (a temp dir renamed into place).

    Args:
        out_dir: target directory (replaced if it exists).
        tensors: final stored tensors by HF name (already quantised if FP8 is wanted).
        config: the `config.json` dict.
        tokenizer_files: file name → contents (e.g. tokenizer.json, tokenizer_config.json).
        shard_bytes: start a new shard after this many bytes (several shards + index always written).
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors, key=_natural_key):
            t = tensors[name].contiguous()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for file, content in tokenizer_files.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / file, mode) as f:
                f.write(content)
    return out_dir


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
