"""The paged MLA latent cache: fixed-size blocks from one pool, a block table per row.

Every layer of the verifier and the MTP layer keep a token's latent and RoPE key in the same
block (`kv[layer, block, offset]`), so one block table serves both. A row (a sequence being decoded
or prefilled) owns the blocks its table lists, in slot order; `reserve` hands it more before a
step writes further slots (the verified root, draft nodes and MTP scratch rows included),
`release` returns them all when its sequence ends, is cancelled or is preempted. Block 0 is
never handed out: unassigned table entries point at it, so writes of padding queries land there
and its slots are always masked (`kernels.paged`).

Moving a row (compacting the live rows to a prefix) moves its table entries, not its data.
Attention reads the blocks where they lie with the Triton kernel (CUDA), an FP8 pool's latents
decoded as they are read; the torch reference gathers each row's blocks into dense rows first, and
decodes an FP8 pool's (`kernels.mla_attention`'s `block_table`).
"""

from __future__ import annotations

import torch

from specdec.kernels import fp8_cache
from specdec.model.args import ModelArgs
from specdec.steps import StepCache


class PagedLatentCache:
    """`n_blocks` blocks of `block_size` slots for `n_layers` layers, shared by `rows` rows of at
    most `seq_len` slots each.

    Attributes:
        kv: `[n_layers, n_blocks + 1, block_size, kv_lora_rank]` latents (block 0: the null block);
            uint8 of width kv_lora_rank + 4 with kv_cache_dtype "fp8" (`kernels.fp8_cache`).
        pe: `[n_layers, n_blocks + 1, block_size, qk_rope_head_dim]` rotated RoPE keys.
        block_table: `[rows, seq_len / block_size]` int64, row r's blocks in slot order (0: none).
        lengths: `[rows]` int64 committed tokens per row.
    """

    def __init__(self, args: ModelArgs, n_layers: int, rows: int, n_blocks: int, block_size: int, seq_len: int,
                 dtype: torch.dtype, device: torch.device | str, kv_cache_dtype: str = "auto") -> None:
        if block_size < 1 or n_blocks < 1 or rows < 1:
            raise ValueError(f"paged cache: block_size ({block_size}), blocks ({n_blocks}) and rows ({rows}) "
                             f"must be >= 1")
        self.batch, self.block_size, self.n_blocks = rows, block_size, n_blocks
        self.max_blocks = -(-seq_len // block_size)
        self.seq_len = self.max_blocks * block_size
        kv_dtype, width = fp8_cache.latent_storage(kv_cache_dtype, args.kv_lora_rank, dtype)
        self.kv = torch.zeros(n_layers, n_blocks + 1, block_size, width, dtype=kv_dtype, device=device)
        self.pe = torch.zeros(n_layers, n_blocks + 1, block_size, args.qk_rope_head_dim, dtype=dtype, device=device)
        self.block_table = torch.zeros(rows, self.max_blocks, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self._free = list(range(n_blocks, 0, -1))  # popped from the end: block 1 first
        self._owned: list[list[int]] = [[] for _ in range(rows)]

    # ------------------------------------------------------------------ blocks

    def blocks_for(self, n_slots: int) -> int:
        """Blocks that hold `n_slots` slots."""
        return -(-n_slots // self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.n_blocks - len(self._free)

    def owned(self, row: int) -> int:
        """Blocks row `row` holds."""
        return len(self._owned[row])

    def reserve(self, row: int, n_slots: int) -> bool:
        """Make row `row` hold slots 0..n_slots-1 (taking free blocks as needed); False, taking
        nothing, when the pool has too few free blocks or `n_slots` exceeds `seq_len`."""
        owned = self._owned[row]
        need = self.blocks_for(n_slots) - len(owned)
        if need <= 0:
            return True
        if need > len(self._free) or n_slots > self.seq_len:
            return False
        new = [self._free.pop() for _ in range(need)]
        self.block_table[row, len(owned):len(owned) + need] = torch.tensor(new, dtype=torch.long)
        owned.extend(new)
        return True

    def release(self, row: int) -> None:
        """Return row `row`'s blocks to the pool; the row is empty (length 0) afterwards."""
        self._free.extend(reversed(self._owned[row]))
        self._owned[row] = []
        self.block_table[row] = 0
        self.lengths[row] = 0

    # ------------------------------------------------------------------ rows

    def rows_from(self, first_row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv, pe, block table) through which a batch's row b is this pool's row first_row + b."""
        return self.kv, self.pe, self.block_table[first_row:]

    def move_row(self, src: int, dst: int) -> None:
        """Row `src` becomes row `dst` (which must be empty): its blocks and length, no data copied."""
        if self._owned[dst]:
            raise ValueError(f"paged cache: row {dst} still holds blocks")
        self._owned[dst], self._owned[src] = self._owned[src], []
        self.block_table[dst] = self.block_table[src]
        self.lengths[dst] = self.lengths[src]
        self.block_table[src] = 0
        self.lengths[src] = 0

    def step_view(self, n_slots: int) -> StepCache:
        """The pool as a step sees it (`specdec.steps`): the block pools, the table, attention over
        `n_slots` slots (the caller's longest row plus what the step writes)."""
        return StepCache(self.kv, self.pe, self.block_table, min(n_slots, self.seq_len))
