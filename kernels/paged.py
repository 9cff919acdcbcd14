"""Reading and writing a paged latent cache (torch; any device).

A paged pool stores every row's tokens in fixed-size blocks: `pool[layer, block, offset, ·]`, and a
row's block table lists its blocks in order, so slot s of row b lives at
`pool[layer, table[b, s // block_size], s % block_size]`. Table entries a row has not been given
point at block 0, which the pool never hands out (`specdec.paged_cache`): writes for padding
queries land there harmlessly and reads of it are always masked out.
"""

from __future__ import annotations

import torch


def write_slots(pool: torch.Tensor, layer: int, table: torch.Tensor, slots: torch.Tensor,
                values: torch.Tensor) -> None:
    """Write `values` `[B, T, D]` at the rows' `slots` `[B, T]` of `pool[layer]` `[n_blocks, block, D]`
    through the block table `table` `[≥B, max_blocks]` (row b of the batch is table row b)."""
    block_size = pool.shape[2]
    blocks = table[: slots.shape[0]].gather(1, slots // block_size)
    pool.index_put_((blocks.new_full((), layer), blocks, slots % block_size), values.to(pool.dtype))


def dense_rows(layer_pool: torch.Tensor, table: torch.Tensor, batch: int, n_slots: int) -> torch.Tensor:
    """Slots 0..n_slots-1 of the first `batch` table rows of one layer's pool `[n_blocks, block, D]` as
    one contiguous tensor `[batch, n_slots, D]` (a copy: the torch attention reads dense rows)."""
    block_size = layer_pool.shape[1]
    n_blocks = -(-n_slots // block_size)
    rows = layer_pool[table[:batch, :n_blocks]]  # [batch, n_blocks, block, D]
    return rows.flatten(1, 2)[:, :n_slots]
