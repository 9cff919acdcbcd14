"""Build the verifier for this rank and fill it from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.kernels.cpu_gemm import GemmTuner
from specdec.model.args import ModelArgs, load_model_args
from specdec.model.checkpoint import CheckpointReader, load_state, mtp_tensor_names
from specdec.model.parallel import ParallelContext
from specdec.model.prepare import prepare_backend
from specdec.model.transformer import Transformer


def load_verifier(
    path: str | Path,
    ctx: ParallelContext,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_seq_len: int = 4096,
    keep_fp8: bool | None = None,
    show_progress: bool = True,
    tuner: GemmTuner | None = None,
    batch_invariant: str | None = None,
) -> tuple[Transformer, CheckpointReader]:
    """Load the main model (layers 0..L-1, norm, head) of the checkpoint at `path` for this rank.

    Args:
        path: checkpoint directory (HF layout or pre-sharded by `python -m specdec.model.convert`).
        ctx: this rank's parallel context; only this rank's slices are read.
        device / dtype: where and in which dtype to compute.
        max_seq_len: longest sequence (prompt + generated + draft) the RoPE tables cover.
        keep_fp8: keep FP8 projections in FP8 (True) or dequantise at load (False);
            None: FP8 on CUDA, dequantised elsewhere.
        tuner: times the CPU GEMM formulations for each weight shape (`kernels.cpu_gemm`);
            None: the default formulation everywhere.
        batch_invariant: None, or the batch-invariant kernels to run ("auto", "torch", "triton":
            `model.prepare.prepare_batch_invariant`).
    Returns:
        (model, reader); the reader stays open for the MTP drafter, whose tensors
        (`model.layers.{L}.*`) the verifier leaves untouched.
    """
    args: ModelArgs = load_model_args(path)
    reader = CheckpointReader(path, ctx.rank, ctx.world_size)
    if keep_fp8 is None:
        keep_fp8 = torch.device(device).type == "cuda"
    fp8_block = args.fp8_block_size if keep_fp8 else None
    with torch.device("meta"):
        model = Transformer(args, ctx, dtype, fp8_block, max_seq_len)
    load_state(model, reader, "", device, show_progress and ctx.rank == 0, args.fp8_block_size or 128)
    model.init_rope(device)
    prepare_backend(model, device, tuner, (model.lm_head,), batch_invariant)
    model.mtp_tensors = mtp_tensor_names(reader, args.n_layers)
    return model.eval(), reader
