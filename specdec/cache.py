"""The shared MLA latent cache: one preallocated pool for the verifier's layers and the MTP layer.

Per layer and token it stores the normalised KV latent (`kv_lora_rank`) and the rotated RoPE key
(`qk_rope_head_dim`); per row, how many tokens are committed. Rolling back is only a length.
"""

from __future__ import annotations

import torch

from specdec.kernels import fp8_cache
from specdec.model.args import ModelArgs
from specdec.steps import StepCache


SPAN_MULTIPLE = 16
"""Spare slots a compiled engine's pool keeps past what a call needs (`Engine.cache_for`)."""


class LatentCache:
    """Preallocated latent + RoPE-key cache for `n_layers` layers × `batch` rows × `seq_len` slots.

    Attributes:
        kv: `[n_layers, batch, seq_len, kv_lora_rank]` latents in `dtype`; with kv_cache_dtype "fp8",
            `[n_layers, batch, seq_len, kv_lora_rank + 4]` uint8 (FP8 codes + scale, `kernels.fp8_cache`).
        pe: `[n_layers, batch, seq_len, qk_rope_head_dim]` rotated RoPE keys.
        lengths: `[batch]` int64 committed tokens per row.
    """

    def __init__(self, args: ModelArgs, n_layers: int, batch: int, seq_len: int, dtype: torch.dtype,
                 device: torch.device | str, kv_cache_dtype: str = "auto") -> None:
        self.batch, self.seq_len = batch, seq_len
        kv_dtype, width = fp8_cache.latent_storage(kv_cache_dtype, args.kv_lora_rank, dtype)
        self.kv = torch.zeros(n_layers, batch, seq_len, width, dtype=kv_dtype, device=device)
        self.pe = torch.zeros(n_layers, batch, seq_len, args.qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    @staticmethod
    def bytes_per_token(args: ModelArgs, n_layers: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """Cache bytes one token costs over `n_layers` layers."""
        kv_dtype, width = fp8_cache.latent_storage(kv_cache_dtype, args.kv_lora_rank, dtype)
        size = lambda d: torch.empty((), dtype=d).element_size()  # noqa: E731
        return (width * size(kv_dtype) + args.qk_rope_head_dim * size(dtype)) * n_layers

    def step_view(self, n_slots: int) -> StepCache:
        """The pool as a step sees it (`specdec.steps`): views of its first `n_slots` slots (the
        caller's longest row plus what the step writes; at most `seq_len`)."""
        n = min(n_slots, self.seq_len)
        return StepCache(self.kv[:, :, :n], self.pe[:, :, :n], None, n)

    block_table = None
    """A dense pool has no block table (the paged pool's interface, `specdec.paged_cache`)."""

    def reserve(self, row: int, n_slots: int) -> bool:
        """Every row holds all `seq_len` slots from the start: True when `n_slots` fit."""
        return n_slots <= self.seq_len

    def release(self, row: int) -> None:
        """Nothing to give back: a dense row keeps its slots (and its length, for inspection) until a
        prefill or `move_row` reuses it."""

    def rows_from(self, first_row: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(kv, pe, None) through which a batch's row b is this pool's row first_row + b (views)."""
        return self.kv[:, first_row:], self.pe[:, first_row:], None

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (its committed slots) into row `dst`, e.g. to keep active rows in a prefix."""
        n = int(self.lengths[src])
        self.kv[:, dst, :n] = self.kv[:, src, :n]
        self.pe[:, dst, :n] = self.pe[:, src, :n]
        self.lengths[dst] = n

