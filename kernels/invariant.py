"""Which batch-invariant kernels a model runs (`model.prepare.prepare_batch_invariant`).

Two sets with the same functions (`linear`, `bmm`, `rms_norm`, `gate_scores`, `silu_mul`,
`mla_attention`): the Triton kernels (`kernels.triton_invariant`: fixed tiles, on CUDA, or on the CPU
under TRITON_INTERPRET=1, slowly) and the torch reference (`kernels.invariant_reference`: one call
per row, any device). Like `kernels.dispatch`, "auto" takes Triton on CUDA and torch elsewhere.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import invariant_reference
from .dispatch import IMPLS, triton_available


def select(impl: str, device: torch.device) -> ModuleType:
    """The kernel set for `impl` ("auto", "torch" or "triton") on `device`; ValueError naming why
    when "triton" cannot run there."""
    if impl not in IMPLS:
        raise ValueError(f"batch-invariant kernels: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and (device.type != "cuda" or not triton_available())):
        return invariant_reference
    if not triton_available():
        raise ValueError("batch-invariant Triton kernels: triton cannot be imported")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"batch-invariant Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1 "
                         f"(this model is on {device})")
    from . import triton_invariant

    return triton_invariant
