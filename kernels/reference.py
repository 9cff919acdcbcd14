"""Plain-torch reference implementations of DeepSeek-V3 style FP8 block quantisation.

Layout conventions (identical in the Triton kernels of `kernels.triton_fp8`):

* Activations `x[..., K]` are quantised in contiguous 1 x `block_size` groups along the last
  dim; the last group of a row may be partial when K is not a multiple of `block_size`.
  Scales have shape `[..., ceil(K / block_size)]`.
* Weights `w[M, N]` are quantised in `block_size` x `block_size` tiles (partial tiles on the
  bottom and right edges). Scales have shape `[ceil(M / block_size), ceil(N / block_size)]`.
* FP8 is `torch.float8_e4m3fn` (largest finite value 448). A scale `s` is the dequantisation
  multiplier: `value ~= fp8.float() * s`.

Every function here runs on any device (CPU included) and is the ground truth the Triton
kernels are tested against.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
ACT_AMAX_CLAMP = 1e-4
"""Activation groups with amax below this are scaled as if their amax were this (avoids s=0)."""
WEIGHT_AMAX_CLAMP = 1e-12
"""Weight tiles with amax below this (e.g. all-zero tiles) get scale `WEIGHT_AMAX_CLAMP / 448`."""
SCALE_FORMATS = (None, "ue8m0")


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def check_scale_fmt(scale_fmt: str | None) -> None:
    """Raise ValueError unless `scale_fmt` is None (plain fp32 scales) or "ue8m0"."""
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")


def round_scale_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Round positive, finite float32 scales up to the next power of two (`2**ceil(log2 s)`).

    Done on the bit pattern, so it is exact: `torch.log2` of a value one ulp above a power of two
    can round to the integer itself, which would round such a scale *down* and let `x / s`
    overflow the FP8 range. Powers of two are returned unchanged.

    Args:
        s: float32 tensor of any shape, all entries normal positive numbers.
    Returns:
        float32 tensor of the same shape whose entries are powers of two, `>= s` and `< 2 * s`.
    """
    bits = s.contiguous().view(torch.int32)
    has_fraction = (bits & 0x007FFFFF) != 0
    rounded = (bits & 0x7F800000) + (has_fraction.to(torch.int32) << 23)
    return rounded.view(torch.float32)


