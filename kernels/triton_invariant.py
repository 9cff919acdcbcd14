"""Batch-invariant Triton kernels: a row's result is bitwise the same however many rows share the call.

The batch-invariant mode (`model.prepare.prepare_batch_invariant`) runs the verifier's matmuls,
norms and activations through these, so a token's logits do not depend on whether it is decoded
alone or verified among N drafted tokens, and greedy MTP equals plain greedy decoding in bfloat16.

Why library kernels are not batch-invariant: a GEMM library picks its algorithm from the shape
(a GEMV for one row, a blocked GEMM for many, split-K when rows are few and K long), and each adds
a row's products in another order, so one row's bits change with the number of rows beside it.

What makes these invariant, by construction:
- one tile shape per kernel, whatever the number of rows (`_MATMUL_TILES`);
- the reduction over K runs tile after tile inside one program: no split-K, no atomics;
- a row's products never meet another row's; row-wise kernels (norm, gate scores, SwiGLU) give each
  row one program of a width fixed by the row length;
- attention (`triton_attention.mla_attention(batch_invariant=True)`) gives each query one program
  over the slots it sees compacted in slot order: a draft-tree node meets the prefix and then its
  ancestors, exactly plain decoding's sequence at that position, so chains and trees both verify
  bit for bit; FP8 weights run `triton_fp8.fp8_gemm` with one tile configuration.

Tile dots. Compiled, a tile's product is `tl.dot` (the GPU's MMA: for a fixed tile shape each output
element is summed the same way whichever row it is in; `bench/gpu_check.sh` checks it). Under
TRITON_INTERPRET=1, `tl.dot` is numpy's matmul, i.e. whichever BLAS numpy links, whose order per row
is that library's affair; interpreted tiles therefore form the products elementwise (exact in float32
for bfloat16 inputs) and sum them with `tl.sum` over one axis, numpy's own reduction, which adds
every output element's terms in the same order. The interpreter also writes float32 and the host
rounds to the output dtype (its float32 → bfloat16 conversion is unreliable, see `kernels.triton_fp8`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import triton_attention, triton_fp8

_MATMUL_TILES = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
"""The one tile shape of compiled matmuls (never chosen from M: that would change a row's sums)."""
_INTERPRETED_TILES = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}
"""Interpreted matmul tiles (larger K steps: the interpreter's cost is per operation)."""


