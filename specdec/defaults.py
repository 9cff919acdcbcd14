"""Where the embedded default model lives, and the stand-in used until a trained one ships."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from specdec.model.parallel import ParallelContext

PACKAGED_MODEL = Path(__file__).resolve().parent / "default_model"

RANDOM_NOTICE = (
    "NOTE: no trained default model ships with this build yet; using a small RANDOMLY INITIALISED "
    "DeepSeek-V3-shaped checkpoint (real FP8 layout), so the generated text is noise."
)


def random_model_dir() -> Path:
    base = Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))
    return base / "random-default-v1"


def default_model_path(ctx: ParallelContext) -> tuple[Path, str | None]:
    """(checkpoint dir, notice for the user). The packaged model if present, else a random stand-in.

    The stand-in is written once (rank 0; other ranks wait) to `$SPECDEC_CACHE` or
    `~/.cache/specdec`, in the same layout as the release.
    """
    if (PACKAGED_MODEL / "config.json").is_file():
        return PACKAGED_MODEL, None
    path = random_model_dir()
    if ctx.rank == 0 and not (path / "config.json").is_file():
        from specdec.model.synthetic import write_random_checkpoint

        print(f"writing a random default checkpoint to {path} ...", file=sys.stderr)
        write_random_checkpoint(path)
    if ctx.world_size > 1:
        dist.barrier(group=ctx.group)
    return path, RANDOM_NOTICE
