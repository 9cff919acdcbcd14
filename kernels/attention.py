"""Absorbed MLA attention over a latent cache with an arbitrary boolean mask (torch reference).

The mask is what makes one routine serve causal prefill, single-token decode, ragged batches
and (later) draft trees: query t of row b sees cache slot s iff `mask[b, t, s]`.
"""

from __future__ import annotations

import torch


def mla_attention_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Softmax attention in latent space.

    Args:
        q_latent: `[B, T, H, C]` queries projected into the latent space (C = kv_lora_rank).
        q_pe: `[B, T, H, R]` rotated RoPE part of the queries.
        kv: `[B, S, C]` latent cache (values and, through the absorbed projection, keys).
        pe: `[B, S, R]` rotated RoPE keys.
        mask: `[B, T, S]` bool; every query must see at least one slot.
        softmax_scale: multiplier on the logits.
    Returns:
        `[B, T, H, C]` attention-weighted latents, in q_latent's dtype.
    """
    scores = torch.einsum("bthc,bsc->bhts", q_latent, kv) + torch.einsum("bthr,bsr->bhts", q_pe, pe)
    scores = scores.float() * softmax_scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1).to(kv.dtype)
    return torch.einsum("bhts,bsc->bthc", probs, kv).to(q_latent.dtype)


def mla_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Dispatch for masked latent attention; see `mla_attention_reference` for shapes.

    Only the torch path exists today (it also runs on CUDA); a fused Triton kernel is not built yet.
    """
    return mla_attention_reference(q_latent, q_pe, kv, pe, mask, softmax_scale)