@triton.jit
def _tile_dot(a, b, INTERP: tl.constexpr):
    """`a [BM, BK] @ b [BK, BN]` in float32: MMA compiled, elementwise products summed over K by
    `tl.sum` interpreted (module docstring)."""
    if INTERP:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K,
                   sx_g, sx_m, sx_k, sw_g, sw_k, sw_n, so_g, so_m, so_n,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """One `[BLOCK_M, BLOCK_N]` tile of `out[g] = x[g] @ w[g]` (x `[G, M, K]`, w `[G, K, N]`, any
    strides), its K tiles summed in order in float32. Grid: `(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), G)`."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(2).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + g * sx_g + rows[:, None].to(tl.int64) * sx_m
    w_cols = w_ptr + g * sw_g + cols[None, :].to(tl.int64) * sw_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_rows + k[None, :] * sx_k, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(w_cols + k[:, None] * sw_k, mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += _tile_dot(a, b, INTERP)
    out = out_ptr + g * so_g + rows[:, None].to(tl.int64) * so_m + cols[None, :] * so_n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, sx, so, eps, BLOCK_D: tl.constexpr):
    """Row r of `out = x * rsqrt(mean(x²) + eps) * w`, in float32 (one program per row)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + r * sx + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)) * w
    tl.store(out_ptr + r * so + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gate_scores_kernel(x_ptr, out_ptr, E, sx, so, SOFTMAX: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row r of the router's scores from its logits: softmax over the E experts, or sigmoid."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    ok = cols < E
    x = tl.load(x_ptr + r * sx + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        e = tl.exp(x - tl.max(x, axis=0))
        y = e / tl.sum(e, axis=0)
    else:
        y = 1.0 / (1.0 + tl.exp(-x))
    tl.store(out_ptr + r * so + cols, y, mask=ok)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, I, sg, su, so, BLOCK_I: tl.constexpr):
    """Row r of `silu(gate) * up` in float32, rounded once (one program per row)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_I)
    ok = cols < I
    g = tl.load(gate_ptr + r * sg + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + r * su + cols, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + r * so + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


INTERPRETED: bool = isinstance(_matmul_kernel, InterpretedFunction)
"""True when the kernels above were built for the interpreter (TRITON_INTERPRET=1 at import)."""


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not INTERPRETED:
        raise ValueError(f"batch-invariant kernels got a {t.device.type} tensor; they run on CUDA, or on the "
                         "CPU with TRITON_INTERPRET=1 set before importing kernels.triton_invariant")


def _out(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer a kernel writes: `dtype`, float32 in the interpreter (rounded by the host after)."""
    return torch.empty(shape, dtype=torch.float32 if INTERPRETED else dtype, device=device)


def bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`torch.bmm(x, w)` with a fixed summation order per row: x `[G, M, K]`, w `[G, K, N]` (any
    strides, same float dtype) → `[G, M, N]` contiguous in x's dtype, accumulated in float32."""
    _check_device(x)
    if x.dim() != 3 or w.dim() != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[1]:
        raise ValueError(f"bmm shapes: x {tuple(x.shape)} is [G, M, K], w {tuple(w.shape)} must be [G, K, N]")
    groups, m, k = x.shape
    n = w.shape[2]
    out = _out((groups, m, n), x.dtype, x.device)
    tiles = _INTERPRETED_TILES if INTERPRETED else _MATMUL_TILES
    if out.numel():
        grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]), groups)
        _matmul_kernel[grid](x, w, out, m, n, k, *x.stride(), *w.stride(), *out.stride(),
                             INTERP=INTERPRETED, **tiles)
    return out.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weightᵀ` (x `[..., K]`, weight `[N, K]`) → `[..., N]` in x's dtype, row-invariant (`bmm`)."""
    rows = x.reshape(1, -1, x.shape[-1])
    return bmm(rows, weight.t().unsqueeze(0)).view(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """`x @ Wᵀ` for a 128-block FP8 weight (`kernels.fp8_linear`'s maths): the activations quantised
    per row (`triton_fp8.act_quant`), then `triton_fp8.fp8_gemm` with one tile configuration whatever
    the rows → `[..., N]` in x's dtype."""
    q, s = triton_fp8.act_quant(x)
    return triton_fp8.fp8_gemm(q, s, weight, scale_inv, out_dtype=x.dtype, batch_invariant=True)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x `[..., D]` as `[R, D]` rows with a unit stride along D (a view when possible)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, one program per row → x's shape and dtype."""
    _check_device(x)
    rows = _rows(x)
    out = _out(rows.shape, x.dtype, x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, rows.shape[1], rows.stride(0),
                                           out.stride(0), eps, BLOCK_D=triton.next_power_of_2(rows.shape[1]))
    return out.to(x.dtype).view(x.shape)


def gate_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """The router's float32 scores `[N, E]` from its logits `[N, E]`: "softmax" over experts or "sigmoid"."""
    _check_device(logits)
    rows = _rows(logits.float())
    out = torch.empty(rows.shape, dtype=torch.float32, device=logits.device)
    if rows.shape[0]:
        _gate_scores_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), out.stride(0),
                                              SOFTMAX=score_func == "softmax",
                                              BLOCK_E=triton.next_power_of_2(rows.shape[1]))
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` (same shapes `[..., I]`), computed in float32 and rounded once → gate's dtype."""
    _check_device(gate)
    g, u = _rows(gate), _rows(up)
    out = _out(g.shape, gate.dtype, gate.device)
    if g.shape[0]:
        _silu_mul_kernel[(g.shape[0],)](g, u, out, g.shape[1], g.stride(0), u.stride(0), out.stride(0),
                                        BLOCK_I=triton.next_power_of_2(g.shape[1]))
    return out.to(gate.dtype).view(gate.shape)


def mla_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                  mask: torch.Tensor, softmax_scale: float, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.triton_attention.mla_attention` with `batch_invariant`: one query per program over the
    slots it sees, compacted in slot order (fixed tiles, no split); shapes as there."""
    return triton_attention.mla_attention(q_latent, q_pe, kv, pe, mask, softmax_scale, block_table=block_table,
                                          batch_invariant=True)
