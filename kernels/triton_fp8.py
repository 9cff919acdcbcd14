"""Triton kernels for FP8 block quantisation (same semantics as `kernels.reference`).

Kernels: `act_quant` (1 x b activation groups), `weight_dequant` (b x b weight tiles) and
`fp8_gemm` (block-scaled `A @ B^T`, float32 accumulation). All of them mask partial blocks, so
no dimension has to be a multiple of the block size b (b itself must be a power of two).

Two execution modes, fixed when this module is imported (Triton decides at `@triton.jit` time):

* CUDA (compiled): native `tl.float8e4nv` loads, `.to(tl.float8e4nv)` stores (round to nearest
  even, saturating, as on sm_89+) and fp8 `tl.dot`. Needs an FP8-capable GPU (sm_89+).
* Interpreter (`TRITON_INTERPRET=1` set before import; runs CPU tensors through numpy).
  Triton 3.9's interpreter loads fp8 and runs fp8 `tl.dot` correctly, but its float32 -> fp8
  and float32 -> bf16/fp16 casts are wrong (the mantissa round-up never carries into the exponent
  and ties are not rounded to even; fp32 -> bf16 truncates). Therefore, in this mode only,
  (1) fp8 values are encoded by `_e4m3fn_bits` with integer ops and stored through a bitcast, and
  (2) kernels write float32 and the host wrapper casts to a narrower `out_dtype` with torch.

Scale maths uses `tl.div_rn` (IEEE division; Triton's `/` on CUDA is approximate) and exact
bit tricks, so quantised bits and scales match the torch reference exactly in both modes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import reference as ref


@triton.jit
def _e4m3fn_bits(x):
    """Encode a float32 tensor as float8_e4m3fn bit patterns (uint8), like torch's cast.

    Round to nearest even; magnitudes past 448 (inf included) saturate to 448; NaN -> 0x7F.
    """
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Normal range (|x| >= 2**-6): round the 23-bit mantissa to 3 bits (ties to even); a carry
    # out of the mantissa bumps the exponent, then rebias the exponent from 127 to 7.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal range: in 2**14 + |x| one float32 ulp is 2**-9, the fp8 subnormal step, so the
    # hardware add rounds to nearest even and the low mantissa bits are the code (8 -> 2**-6).
    subnormal = (tl.abs(x) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    code = tl.where(mag < 0x3C800000, subnormal, normal)
    code = tl.minimum(code, 0x7E)
    code = tl.where(mag > 0x7F800000, 0x7F, code)
    return (sign | code).to(tl.uint8)


@triton.jit
def _to_fp8(x, SOFT_FP8: tl.constexpr):
    """Cast float32 `x` to float8e4nv: natively, or via `_e4m3fn_bits` when SOFT_FP8."""
    if SOFT_FP8:
        y = _e4m3fn_bits(x).to(tl.float8e4nv, bitcast=True)
    else:
        y = x.to(tl.float8e4nv)
    return y


@triton.jit
def _round_up_pow2(s):
    """Round positive normal float32 values up to a power of two, exactly (bit manipulation)."""
    bits = s.to(tl.int32, bitcast=True)
    has_fraction = ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return ((bits & 0x7F800000) + (has_fraction << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, KB,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr,
                      UE8M0: tl.constexpr, SOFT_FP8: tl.constexpr):
    """Quantise a `[ROWS, BLOCK]` tile of row-major `x[M, K]`: one scale per row group.

    Grid: `(cdiv(M, ROWS), KB)`; program (i, j) owns rows `i*ROWS...` and group j.
    Writes `y[M, K]` (fp8) and `s[M, KB]` (float32).
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    cols = group * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.div_rn(tl.maximum(amax, 1e-4), tl.full(amax.shape, 448.0, tl.float32))
    if UE8M0:
        s = _round_up_pow2(s)
    y = tl.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    tl.store(y_ptr + offs, _to_fp8(y, SOFT_FP8), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * KB + group, s, mask=row_ok)


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, out_ptr, M, N, NB, BLOCK: tl.constexpr):
    """Dequantise one `[BLOCK, BLOCK]` tile: `out = w.float() * s[tile]`.

    Grid: `(cdiv(M, BLOCK), cdiv(N, BLOCK))`. `w[M, N]` fp8, `s[MB, NB]` float32, `out[M, N]`.
    """
    tile_m = tl.program_id(0)
    tile_n = tl.program_id(1)
    rows = tile_m * BLOCK + tl.arange(0, BLOCK)
    cols = tile_n * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + tile_m * NB + tile_n)
    tl.store(out_ptr + offs, (w * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_dot_over_k(a_ptrs, b_ptrs, a_s_ptrs, b_s_ptrs, row_ok, col_ok, ks, K, KB,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SUM_DOT: tl.constexpr = False):
    """The float32 `[BLOCK_M, BLOCK_N]` sum over K of block-scaled FP8 products: each BLOCK_K step is
    one fp8 `tl.dot` of an `a` tile (`a_ptrs`, `[BLOCK_M, BLOCK_K]` pointers at k = 0) and a `b` tile
    (`b_ptrs`, `[BLOCK_K, BLOCK_N]`), times the rows' scales (`a_s_ptrs + kb`) and the columns'
    (`b_s_ptrs + kb`); rows, columns and the last partial K block are masked. SUM_DOT (interpreted
    batch-invariant calls): the products summed by `tl.sum` in one order for every element, not
    numpy's matmul (`kernels.triton_invariant`)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k_ok = ks < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs + kb, mask=row_ok, other=0.0)
        b_s = tl.load(b_s_ptrs + kb, mask=col_ok, other=0.0)
        if SUM_DOT:
            part = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        else:
            part = tl.dot(a, b)
        acc += part * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, KB,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SUM_DOT: tl.constexpr = False):
    """One `[BLOCK_M, BLOCK_N]` tile of `C = A @ B^T` with per-block scales.

    `a[M, K]`, `b[N, K]` fp8 row-major; `a_s[M, KB]`, `b_s[cdiv(N, BLOCK_K), KB]` float32;
    `c[M, N]`. BLOCK_K is the quantisation block, so each K step multiplies one fp8 `tl.dot`
    (a fresh 128-deep partial sum) by its scales before adding it to the float32 accumulator.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = _scaled_dot_over_k(a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :],
                             b_ptr + cols[None, :].to(tl.int64) * K + ks[:, None],
                             a_s_ptr + rows.to(tl.int64) * KB, b_s_ptr + (cols // BLOCK_K) * KB,
                             row_ok, col_ok, ks, K, KB, BLOCK_M, BLOCK_N, BLOCK_K, SUM_DOT)
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_fp8_gemm_kernel(a_ptr, w_ptr, c_ptr, a_s_ptr, w_s_ptr, rows_ptr, block_expert_ptr, N, K, KB, NB,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One `[BLOCK_M, BLOCK_N]` tile of the grouped GEMM: BLOCK_M rows of one expert.

    `rows[P]` int32: row of `a`/`c` at each padded position (-1: padding), grouped by expert with
    every expert's group padded to a multiple of BLOCK_M (`align_by_expert`); `block_expert[P /
    BLOCK_M]` int32: the expert of each BLOCK_M tile (-1: none). `a[S, K]` fp8, `a_s[S, KB]`,
    `w[E, N, K]` fp8, `w_s[E, NB, KB]` float32; `c[S, N]`: only the tile's real rows are written.
    """
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert >= 0:
        rows = tl.load(rows_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows >= 0
        rows = tl.where(row_ok, rows, 0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        acc = _scaled_dot_over_k(a_ptr + rows[:, None] * K + ks[None, :],
                                 w_ptr + expert.to(tl.int64) * N * K + cols[None, :].to(tl.int64) * K + ks[:, None],
                                 a_s_ptr + rows * KB, w_s_ptr + expert.to(tl.int64) * NB * KB + (cols // BLOCK_K) * KB,
                                 row_ok, col_ok, ks, K, KB, BLOCK_M, BLOCK_N, BLOCK_K)
        c_ptrs = c_ptr + rows[:, None] * N + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


INTERPRETED: bool = isinstance(_act_quant_kernel, InterpretedFunction)
"""True when the kernels above were built for the interpreter (TRITON_INTERPRET=1 at import)."""


def _check_launchable(t: torch.Tensor, block_size: int) -> None:
    """Raise ValueError if these kernels cannot run on `t` with this block size."""
    if not t.is_cuda and not INTERPRETED:
        raise ValueError(
            f"Triton kernels got a {t.device.type} tensor; set TRITON_INTERPRET=1 before importing "
            "kernels.triton_fp8 to run them on CPU"
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"Triton kernels need a power-of-two block_size >= 16, got {block_size}")


def _storage_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """dtype the kernel writes: `out_dtype`, or float32 in the interpreter (see module doc)."""
    return torch.float32 if INTERPRETED else out_dtype


def act_quant(
    x: torch.Tensor, block_size: int = ref.BLOCK_SIZE, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `kernels.reference.act_quant` (identical bits and scales).

    Args:
        x: `[..., K]` float32/bf16/fp16 tensor.
        block_size: group length along the last dim (power of two).
        scale_fmt: None or "ue8m0".
    Returns:
        y: `[..., K]` float8_e4m3fn; s: `[..., ceil(K / block_size)]` float32.
    """
    ref.check_scale_fmt(scale_fmt)
    _check_launchable(x, block_size)
    k = x.shape[-1]
    kb = ref.cdiv(k, block_size)
    y = torch.empty(x.shape, dtype=ref.FP8_DTYPE, device=x.device)
    s = torch.empty(*x.shape[:-1], kb, dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, s
    m = x.numel() // k
    rows = 64 if INTERPRETED else 8
    _act_quant_kernel[(ref.cdiv(m, rows), kb)](
        x.contiguous(), y, s, m, k, kb,
        ROWS=rows, BLOCK=block_size, UE8M0=scale_fmt == "ue8m0", SOFT_FP8=INTERPRETED,
    )
    return y, s


def weight_dequant(
    w: torch.Tensor,
    s: torch.Tensor,
    block_size: int = ref.BLOCK_SIZE,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton version of `kernels.reference.weight_dequant` (identical values).

    Args:
        w: `[M, N]` float8_e4m3fn; s: `[ceil(M / b), ceil(N / b)]` float32.
        block_size: tile edge b (power of two).
        out_dtype: result dtype.
    Returns:
        `[M, N]` tensor of `out_dtype`.
    """
    if w.dim() != 2 or w.dtype != ref.FP8_DTYPE:
        raise ValueError(f"weight_dequant expects a 2-D {ref.FP8_DTYPE} weight, got {w.dtype} {tuple(w.shape)}")
    _check_launchable(w, block_size)
    m, n = w.shape
    ref.check_block_scale_shape(s, (m, n), block_size)
    out = torch.empty(m, n, dtype=_storage_dtype(out_dtype), device=w.device)
    if out.numel() == 0:
        return out.to(out_dtype)
    nb = ref.cdiv(n, block_size)
    _weight_dequant_kernel[(ref.cdiv(m, block_size), nb)](
        w.contiguous(), s.contiguous().float(), out, m, n, nb, BLOCK=block_size
    )
    return out.to(out_dtype)


def _gemm_config(m: int, batch_invariant: bool = False) -> dict[str, int]:
    """Fixed launch configuration for `_fp8_gemm_kernel` given the number of rows M
    (`batch_invariant`: one configuration whatever M)."""
    if batch_invariant:
        return {"BLOCK_M": 16, "BLOCK_N": 64} if INTERPRETED else {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4,
                                                                    "num_stages": 4}
    if INTERPRETED:
        return {"BLOCK_M": 64, "BLOCK_N": 128}
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4 if block_m * block_n <= 4096 else 8,
            "num_stages": 4}


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block_size: int = ref.BLOCK_SIZE,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """Triton version of `kernels.reference.fp8_gemm` (same maths, float32 accumulation).

    Args:
        a: `[..., K]` fp8; a_s: `[..., ceil(K / b)]` float32.
        b: `[N, K]` fp8; b_s: `[ceil(N / b), ceil(K / b)]` float32.
        out_dtype: result dtype.
        block_size: quantisation block b (power of two).
        batch_invariant: one tile configuration whatever the number of rows (and interpreted dots
            summed in one order), so a row's result does not depend on the rows beside it.
    Returns:
        `[..., N]` tensor of `out_dtype`.
    """
    ref.check_gemm_shapes(a, a_s, b, b_s, block_size)
    _check_launchable(a, block_size)
    n, k = b.shape
    kb = ref.cdiv(k, block_size)
    m = math.prod(a.shape[:-1])
    c = torch.empty(m, n, dtype=_storage_dtype(out_dtype), device=a.device)
    if c.numel() > 0:
        cfg = _gemm_config(m, batch_invariant)
        grid = (ref.cdiv(m, cfg["BLOCK_M"]), ref.cdiv(n, cfg["BLOCK_N"]))
        _fp8_gemm_kernel[grid](
            a.reshape(m, k).contiguous(), b.contiguous(), c,
            a_s.reshape(m, kb).contiguous().float(), b_s.contiguous().float(),
            m, n, k, kb, BLOCK_K=block_size, SUM_DOT=batch_invariant and INTERPRETED, **cfg,
        )
    return c.reshape(*a.shape[:-1], n).to(out_dtype)


def align_by_expert(expert_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group rows by expert for `_grouped_fp8_gemm_kernel`, on the device (no host read).

    Rows are stably sorted by expert id, each expert's group padded to a multiple of `block_m`;
    rows whose id is outside `[0, n_experts)` are left out. The padded length P has a bound known
    without reading the ids (every expert wastes < block_m slots), so shapes never depend on the
    routing. Returns (rows `[P]` int32, -1 at padding; block_expert `[P / block_m]` int32, -1 for
    tiles past the last expert's group).
    """
    s = expert_ids.shape[0]
    device = expert_ids.device
    padded_len = ref.cdiv(s + n_experts * (block_m - 1), block_m) * block_m
    ids = expert_ids.long()
    valid = (ids >= 0) & (ids < n_experts)
    key = torch.where(valid, ids, n_experts)  # rows of other ranks' experts sort last and are dropped
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:n_experts]  # bincount would sync on CUDA
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order].clamp(max=n_experts - 1)
    rank = torch.arange(s, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_key]
    dest = torch.where(key[order] < n_experts, padded_end[sorted_key] - padded[sorted_key] + rank, padded_len)
    rows = torch.full((padded_len + 1,), -1, dtype=torch.int32, device=device)
    rows.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, padded_len, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, starts, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return rows[:padded_len], block_expert


def _grouped_config(rows: int, n_experts: int) -> dict[str, int]:
    """Launch configuration of `_grouped_fp8_gemm_kernel` from the rows per expert on average."""
    per_expert = rows / max(n_experts, 1)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    if INTERPRETED:
        return {"BLOCK_M": block_m, "BLOCK_N": 64}
    return {"BLOCK_M": block_m, "BLOCK_N": 64 if block_m <= 32 else 128, "num_warps": 4, "num_stages": 4}


def grouped_fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    expert_ids: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    block_size: int = ref.BLOCK_SIZE,
) -> torch.Tensor:
    """Triton version of `kernels.reference.grouped_fp8_gemm`: every expert's rows in one launch,
    grouped on the device (`align_by_expert`), so a MoE layer's routed GEMM costs one kernel
    launch instead of one per expert, and no host read of the routing.

    Args:
        a: `[S, K]` fp8; a_s: `[S, ceil(K / b)]` float32.
        w: `[E, N, K]` fp8; w_s: `[E, ceil(N / b), ceil(K / b)]` float32.
        expert_ids: `[S]` expert of each row (outside `[0, E)`: zeros).
        out_dtype: result dtype; block_size: quantisation block b (power of two).
    Returns:
        `[S, N]` tensor of `out_dtype`.
    """
    ref.check_grouped_shapes(a, a_s, w, w_s, expert_ids, block_size)
    _check_launchable(a, block_size)
    n_experts, n, k = w.shape
    kb = ref.cdiv(k, block_size)
    c = torch.zeros(a.shape[0], n, dtype=_storage_dtype(out_dtype), device=a.device)
    if c.numel() == 0 or n_experts == 0:
        return c.to(out_dtype)
    cfg = _grouped_config(a.shape[0], n_experts)
    rows, block_expert = align_by_expert(expert_ids, n_experts, cfg["BLOCK_M"])
    grid = (block_expert.shape[0], ref.cdiv(n, cfg["BLOCK_N"]))
    _grouped_fp8_gemm_kernel[grid](
        a.contiguous(), w.contiguous(), c, a_s.contiguous().float(), w_s.contiguous().float(), rows, block_expert,
        n, k, kb, ref.cdiv(n, block_size), BLOCK_K=block_size, **cfg,
    )
    return c.to(out_dtype)
