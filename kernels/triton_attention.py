"""Triton kernel for masked latent attention (the absorbed MLA path); same maths as
`kernels.attention.mla_attention_reference`.

Design. All H heads of all T queries of a batch row share one latent cache row `kv[b]` and one
RoPE-key row `pe[b]` (MLA is multi-query attention in latent space), so the kernel flattens
(query, head) into M = T * H "query rows" (row m is query `m // H`, head `m % H`) and gives
each program a block of BLOCK_M of them. A program streams the slots of `kv[b]` / `pe[b]` in
BLOCK_S blocks and, per block, computes

    logits = (q_latent @ kv^T + q_pe @ pe^T) * scale      [BLOCK_M, BLOCK_S]   (tl.dot, fp32 acc)
    acc    = acc * alpha + softmax_numerator @ kv          [BLOCK_M, C]          (tl.dot, fp32 acc)

with the online (flash) softmax in float32, base 2. Every cache block read is thus reused by
BLOCK_M query rows: all heads of a decode token, or several tokens of a prefill chunk / draft
tree. Before the main loop a program scans its rows' mask and narrows the slot range to
[first visible slot, last visible slot], so padding beyond a short row's length, the future
half of a causal mask and the unused tail of a tree row cost no cache reads.

Flash-decoding split. When B * cdiv(M, BLOCK_M) programs cannot fill the GPU (e.g. decode with
few local heads), the slot axis is cut into `num_splits` contiguous ranges, one program each;
they write unnormalised float32 partials (accumulator, running max, running sum) and a second
kernel merges them. With one split the main kernel normalises and writes the output itself.

Grid: `(cdiv(M, BLOCK_M), num_splits, B)`; the merge kernel runs one program per `(b, m)`.

Masking. A query row that sees no slot keeps acc = 0 and sum = 0 and its output is written as
0 (not 0/0 = NaN), matching the reference; rows past M in the last block are never stored.

Strides. q_latent, q_pe, kv, pe and mask are read through their strides (no copies), so
`kv_cache[:, :kv_len]` slices, permuted query views and broadcast (stride-0) masks cost nothing.

Paged caches. With a block table, kv / pe are one layer's block pools `[n_blocks, block_size, ·]`
(`specdec.paged_cache`) and each cache tile's rows are found through the table (one extra load of
BLOCK_S block ids per tile), so a step reads the blocks where they lie instead of gathering every
row's slots into a dense copy first. An FP8 latent pool (uint8: per token C e4m3fn codes and a
float32 scale, `kernels.fp8_cache`) is decoded tile by tile as it is read, to the queries' dtype,
with the same float32 code × scale as `fp8_cache.decode`, instead of decoding every row first.

Precision. float32 inputs use IEEE fp32 dots (no TF32). For bf16/fp16 inputs the dots take the
input dtype with float32 accumulation, and the softmax numerators are rounded to kv's dtype
before the second dot (as the reference does). Under TRITON_INTERPRET=1 (fixed when this
module is imported) the kernels write float32 and the host casts to the output dtype with
torch, because the interpreter's float32 -> bf16/fp16 conversions are unreliable (see
`kernels.triton_fp8`), and its dots upcast bf16/fp16 operands to float32 first (exact), because
its bf16/fp16 `tl.dot` returns garbage in Triton 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .fp8_cache import SCALE_BYTES

LOG2E = 1.4426950408889634
"""log2(e): logits are scaled by `softmax_scale * LOG2E` so the kernel can use exp2."""
MIN_BLOCKS_PER_SPLIT = 4
"""A flash-decoding split covers at least this many BLOCK_S blocks (amortises the merge)."""


@triton.jit
def _query_rows(ptr, b, rows, H, M, cols, n_cols, stride_b, stride_t, stride_h, stride_c):
    """Load query rows `rows` (flattened `t * H + h`) of batch row b as a `[BLOCK_M, BLOCK_COLS]`
    tile of the input dtype; rows >= M and cols >= n_cols read as 0."""
    t = rows // H
    h = rows % H
    offs = b.to(tl.int64) * stride_b + t[:, None] * stride_t + h[:, None] * stride_h + cols[None, :] * stride_c
    return tl.load(ptr + offs, mask=(rows[:, None] < M) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _visible(mask_ptr, b, rows, H, M, slots, hi, stride_b, stride_t, stride_s):
    """`[BLOCK_M, BLOCK_S]` bool: query row m may attend slot s (and m < M, s < hi)."""
    t = rows // H
    ok = (rows[:, None] < M) & (slots[None, :] < hi)
    offs = b.to(tl.int64) * stride_b + t[:, None] * stride_t + slots[None, :] * stride_s
    return tl.load(mask_ptr + offs, mask=ok, other=0) != 0


@triton.jit
def _visible_range(mask_ptr, b, rows, H, M, s_begin, s_end, stride_b, stride_t, stride_s,
                   BLOCK_S: tl.constexpr):
    """Smallest `[lo, hi)` inside `[s_begin, s_end)` holding every slot any of `rows` can see.

    Returns `lo >= hi` when the rows see nothing in the range.
    """
    lo = s_end
    hi = s_begin
    for start in range(s_begin, s_end, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        vis = _visible(mask_ptr, b, rows, H, M, slots, s_end, stride_b, stride_t, stride_s)
        seen = tl.max(vis.to(tl.int32), axis=0) > 0
        lo = tl.minimum(lo, tl.min(tl.where(seen, slots, s_end), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(seen, slots + 1, s_begin), axis=0))
    return lo, hi


@triton.jit
def _slot_places(b, slots, ok, table_ptr, stride_tb, page, PAGED: tl.constexpr):
    """Where slots `slots` of batch row b live, as (row or block `[BLOCK_S]` int64, index in it):
    dense (not PAGED), row b at slot s; PAGED, block `table[b, s // page]` at `s % page`. Computed
    once per tile and shared by the kv and pe caches (`_cache_rows`); slots not `ok` point at block 0."""
    if PAGED:
        block = tl.load(table_ptr + b.to(tl.int64) * stride_tb + slots // page, mask=ok, other=0)
        return block.to(tl.int64), slots % page
    return tl.zeros(slots.shape, tl.int64) + b.to(tl.int64), slots


@triton.jit
def _cache_rows(where, index, stride_b, stride_s):
    """Element offsets `[BLOCK_S]` of the slots at (`where`, `index`) (`_slot_places`) in a cache
    whose rows (blocks when paged) are `stride_b` apart and slots `stride_s`."""
    return where * stride_b + index * stride_s


@triton.jit
def _cache_block(ptr, rows, ok, cols, n_cols, stride_c):
    """Load `[BLOCK_S, BLOCK_COLS]` cache entries at element offsets `rows` (`_cache_rows`); rows not
    `ok` and cols >= n_cols read 0."""
    offs = rows[:, None] + cols[None, :] * stride_c
    return tl.load(ptr + offs, mask=ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _fp8_latent_block(ptr, rows, ok, cols, n_cols, stride_c):
    """Decode `[BLOCK_S, BLOCK_COLS]` latents of an FP8 latent pool (`kernels.fp8_cache`: per token
    C e4m3fn codes then its float32 scale, as uint8 bytes) at row offsets `rows`: code × scale in
    float32, exactly as `fp8_cache.decode`. The e4m3fn bits are decoded arithmetically (exact in
    float32, powers of two from their bits; the interpreter has no native float8), the scale assembled from its 4 little-endian
    bytes. Rows not `ok` and cols >= n_cols read 0."""
    bits = tl.load(ptr + rows[:, None] + cols[None, :] * stride_c,
                   mask=ok[:, None] & (cols[None, :] < n_cols), other=0).to(tl.int32)
    exponent = (bits >> 3) & 15
    mantissa = (bits & 7).to(tl.float32)
    # 2^(e-10) built from its float32 bits (exact: the GPU's exp2 is an approximation, and decoded
    # latents then differed from `fp8_cache.decode`'s on an H200)
    power = ((exponent + 117) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa * 0.001953125,  # subnormal: m · 2^-9
                         (mantissa + 8.0) * power)  # (1 + m/8) · 2^(e-7)
    value = tl.where((bits & 128) != 0, -magnitude, magnitude)
    scale_bits = tl.zeros(rows.shape, tl.int32)
    for i in tl.static_range(4):
        byte = tl.load(ptr + rows + (n_cols + i) * stride_c, mask=ok, other=0).to(tl.int32)
        scale_bits = scale_bits | (byte << (8 * i))
    return value * scale_bits.to(tl.float32, bitcast=True)[:, None]


@triton.jit
def _cache_tiles(kv_ptr, pe_ptr, b, slots, ok, cols_c, cols_r, C, R, skv_b, skv_s, skv_c, spe_b, spe_s, spe_r,
                 table_ptr, st_b, page, like, PAGED: tl.constexpr, FP8_KV: tl.constexpr):
    """The kv `[BLOCK_S, BLOCK_C]` and pe `[BLOCK_S, BLOCK_R]` tiles of batch row b at slots `slots`
    (dense rows or paged blocks, `_slot_places`; FP8 latents decoded to `like`'s dtype); slots not
    `ok` read 0."""
    where, index = _slot_places(b, slots, ok, table_ptr, st_b, page, PAGED)
    kv_rows = _cache_rows(where, index, skv_b, skv_s)
    if FP8_KV:
        kv = _fp8_latent_block(kv_ptr, kv_rows, ok, cols_c, C, skv_c).to(like.dtype)
    else:
        kv = _cache_block(kv_ptr, kv_rows, ok, cols_c, C, skv_c)
    pe = _cache_block(pe_ptr, _cache_rows(where, index, spe_b, spe_s), ok, cols_r, R, spe_r)
    return kv, pe


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, SUM_DOT: tl.constexpr = False):
    """`a @ b` with float32 accumulation (IEEE fp32 for fp32 operands, never TF32).

    UPCAST converts bf16/fp16 operands to float32 first (exact); the interpreter needs it
    because its bf16/fp16 `tl.dot` returns garbage in Triton 3.9. SUM_DOT (interpreted
    batch-invariant calls) forms the products elementwise and sums them with `tl.sum`, whose order
    is the same for every output element (see `kernels.triton_invariant`).
    """
    if SUM_DOT:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _online_softmax_step(logits, vis, m_i, l_i, acc, kv, UPCAST: tl.constexpr, SUM_DOT: tl.constexpr):
    """Fold one block into the running (max, sum, accumulator) of the base-2 online softmax.

    logits: `[BLOCK_M, BLOCK_S]` fp32, already multiplied by scale * log2(e); vis: same-shape
    bool; m_i, l_i: `[BLOCK_M]` fp32; acc: `[BLOCK_M, BLOCK_C]` fp32; kv: `[BLOCK_S, BLOCK_C]`
    in the input dtype (the numerators are rounded to it before the dot, as in the reference).
    Rows that have seen nothing keep m = -inf, l = 0 and acc = 0.
    """
    logits = tl.where(vis, logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(logits - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(kv.dtype), kv, UPCAST, SUM_DOT)
    return m_new, l_new, acc


@triton.jit
def _mla_attention_kernel(
    q_ptr, qpe_ptr, kv_ptr, pe_ptr, mask_ptr, out_ptr, ml_ptr,
    H, M, C, R, S, blocks_per_split, num_splits, scale_log2,
    sq_b, sq_t, sq_h, sq_c,
    sqp_b, sqp_t, sqp_h, sqp_r,
    skv_b, skv_s, skv_c,
    spe_b, spe_s, spe_r,
    sm_b, sm_t, sm_s,
    table_ptr, st_b, page,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, PAGED: tl.constexpr, FP8_KV: tl.constexpr,
):
    """Attention of BLOCK_M flattened (query, head) rows of batch row b over one slot range.

    Program (i, k, b) handles rows `i*BLOCK_M ...` and slots `[k, k+1) * blocks_per_split * BLOCK_S`.
    Without SPLIT it writes normalised rows of `out[B, M, C]` (contiguous); with SPLIT it writes
    the unnormalised accumulator to `out[B, M, num_splits, C]` and (max, sum) to
    `ml[B, M, num_splits, 2]` (float32, base-2 max) for `_merge_splits_kernel`.
    UPCAST: do the dots in float32 (see `_dot`). PAGED: kv / pe are block pools read through the
    block table (see `_slot_places`). FP8_KV: kv holds FP8 latents (`_fp8_latent_block`), decoded to
    the queries' dtype as tiles are read.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    b = tl.program_id(2)
    cols_c = tl.arange(0, BLOCK_C)
    cols_r = tl.arange(0, BLOCK_R)
    s_begin = split * blocks_per_split * BLOCK_S
    s_end = tl.minimum(S, s_begin + blocks_per_split * BLOCK_S)
    lo, hi = _visible_range(mask_ptr, b, rows, H, M, s_begin, s_end, sm_b, sm_t, sm_s, BLOCK_S)

    q = _query_rows(q_ptr, b, rows, H, M, cols_c, C, sq_b, sq_t, sq_h, sq_c)
    q_pe = _query_rows(qpe_ptr, b, rows, H, M, cols_r, R, sqp_b, sqp_t, sqp_h, sqp_r)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for start in range(lo, hi, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        ok = slots < hi
        kv, pe = _cache_tiles(kv_ptr, pe_ptr, b, slots, ok, cols_c, cols_r, C, R, skv_b, skv_s, skv_c,
                              spe_b, spe_s, spe_r, table_ptr, st_b, page, q, PAGED, FP8_KV)
        logits = _dot(q, tl.trans(kv), UPCAST) + _dot(q_pe, tl.trans(pe), UPCAST)
        vis = _visible(mask_ptr, b, rows, H, M, slots, hi, sm_b, sm_t, sm_s)
        m_i, l_i, acc = _online_softmax_step(logits * scale_log2, vis, m_i, l_i, acc, kv, UPCAST, False)

    row_ok = rows < M
    out_rows = b.to(tl.int64) * M + rows
    if SPLIT:
        part = out_rows * num_splits + split
        tl.store(out_ptr + part[:, None] * C + cols_c[None, :], acc, mask=row_ok[:, None] & (cols_c[None, :] < C))
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + out_rows[:, None] * C + cols_c[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols_c[None, :] < C))


@triton.jit
def _merge_splits_kernel(part_ptr, ml_ptr, out_ptr, C, num_splits,
                         BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the split partials of one flattened row `r = b * M + m` into `out[r, :C]`.

    `part[R, num_splits, C]`, `ml[R, num_splits, 2]` float32 from `_mla_attention_kernel`.
    Splits that saw nothing have max -inf and weight 0; a row that saw nothing becomes 0.
    """
    r = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    cols = tl.arange(0, BLOCK_C)
    ok = splits < num_splits
    ml = ml_ptr + (r * num_splits + splits) * 2
    m = tl.load(ml, mask=ok, other=float("-inf"))
    l_i = tl.load(ml + 1, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(w * l_i, axis=0)
    part_offs = (r * num_splits + splits)[:, None] * C + cols[None, :]
    part = tl.load(part_ptr + part_offs, mask=ok[:, None] & (cols[None, :] < C), other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + r * C + cols, out.to(out_ptr.dtype.element_ty), mask=cols < C)


@triton.jit
def _compact_attention_kernel(
    q_ptr, qpe_ptr, kv_ptr, pe_ptr, idx_ptr, count_ptr, out_ptr,
    T, H, C, R, W, scale_log2,
    sq_b, sq_t, sq_h, sq_c,
    sqp_b, sqp_t, sqp_h, sqp_r,
    skv_b, skv_s, skv_c,
    spe_b, spe_s, spe_r,
    table_ptr, st_b, page,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, SUM_DOT: tl.constexpr, PAGED: tl.constexpr, FP8_KV: tl.constexpr,
):
    """Batch-invariant attention: heads `[h0, h0 + BLOCK_M)` of query t of batch row b over the slots
    that query sees, compacted in slot order (`idx[b, t, :count[b, t]]`, int32 `[B, T, W]`).

    A query's visible slots are its own business: the cache then its ancestors by depth for a tree
    node, the same sequence plain decoding attends over at that position. So a query's logits and
    sums meet the same values in the same BLOCK_S blocks however many queries share the call, and
    whichever other slots (drafts, siblings, padding) the cache holds. Grid: `(T, cdiv(H, BLOCK_M), B)`;
    writes normalised rows of `out[B, T, H, C]` (contiguous). Flags as `_mla_attention_kernel`'s;
    SUM_DOT: see `_dot`.
    """
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(2).to(tl.int64)
    head_ok = heads < H
    cols_c = tl.arange(0, BLOCK_C)
    cols_r = tl.arange(0, BLOCK_R)
    q_offs = b * sq_b + t * sq_t + heads[:, None] * sq_h + cols_c[None, :] * sq_c
    q = tl.load(q_ptr + q_offs, mask=head_ok[:, None] & (cols_c[None, :] < C), other=0.0)
    qp_offs = b * sqp_b + t * sqp_t + heads[:, None] * sqp_h + cols_r[None, :] * sqp_r
    q_pe = tl.load(qpe_ptr + qp_offs, mask=head_ok[:, None] & (cols_r[None, :] < R), other=0.0)
    query = b * T + t
    count = tl.load(count_ptr + query)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for start in range(0, count, BLOCK_S):
        j = start + tl.arange(0, BLOCK_S)
        ok = j < count
        slots = tl.load(idx_ptr + query * W + j, mask=ok, other=0)
        kv, pe = _cache_tiles(kv_ptr, pe_ptr, b, slots, ok, cols_c, cols_r, C, R, skv_b, skv_s, skv_c,
                              spe_b, spe_s, spe_r, table_ptr, st_b, page, q, PAGED, FP8_KV)
        logits = _dot(q, tl.trans(kv), UPCAST, SUM_DOT) + _dot(q_pe, tl.trans(pe), UPCAST, SUM_DOT)
        vis = head_ok[:, None] & ok[None, :]
        m_i, l_i, acc = _online_softmax_step(logits * scale_log2, vis, m_i, l_i, acc, kv, UPCAST, SUM_DOT)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_rows = query * H + heads
    tl.store(out_ptr + out_rows[:, None] * C + cols_c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None] & (cols_c[None, :] < C))


def _compact_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                       mask: torch.Tensor, softmax_scale: float, block_table: torch.Tensor | None,
                       out: torch.Tensor) -> None:
    """`_compact_attention_kernel` into `out` `[B, T, H, C]` (operands checked by `mla_attention`):
    each query's visible slots listed first, in slot order, by a stable sort on the device."""
    bsz, t, h, c = q_latent.shape
    r = pe.shape[2]
    visible = mask.view(torch.bool).expand(bsz, t, mask.shape[2])
    idx = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    count = visible.sum(-1, dtype=torch.int32).contiguous()
    block_c = triton.next_power_of_2(c)
    block_m = max(16, triton.next_power_of_2(h)) if INTERPRETED else 16
    cfg = {"BLOCK_M": block_m, "BLOCK_S": 32 if INTERPRETED or block_c >= 512 else 64, "BLOCK_C": block_c,
           "BLOCK_R": max(16, triton.next_power_of_2(r))}
    if not INTERPRETED:
        cfg.update(num_warps=4, num_stages=2)
    _compact_attention_kernel[(t, triton.cdiv(h, block_m), bsz)](
        q_latent, q_pe, kv, pe, idx, count, out,
        t, h, c, r, idx.shape[2], softmax_scale * LOG2E,
        *q_latent.stride(), *q_pe.stride(), *kv.stride(), *pe.stride(),
        idx if block_table is None else block_table, 0 if block_table is None else block_table.stride(0),
        1 if block_table is None else kv.shape[1],
        UPCAST=INTERPRETED, SUM_DOT=INTERPRETED, PAGED=block_table is not None, FP8_KV=kv.dtype == torch.uint8, **cfg,
    )


INTERPRETED: bool = isinstance(_mla_attention_kernel, InterpretedFunction)
"""True when the kernels above were built for the interpreter (TRITON_INTERPRET=1 at import)."""


def _check_operands(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                    mask: torch.Tensor, block_table: torch.Tensor | None) -> None:
    """Raise ValueError unless the operands have the shapes, dtypes and device the kernel needs."""
    if q_latent.dim() != 4 or q_pe.dim() != 4 or kv.dim() != 3 or pe.dim() != 3 or mask.dim() != 3:
        raise ValueError("mla_attention expects q_latent/q_pe [B, T, H, *], kv/pe [B, S, *] (paged: "
                         "[blocks, block_size, *]), mask [B, T, S]")
    b, t, h, c = q_latent.shape
    r = pe.shape[2]
    fp8_kv = kv.dtype == torch.uint8
    kv_width = c + SCALE_BYTES if fp8_kv else c  # FP8 latents: C codes, then a float32 scale, as bytes
    if block_table is None:
        s = kv.shape[1]
        expected = {"q_pe": (b, t, h, r), "kv": (b, s, kv_width), "pe": (b, s, r)}
    else:
        s = mask.shape[2]
        n_blocks, page = kv.shape[:2]
        expected = {"q_pe": (b, t, h, r), "kv": (n_blocks, page, kv_width), "pe": (n_blocks, page, r)}
        if block_table.dim() != 2 or block_table.shape[0] < b or block_table.shape[1] * page < s:
            raise ValueError(f"block_table shape {tuple(block_table.shape)} does not cover {b} rows of {s} "
                             f"slots in blocks of {page}")
        if block_table.dtype not in (torch.int32, torch.int64) or block_table.device != kv.device:
            raise ValueError(f"block_table must be int32/int64 on {kv.device}, got {block_table.dtype} on "
                             f"{block_table.device}")
    for name, tensor in (("q_pe", q_pe), ("kv", kv), ("pe", pe)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != {expected[name]}")
    if any(m not in (1, n) for m, n in zip(mask.shape, (b, t, s))):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to {(b, t, s)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    dtypes = {q_latent.dtype, q_pe.dtype, pe.dtype} | (set() if fp8_kv else {kv.dtype})
    if len(dtypes) != 1 or q_latent.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q_latent, q_pe, kv and pe must share one float32/bf16/fp16 dtype (kv may be an "
                         f"FP8 latent pool, uint8), got {dtypes}")
    if len({x.device for x in (q_latent, q_pe, kv, pe, mask)}) != 1:
        raise ValueError("mla_attention operands live on different devices")
    if not q_latent.is_cuda and not INTERPRETED:
        raise ValueError(
            f"Triton kernels got a {q_latent.device.type} tensor; set TRITON_INTERPRET=1 before importing "
            "kernels.triton_attention to run them on CPU"
        )


def _block_config(m: int, c: int, r: int) -> dict[str, int]:
    """Tile sizes and launch options for M flattened query rows and latent / RoPE widths C, R."""
    block_c = triton.next_power_of_2(c)
    block_r = max(16, triton.next_power_of_2(r))
    if INTERPRETED:
        return {"BLOCK_M": 16, "BLOCK_S": 32, "BLOCK_C": block_c, "BLOCK_R": block_r}
    wide = block_c >= 512  # keep the [BLOCK_M, C] accumulator and query tile within registers
    block_m = 16 if m <= 16 else 32 if wide else 64
    return {"BLOCK_M": block_m, "BLOCK_S": 32 if wide else 64, "BLOCK_C": block_c, "BLOCK_R": block_r,
            "num_warps": 4 if block_m == 16 else 8, "num_stages": 2}


def _auto_splits(programs: int, n_blocks: int, device: torch.device) -> int:
    """Number of slot ranges so that about one wave of programs covers the GPU (1 on CPU)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), n_blocks // MIN_BLOCKS_PER_SPLIT))


def _split_layout(n_blocks: int, num_splits: int) -> tuple[int, int]:
    """(blocks per split, splits) covering n_blocks with no empty split and at most num_splits."""
    per_split = triton.cdiv(n_blocks, max(1, min(num_splits, n_blocks)))
    return per_split, triton.cdiv(n_blocks, per_split)


def mla_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
    block_table: torch.Tensor | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """Triton version of `kernels.attention.mla_attention_reference`, over a dense or a paged cache.

    Args:
        q_latent: `[B, T, H, C]` float32/bf16/fp16 (any strides).
        q_pe: `[B, T, H, R]`, same dtype.
        kv: `[B, S, C]`, same dtype (any strides, e.g. a slice of a longer cache), or an FP8 latent
            pool `[B, S, C + 4]` uint8 (`kernels.fp8_cache`), decoded as its tiles are read.
        pe: `[B, S, R]`, same dtype.
        mask: bool, `[B, T, S]` or broadcastable to it; query t of row b sees slot s iff True.
        softmax_scale: multiplier on the logits.
        num_splits: slot ranges processed in parallel and merged (flash decoding); None picks
            one from the GPU's SM count (1 on CPU). Clamped to the number of BLOCK_S blocks.
        block_table: None: kv / pe are dense rows as above. Paged: kv `[n_blocks, block_size, C]` and
            pe `[n_blocks, block_size, R]` are one layer's block pools, `block_table` `[≥B, max_blocks]`
            int32/int64 lists row b's blocks in order (slot s in block `block_table[b, s // block_size]`),
            and S is the mask's last dim; the kernel reads the blocks in place (no gather).
        batch_invariant: a query's output bitwise the same whichever other queries the call holds and
            wherever its visible slots lie: `_compact_attention_kernel` (one query per program, over
            the slots it sees compacted in slot order, fixed tiles, no split), not the main kernel.
    Returns:
        `[B, T, H, C]` contiguous tensor in q_latent's dtype; all-zero for queries whose mask
        row is all False.
    """
    _check_operands(q_latent, q_pe, kv, pe, mask, block_table)
    bsz, t, h, c = q_latent.shape
    s, r = (kv.shape[1] if block_table is None else mask.shape[2]), pe.shape[2]
    mask = mask.expand(bsz, t, s).view(torch.uint8)
    m = t * h
    if q_latent.numel() == 0 or s == 0:
        return torch.zeros(bsz, t, h, c, dtype=q_latent.dtype, device=q_latent.device)
    store_dtype = torch.float32 if INTERPRETED else q_latent.dtype
    out = torch.empty(bsz, t, h, c, dtype=store_dtype, device=q_latent.device)
    if batch_invariant:
        _compact_attention(q_latent, q_pe, kv, pe, mask, softmax_scale, block_table, out)
        return out.to(q_latent.dtype)
    cfg = _block_config(m, c, r)
    m_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    n_blocks = triton.cdiv(s, cfg["BLOCK_S"])
    if num_splits is None:
        num_splits = _auto_splits(bsz * m_blocks, n_blocks, q_latent.device)
    per_split, num_splits = _split_layout(n_blocks, num_splits)
    split = num_splits > 1
    part = torch.empty(bsz, m, num_splits, c, dtype=torch.float32, device=out.device) if split else out
    ml = torch.empty(bsz, m, num_splits, 2, dtype=torch.float32, device=out.device) if split else out
    _mla_attention_kernel[(m_blocks, num_splits, bsz)](
        q_latent, q_pe, kv, pe, mask, part, ml,
        h, m, c, r, s, per_split, num_splits, softmax_scale * LOG2E,
        *q_latent.stride(), *q_pe.stride(), *kv.stride(), *pe.stride(), *mask.stride(),
        mask if block_table is None else block_table, 0 if block_table is None else block_table.stride(0),
        1 if block_table is None else kv.shape[1],
        SPLIT=split, UPCAST=INTERPRETED, PAGED=block_table is not None, FP8_KV=kv.dtype == torch.uint8, **cfg,
    )
    if split:
        _merge_splits_kernel[(bsz * m,)](
            part, ml, out, c, num_splits,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_C=cfg["BLOCK_C"],
        )
    return out.to(q_latent.dtype)
