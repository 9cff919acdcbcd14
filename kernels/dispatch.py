"""One entry point per FP8 op that picks the torch reference or the Triton kernel.

`impl` selects the implementation per call (there is no global switch):

* "torch": `kernels.reference` (any device).
* "triton": `kernels.triton_fp8`; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1.
* "auto": Triton for CUDA tensors on an FP8-capable GPU (sm_89+) when triton imports,
  otherwise the torch reference (so CPU tensors always use the reference).

Triton is imported lazily, only when the Triton path is taken.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import reference as ref

IMPLS = ("auto", "torch", "triton")
MIN_FP8_CAPABILITY = (8, 9)
"""Oldest CUDA compute capability with native float8e4nv conversions and fp8 MMA."""


def triton_available() -> bool:
    """Whether `import triton` succeeds in this environment."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install can raise more than ImportError
        return False
    return True


def _fp8_capable_cuda(t: torch.Tensor) -> bool:
    """Whether `t` lives on a CUDA device with compute capability >= 8.9."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= MIN_FP8_CAPABILITY


def resolve_impl(impl: str, t: torch.Tensor, auto_picks_triton: bool) -> bool:
    """Whether to run the Triton kernel for `impl` on main operand `t`; raise ValueError if impossible.

    `auto_picks_triton`: the op's own rule for when "auto" should take Triton (triton must also import).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "auto":
        return auto_picks_triton and triton_available()
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' on a {t.device.type} tensor needs TRITON_INTERPRET=1; use impl='torch' or 'auto'"
        )
    if not triton_available():
        raise ValueError("impl='triton' was requested but triton cannot be imported")
    return True


def _use_triton(impl: str, t: torch.Tensor) -> bool:
    """FP8 ops: "auto" takes Triton on FP8-capable CUDA devices."""
    return resolve_impl(impl, t, _fp8_capable_cuda(t))


def _triton_impl() -> ModuleType:
    """Import and return `kernels.triton_fp8` (deferred so that importing kernels skips triton)."""
    from . import triton_fp8

    return triton_fp8


def act_quant(
    x: torch.Tensor,
    block_size: int = ref.BLOCK_SIZE,
    scale_fmt: str | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations per 1 x `block_size` group of the last dim.

    Args:
        x: `[..., K]` floating tensor (K need not be a multiple of `block_size`).
        block_size: group length.
        scale_fmt: None (float32 scales `max(amax, 1e-4) / 448`) or "ue8m0" (rounded up to 2**k).
        impl: "auto", "torch" or "triton".
    Returns:
        y: `[..., K]` float8_e4m3fn; s: `[..., ceil(K / block_size)]` float32 scales.
    """
    mod = _triton_impl() if _use_triton(impl, x) else ref
    return mod.act_quant(x, block_size=block_size, scale_fmt=scale_fmt)


def weight_dequant(
    w: torch.Tensor,
    s: torch.Tensor,
    block_size: int = ref.BLOCK_SIZE,
    out_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> torch.Tensor:
    """Dequantise a block-quantised weight: `W[i, j] = w[i, j] * s[i // b, j // b]`.

    Args:
        w: `[M, N]` float8_e4m3fn.
        s: `[ceil(M / b), ceil(N / b)]` float32.
        block_size: tile edge b.
        out_dtype: result dtype.
        impl: "auto", "torch" or "triton".
    Returns:
        `[M, N]` tensor of `out_dtype`.
    """
    mod = _triton_impl() if _use_triton(impl, w) else ref
    return mod.weight_dequant(w, s, block_size=block_size, out_dtype=out_dtype)


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
    block_size: int = ref.BLOCK_SIZE,
) -> torch.Tensor:
    """Block-scaled FP8 matmul `C = A @ B^T` with float32 accumulation.

    Args:
        a: `[..., K]` float8_e4m3fn; a_s: `[..., ceil(K / b)]` float32.
        b: `[N, K]` float8_e4m3fn; b_s: `[ceil(N / b), ceil(K / b)]` float32.
        out_dtype: result dtype.
        impl: "auto", "torch" or "triton".
        block_size: quantisation block b.
    Returns:
        `[..., N]` tensor of `out_dtype`.
    """
    mod = _triton_impl() if _use_triton(impl, a) else ref
    return mod.fp8_gemm(a, a_s, b, b_s, out_dtype=out_dtype, block_size=block_size)


def grouped_fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    expert_ids: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
    block_size: int = ref.BLOCK_SIZE,
) -> torch.Tensor:
    """Many experts' block-scaled FP8 matmuls in one call: `C[s] = A[s] @ W[expert_ids[s]]^T`.

    Args:
        a: `[S, K]` float8_e4m3fn; a_s: `[S, ceil(K / b)]` float32.
        w: `[E, N, K]` float8_e4m3fn; w_s: `[E, ceil(N / b), ceil(K / b)]` float32.
        expert_ids: `[S]` integer expert of each row; ids outside `[0, E)` give zero rows.
        out_dtype: result dtype. impl: "auto", "torch" or "triton". block_size: block b.
    Returns:
        `[S, N]` tensor of `out_dtype`.
    """
    mod = _triton_impl() if _use_triton(impl, a) else ref
    return mod.grouped_fp8_gemm(a, a_s, w, w_s, expert_ids, out_dtype=out_dtype, block_size=block_size)


def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
    scale_fmt: str | None = None,
    block_size: int = ref.BLOCK_SIZE,
) -> torch.Tensor:
    """`y = x @ W^T` for a block-quantised weight: act_quant(x) then fp8_gemm.

    Args:
        x: `[..., K]` floating activations.
        w_fp8: `[N, K]` float8_e4m3fn weight; w_scale: `[ceil(N / b), ceil(K / b)]` float32.
        out_dtype: result dtype; defaults to `x.dtype`.
        impl: "auto", "torch" or "triton" (used for both steps).
        scale_fmt: activation scale format, None or "ue8m0".
        block_size: quantisation block b.
    Returns:
        `[..., N]` tensor of `out_dtype`.
    """
    y, s = act_quant(x, block_size=block_size, scale_fmt=scale_fmt, impl=impl)
    return fp8_gemm(y, s, w_fp8, w_scale, out_dtype=out_dtype or x.dtype, impl=impl, block_size=block_size)
