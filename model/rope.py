"""Rotary position embedding with DeepSeek's YaRN extension.

Tables are precomputed once per model for `max_seq_len` positions and indexed by per-row
positions, so rows of a batch (and tree nodes) may sit at different positions.
Pairs are interleaved `(x0, x1), (x2, x3), ...` as in the released checkpoints.
"""

from __future__ import annotations

import math

import torch

from specdec.model.args import ModelArgs


def _correction_dim(n_rotations: float, dim: int, base: float, original_len: int) -> float:
    """Rotary dim index whose wavelength completes `n_rotations` turns over `original_len` tokens."""
    return dim * math.log(original_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies `[qk_rope_head_dim/2]` float32, YaRN-blended when `rope_factor > 1`."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_factor <= 1.0:
        return inv_freq
    low = max(math.floor(_correction_dim(args.beta_fast, dim, base, args.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(args.beta_slow, dim, base, args.original_seq_len)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by the factor
    return inv_freq / args.rope_factor * (1 - extrapolate) + inv_freq * extrapolate


def rope_tables(args: ModelArgs, max_seq_len: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each `[max_seq_len, qk_rope_head_dim/2]` float32, YaRN attention factor folded in."""
    t = torch.arange(max_seq_len, dtype=torch.float32)
    angles = torch.outer(t, rope_inv_freq(args))
    factor = args.rope_attention_factor
    return (angles.cos() * factor).to(device), (angles.sin() * factor).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x `[B, T, H, d]` by cos/sin `[B, T, d/2]`; returns x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`apply_rope` as one complex product: x `[B, T, H, d]` by `rope` `[B, T, d/2]` complex64
    (cos + i·sin of `rope_tables`); returns x's dtype. Under `torch.compile` (inductor has no
    complex kernels) the same rotation runs as `apply_rope` on the real and imaginary parts."""
    if torch.compiler.is_compiling():
        return apply_rope(x, rope.real, rope.imag)
    x32 = x.float()
    if x32.storage_offset() % 2 or any(stride % 2 for stride in x32.stride()[:-1]):
        x32 = x32.contiguous()  # view_as_complex needs (re, im) pairs on even strides
    z = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * rope.unsqueeze(2)).flatten(-2).to(x.dtype)
