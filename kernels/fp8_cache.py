"""The FP8 latent cache format (`--kv-cache-dtype fp8`): e4m3 latents with one scale per token.

A latent cache pool in this format is a uint8 tensor whose last dim holds, per token and layer,
the `kv_lora_rank` float8_e4m3fn codes of the normalised latent followed by its float32
dequantisation scale (4 bytes): `C + 4` bytes instead of `2·C` (bf16) or `4·C` (float32). The scale
is the token's amax / 448, so each token is quantised on its own: a token's cached latent does not
depend on which other tokens were written with it (verify and plain steps read the same values).
The RoPE keys stay in the compute dtype (as in DeepSeek's FP8 FlashMLA format).

Keeping the format in one uint8 tensor leaves every pool, view, row move and block table as it is
for the float formats; only writing (`encode`) and reading (`decode`) a layer's latents differ.
"""

from __future__ import annotations

import torch

from .reference import FP8_DTYPE, FP8_MAX

KV_CACHE_DTYPES = ("auto", "fp8")
"""`--kv-cache-dtype`: "auto" stores latents in the compute dtype, "fp8" in this module's format."""
SCALE_BYTES = 4


def latent_storage(kv_cache_dtype: str, kv_lora_rank: int, compute_dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(pool dtype, last-dim width) of the latent pool for `kv_cache_dtype`."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "fp8":
        return torch.uint8, kv_lora_rank + SCALE_BYTES
    return compute_dtype, kv_lora_rank


def is_fp8(pool: torch.Tensor) -> bool:
    """Whether a latent pool (or a view of it) holds this module's FP8 format."""
    return pool.dtype == torch.uint8


def encode(latent: torch.Tensor) -> torch.Tensor:
    """`[..., C]` float latents → `[..., C + 4]` uint8: e4m3 codes of latent / s, then s (float32),
    s = max(amax over the token's C values, 1e-12) / 448."""
    x = latent.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    codes = (x / scale).to(FP8_DTYPE).view(torch.uint8)
    return torch.cat([codes, scale.contiguous().view(torch.uint8)], dim=-1)


def decode(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[..., C + 4]` uint8 (from `encode`) → `[..., C]` latents in `dtype` (codes × scale, in float32)."""
    stored = stored.contiguous()
    codes = stored[..., :-SCALE_BYTES].view(FP8_DTYPE)
    scale = stored[..., -SCALE_BYTES:].view(torch.float32)
    return (codes.float() * scale).to(dtype)
