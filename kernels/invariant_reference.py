"""Batch-invariant ops in plain torch (any device; the CPU's batch-invariant mode): every row is its own call.

A library kernel picks its algorithm, and so the order in which it adds a row's terms, from the
whole call's shape (`kernels.triton_invariant` explains why). Here each row, token or query is
computed by its own call on a fresh copy of its inputs, of a shape that depends on that row alone
(a query attends to exactly the slots it sees, gathered in slot order), so a row's bits cannot
depend on how many rows the call held: the same call on the same bits gives the same bits. This
is slower than one batched call (one call per row), and it is the CPU's proof-by-construction next
to the Triton kernels, which get the same property from fixed tiles.

Same functions and signatures as `kernels.triton_invariant`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8_cache, paged
from . import reference as fp8_reference
from .attention import mla_attention_reference


def _each_row(x: torch.Tensor, fn) -> torch.Tensor:
    """`fn` on every row of x `[..., D]` as its own fresh `[1, D]` tensor, stacked back to `[..., D']`."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return fn(rows).reshape(*x.shape[:-1], -1)
    out = torch.cat([fn(row.clone().unsqueeze(0)) for row in rows])
    return out.view(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weightᵀ`: x `[..., K]`, weight `[N, K]` → `[..., N]`, one row per call."""
    return _each_row(x, lambda row: F.linear(row, weight))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """`x @ Wᵀ` for a 128-block FP8 weight (`kernels.fp8_linear`'s maths: per-row activation scales,
    then the block-scaled GEMM), one row per call → `[..., N]` in x's dtype."""
    return _each_row(x, lambda row: fp8_reference.fp8_gemm(*fp8_reference.act_quant(row), weight, scale_inv,
                                                           out_dtype=x.dtype))


def bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`torch.bmm(x, w)`: x `[G, M, K]`, w `[G, K, N]` → `[G, M, N]`, one row m per call."""
    if x.shape[1] == 0:
        return torch.bmm(x, w)
    return torch.cat([torch.bmm(x[:, m : m + 1].clone(), w) for m in range(x.shape[1])], dim=1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, one row per call → x's shape and dtype."""
    w = weight.float()

    def norm(row: torch.Tensor) -> torch.Tensor:
        r = row.float()
        return (r * torch.rsqrt((r * r).mean(-1, keepdim=True) + eps) * w).to(x.dtype)

    return _each_row(x, norm)


def gate_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """The router's float32 scores `[N, E]` from its logits: "softmax" over experts or "sigmoid"."""
    return _each_row(logits.float(), lambda row: row.softmax(-1) if score_func == "softmax" else row.sigmoid())


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` (same shapes `[..., I]`), in float32, rounded once → gate's dtype."""
    width = gate.shape[-1]
    pairs = torch.cat([gate, up], dim=-1)
    return _each_row(pairs, lambda row: (F.silu(row[:, :width].float()) * row[:, width:].float()).to(gate.dtype))


def mla_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                  mask: torch.Tensor, softmax_scale: float, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """`kernels.attention.mla_attention` with each query on its own: the slots it sees gathered in
    slot order (a chain's or a tree node's: its ancestors in position order, as plain decoding
    holds them), then `mla_attention_reference` over exactly those. Shapes as there."""
    batch, width = q_latent.shape[:2]
    if block_table is not None:
        kv, pe = (paged.dense_rows(pool, block_table, batch, mask.shape[-1]) for pool in (kv, pe))
    if fp8_cache.is_fp8(kv):
        kv = fp8_cache.decode(kv, q_latent.dtype)
    mask = mask.expand(batch, width, kv.shape[1])
    out = torch.zeros_like(q_latent)
    for b in range(batch):
        for t in range(width):
            slots = mask[b, t].nonzero().squeeze(1)
            if slots.numel():
                seen = torch.ones(1, 1, slots.numel(), dtype=torch.bool, device=mask.device)
                out[b, t] = mla_attention_reference(q_latent[b, t].clone()[None, None], q_pe[b, t].clone()[None, None],
                                                    kv[b, slots][None], pe[b, slots][None], seen, softmax_scale)[0, 0]
    return out