def act_quant(
    x: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations per contiguous 1 x `block_size` group of the last dim.

    Per group: `s = max(amax, 1e-4) / 448` (float32; with `scale_fmt="ue8m0"` rounded up to a
    power of two), `y = fp8(x / s)` with round-to-nearest-even.

    Args:
        x: `[..., K]` floating tensor (any float dtype, any device); K need not be a multiple
            of `block_size`.
        block_size: group length along the last dim.
        scale_fmt: None or "ue8m0".
    Returns:
        y: `[..., K]` float8_e4m3fn.
        s: `[..., ceil(K / block_size)]` float32 dequantisation scales.
    """
    check_scale_fmt(scale_fmt)
    k = x.shape[-1]
    kb = cdiv(k, block_size)
    pad = kb * block_size - k
    xf = x.float()
    groups = torch.nn.functional.pad(xf, (0, pad)).reshape(*x.shape[:-1], kb, block_size)
    amax = groups.abs().amax(dim=-1)
    # a tensor divisor: CUDA divides by a Python scalar as a multiplication by its reciprocal
    # (1/448 is inexact: scales 1 ulp off IEEE division, which the CPU and the Triton kernel use)
    s = amax.clamp(min=ACT_AMAX_CLAMP) / torch.full_like(amax, FP8_MAX)
    if scale_fmt == "ue8m0":
        s = round_scale_up_pow2(s)
    s_full = s.repeat_interleave(block_size, dim=-1)[..., :k]
    y = (xf / s_full).to(FP8_DTYPE)
    return y, s


def check_block_scale_shape(s: torch.Tensor, shape: tuple[int, int], block_size: int) -> None:
    """Raise ValueError unless `s` is `[ceil(M / b), ceil(N / b)]` for `shape == (M, N)`."""
    m, n = shape
    expected = (cdiv(m, block_size), cdiv(n, block_size))
    if tuple(s.shape) != expected:
        raise ValueError(f"scale shape {tuple(s.shape)} does not match {expected} for a {m}x{n} tensor")


def expand_block_scales(s: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Broadcast per-tile scales to per-element scales.

    Args:
        s: `[ceil(M / b), ceil(N / b)]` scales.
        shape: `(M, N)`.
        block_size: tile edge b.
    Returns:
        `[M, N]` tensor where entry (i, j) is `s[i // b, j // b]`.
    """
    check_block_scale_shape(s, shape, block_size)
    m, n = shape
    return s.repeat_interleave(block_size, dim=0)[:m].repeat_interleave(block_size, dim=1)[:, :n]


def weight_dequant(
    w: torch.Tensor,
    s: torch.Tensor,
    block_size: int = BLOCK_SIZE,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantise a block-quantised weight: `W = w.float() * s[i // b, j // b]`.

    Args:
        w: `[M, N]` float8_e4m3fn.
        s: `[ceil(M / b), ceil(N / b)]` float32 scales.
        block_size: tile edge b.
        out_dtype: dtype of the result (computed in float32, then rounded once).
    Returns:
        `[M, N]` tensor of `out_dtype`.
    """
    if w.dim() != 2:
        raise ValueError(f"weight_dequant expects a 2-D weight, got shape {tuple(w.shape)}")
    full = expand_block_scales(s.float(), (w.shape[0], w.shape[1]), block_size)
    return (w.float() * full).to(out_dtype)


def weight_quant(w: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight per `block_size` x `block_size` tile (for writing FP8 checkpoints).

    Per tile: `s = max(amax, 1e-12) / 448` (float32), `w_fp8 = fp8(w / s)`, so the largest
    magnitude of each non-zero tile maps to 448 and all-zero tiles stay zero.

    Args:
        w: `[M, N]` floating tensor; M, N need not be multiples of `block_size`.
        block_size: tile edge b.
    Returns:
        w_fp8: `[M, N]` float8_e4m3fn.
        s: `[ceil(M / b), ceil(N / b)]` float32 dequantisation scales.
    """
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    m, n = w.shape
    mb, nb = cdiv(m, block_size), cdiv(n, block_size)
    wf = w.float()
    padded = torch.nn.functional.pad(wf, (0, nb * block_size - n, 0, mb * block_size - m))
    tiles = padded.reshape(mb, block_size, nb, block_size)
    amax = tiles.abs().amax(dim=(1, 3))
    s = amax.clamp(min=WEIGHT_AMAX_CLAMP) / FP8_MAX
    w_fp8 = (wf / expand_block_scales(s, (m, n), block_size)).to(FP8_DTYPE)
    return w_fp8, s


def check_gemm_shapes(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block_size: int
) -> None:
    """Raise ValueError unless the operands of `fp8_gemm` have consistent shapes and FP8 dtypes."""
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm expects {FP8_DTYPE} operands, got {a.dtype} and {b.dtype}")
    if b.dim() != 2 or a.dim() < 1 or a.shape[-1] != b.shape[1]:
        raise ValueError(f"fp8_gemm shape mismatch: a {tuple(a.shape)}, b {tuple(b.shape)} (b is [N, K])")
    n, k = b.shape
    kb = cdiv(k, block_size)
    if tuple(a_s.shape) != (*a.shape[:-1], kb):
        raise ValueError(f"a_s shape {tuple(a_s.shape)} != {(*a.shape[:-1], kb)}")
    if tuple(b_s.shape) != (cdiv(n, block_size), kb):
        raise ValueError(f"b_s shape {tuple(b_s.shape)} != {(cdiv(n, block_size), kb)}")


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Block-scaled FP8 matmul `C = A @ B^T`, accumulated in float32.

    `C[..., n] = sum_kb (a_kb.float() @ b_kb.float().T)[..., n] * a_s[..., kb] * b_s[n // b, kb]`
    where `a_kb`, `b_kb` are the kb-th column blocks (the last one may be partial).

    Args:
        a: `[..., K]` float8_e4m3fn activations.
        a_s: `[..., ceil(K / b)]` float32 activation scales.
        b: `[N, K]` float8_e4m3fn weight.
        b_s: `[ceil(N / b), ceil(K / b)]` float32 weight scales.
        out_dtype: dtype of the result (rounded once from the float32 accumulator).
        block_size: quantisation block b (must match how a and b were quantised).
    Returns:
        `[..., N]` tensor of `out_dtype`.
    """
    check_gemm_shapes(a, a_s, b, b_s, block_size)
    n, k = b.shape
    if a.device.type == "meta":  # a dry run (`specdec.dry_run`): the shapes, checked above, are all there is
        return torch.empty(*a.shape[:-1], n, dtype=out_dtype, device="meta")
    b_s_rows = b_s.float().repeat_interleave(block_size, dim=0)[:n]  # [N, KB]
    acc = torch.zeros(*a.shape[:-1], n, dtype=torch.float32, device=a.device)
    for kb, start in enumerate(range(0, k, block_size)):
        cols = slice(start, min(start + block_size, k))
        part = a[..., cols].float() @ b[:, cols].float().T
        acc += part * a_s[..., kb, None].float() * b_s_rows[:, kb]
    return acc.to(out_dtype)


def check_grouped_shapes(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
                         expert_ids: torch.Tensor, block_size: int) -> None:
    """Raise ValueError unless the operands of `grouped_fp8_gemm` are consistent."""
    if a.dtype != FP8_DTYPE or w.dtype != FP8_DTYPE:
        raise ValueError(f"grouped_fp8_gemm expects {FP8_DTYPE} operands, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 3 or a.shape[1] != w.shape[2]:
        raise ValueError(f"grouped_fp8_gemm shape mismatch: a {tuple(a.shape)} (is [S, K]), "
                         f"w {tuple(w.shape)} (is [E, N, K])")
    e, n, k = w.shape
    kb = cdiv(k, block_size)
    if tuple(a_s.shape) != (a.shape[0], kb):
        raise ValueError(f"a_s shape {tuple(a_s.shape)} != {(a.shape[0], kb)}")
    if tuple(w_s.shape) != (e, cdiv(n, block_size), kb):
        raise ValueError(f"w_s shape {tuple(w_s.shape)} != {(e, cdiv(n, block_size), kb)}")
    if tuple(expert_ids.shape) != (a.shape[0],) or expert_ids.dtype.is_floating_point:
        raise ValueError(f"expert_ids must be [{a.shape[0]}] integers, got {expert_ids.dtype} {tuple(expert_ids.shape)}")


def grouped_fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    expert_ids: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Block-scaled FP8 matmuls of many experts at once: `C[s] = A[s] @ W[expert_ids[s]]^T`.

    Each row s (a routed slot: one token's visit to one expert) is multiplied by the weight of its
    expert, with `fp8_gemm`'s maths; a row whose id is outside `[0, E)` (e.g. -1: an expert held
    by another rank) gives zeros. Experts may get any number of rows, none included.

    Args:
        a: `[S, K]` float8_e4m3fn activations; a_s: `[S, ceil(K / b)]` float32 scales.
        w: `[E, N, K]` float8_e4m3fn expert weights; w_s: `[E, ceil(N / b), ceil(K / b)]` float32.
        expert_ids: `[S]` integer expert of each row.
        out_dtype: dtype of the result; block_size: quantisation block b.
    Returns:
        `[S, N]` tensor of `out_dtype`.
    """
    check_grouped_shapes(a, a_s, w, w_s, expert_ids, block_size)
    if a.device.type == "meta":  # a dry run (`specdec.dry_run`): shapes only, rows per expert are unknown
        return torch.empty(a.shape[0], w.shape[1], dtype=out_dtype, device="meta")
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.float32, device=a.device)
    for e in range(w.shape[0]):
        rows = (expert_ids == e).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = fp8_gemm(a[rows], a_s[rows], w[e], w_s[e], torch.float32, block_size)
    return out.to(out_dtype)
