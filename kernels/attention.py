"""Absorbed MLA attention over a latent cache with an arbitrary boolean mask.

The mask is what makes one routine serve causal prefill, single-token decode, ragged batches
and draft trees: query t of row b sees cache slot s iff `mask[b, t, s]`. A query whose mask row
is all False (a padding query) gets an all-zero output, not NaN, in every implementation.

`mla_attention` picks the implementation per call through `impl` (no global switch), following
the conventions of `kernels.dispatch`:

* "torch": `mla_attention_reference` (any device).
* "triton": `kernels.triton_attention`; CUDA tensors, or CPU tensors when TRITON_INTERPRET=1.
* "auto": Triton for CUDA tensors when triton imports, otherwise the torch reference (so CPU
  tensors always use the reference). Unlike the FP8 ops, no minimum compute capability.

The Triton kernel has no backward, so when autograd has to track the call (grad mode on and an
operand requires grad) "auto" takes the differentiable reference and "triton" is refused.

Triton is imported lazily, only when the Triton path is taken.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import fp8_cache, paged
from .dispatch import resolve_impl


def mla_attention_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Softmax attention in latent space (plain torch, any device).

    Args:
        q_latent: `[B, T, H, C]` queries projected into the latent space (C = kv_lora_rank).
        q_pe: `[B, T, H, R]` rotated RoPE part of the queries (same dtype as q_latent).
        kv: `[B, S, C]` latent cache (values and, through the absorbed projection, keys).
        pe: `[B, S, R]` rotated RoPE keys.
        mask: `[B, T, S]` bool; a query with no visible slot gets zeros.
        softmax_scale: multiplier on the logits.
    Returns:
        `[B, T, H, C]` attention-weighted latents, in q_latent's dtype. Logits are computed in
        the input dtype, the softmax in float32, the weighted sum in kv's dtype.
    """
    batch, width, heads, rank = q_latent.shape
    # rows are (token, head) pairs: two batched GEMMs per sequence, no per-head copies of the cache
    scores = torch.baddbmm(
        torch.bmm(q_pe.reshape(batch, width * heads, -1), pe.transpose(1, 2)),
        q_latent.reshape(batch, width * heads, rank), kv.transpose(1, 2),
    ).view(batch, width, heads, -1)
    scores = (scores.float() * softmax_scale).masked_fill(~mask.unsqueeze(2), float("-inf"))
    # Hidden slots get probability exactly 0; an all-hidden row is 0/0 = NaN, which becomes zeros.
    probs = scores.softmax(dim=-1).nan_to_num(0.0).to(kv.dtype)
    out = torch.bmm(probs.view(batch, width * heads, -1), kv)
    return out.view(batch, width, heads, rank).to(q_latent.dtype)


def uses_triton(impl: str, t: torch.Tensor, needs_grad: bool) -> bool:
    """Resolve `impl` for attention whose main operand is `t` (`needs_grad`: autograd must track
    the call; the kernel has no backward); raise ValueError if impossible."""
    if needs_grad and impl == "triton":
        raise ValueError("impl='triton' has no backward; use impl='torch' or 'auto' when gradients are needed")
    return resolve_impl(impl, t, t.is_cuda and not needs_grad)


def _triton_impl() -> ModuleType:
    """Import and return `kernels.triton_attention` (deferred so that importing kernels skips triton)."""
    from . import triton_attention

    return triton_attention


def mla_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float,
    impl: str = "auto",
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked latent attention; shapes as in `mla_attention_reference`.

    Args:
        q_latent, q_pe, kv, pe, mask, softmax_scale: see `mla_attention_reference`. Strided
            views (e.g. `kv_cache[:, :kv_len]`) are read in place by the Triton kernel.
        impl: "auto", "torch" or "triton" (see the module docstring).
        block_table: for a paged cache: kv `[n_blocks, block_size, C]` / pe `[n_blocks, block_size, R]`
            are one layer's block pools and `block_table` `[≥B, max_blocks]` lists row b's blocks
            (`kernels.paged`); S is the mask's last dim. The Triton kernel reads the blocks in place;
            the reference gathers the rows first (`paged.dense_rows`).
        kv may also be an FP8 latent pool or rows (uint8 `[…, C + 4]`, `kernels.fp8_cache`): the Triton
        kernel decodes its tiles as it reads them, the reference decodes the rows first.
    Returns:
        `[B, T, H, C]` in q_latent's dtype; zeros for queries whose mask row is all False.
    """
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_latent, q_pe, kv, pe))
    if uses_triton(impl, q_latent, needs_grad):
        return _triton_impl().mla_attention(q_latent, q_pe, kv, pe, mask, softmax_scale, block_table=block_table)
    if block_table is not None:
        batch, n_slots = q_latent.shape[0], mask.shape[-1]
        kv, pe = (paged.dense_rows(pool, block_table, batch, n_slots) for pool in (kv, pe))
    if fp8_cache.is_fp8(kv):
        kv = fp8_cache.decode(kv, q_latent.dtype)
    return mla_attention_reference(q_latent, q_pe, kv, pe, mask, softmax_scale)
