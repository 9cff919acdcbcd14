"""Multi-head Latent Attention over a latent KV cache (the absorbed decode path).

Per token the cache holds only the normalised KV latent `c` (`kv_lora_rank`) and the rotated
shared RoPE key `k_pe` (`qk_rope_head_dim`). `kv_b_proj` is absorbed into the query (for keys)
and applied after attention (for values), so no per-head K/V is ever materialised:

    score[h, s] = (q_nope[h] · W_uk[h]) · c[s] + q_pe[h] · k_pe[s]
    out[h]      = W_uv[h] · Σ_s softmax(score)[h, s] c[s]
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from specdec import kernels
from specdec.kernels import fp8_cache, paged
from specdec.model.args import ModelArgs
from specdec.model.parallel import ColumnParallelLinear, FusedLinears, Linear, ParallelContext, RMSNorm, RowParallelLinear
from specdec.model.rope import apply_rope, rotate


class MLA(nn.Module):
    """Multi-head latent attention with heads split over ranks (names follow the HF checkpoint)."""

    invariant: ModuleType | None = None
    """Batch-invariant kernels (`model.prepare.prepare_batch_invariant`) for the absorbed products and
    the attention; RoPE then runs as separate real products (one rounding per op, whichever vector
    lane an element falls in). None: the usual kernels."""

    def __init__(self, args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype, fp8_block: int | None) -> None:
        super().__init__()
        self.n_local_heads = args.n_heads // ctx.world_size
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.softmax_scale = args.softmax_scale
        q_out = args.n_heads * args.qk_head_dim
        if args.q_lora_rank == 0:
            self.q_proj = ColumnParallelLinear(args.dim, q_out, ctx, dtype, fp8_block, "num_attention_heads*qk_head_dim")
        else:
            self.q_a_proj = Linear(args.dim, args.q_lora_rank, dtype, fp8_block)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps, dtype)
            self.q_b_proj = ColumnParallelLinear(args.q_lora_rank, q_out, ctx, dtype, fp8_block, "num_attention_heads*qk_head_dim")
        self.kv_a_proj_with_mqa = Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, dtype, fp8_block)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps, dtype)
        self.kv_b_proj = ColumnParallelLinear(
            args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), ctx, dtype, fp8_block,
            "num_attention_heads*(qk_nope_head_dim+v_head_dim)",
        )
        self.o_proj = RowParallelLinear(args.n_heads * args.v_head_dim, args.dim, ctx, dtype, fp8_block,
                                        "num_attention_heads*v_head_dim")
        self.q_kv_a: FusedLinears | None = None
        self.register_buffer("kv_b_absorbed", None, persistent=False)

    def absorb_once(self) -> None:
        """After load: when kv_b_proj is held in FP8, dequantise it once into `kv_b_absorbed`
        (`[local_heads, nope_dim + v_dim, kv_lora_rank]`, compute dtype; not saved in state dicts),
        which every forward then reads instead of dequantising per call. A float kv_b_proj is
        already in that form (a view), so nothing is added."""
        if self.kv_b_proj.weight_scale_inv is not None:
            self.kv_b_absorbed = self._kv_b()

    def _kv_b(self) -> torch.Tensor:
        """kv_b_proj weight as `[local_heads, nope_dim + v_dim, kv_lora_rank]` in the compute dtype."""
        if self.kv_b_absorbed is not None:
            return self.kv_b_absorbed
        w = self.kv_b_proj.weight
        if self.kv_b_proj.weight_scale_inv is not None:
            w = kernels.weight_dequant(w, self.kv_b_proj.weight_scale_inv, out_dtype=self.compute_dtype())
        return w.view(self.n_local_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)

    def _stored_latent(self, latent: torch.Tensor, kv_pool: torch.Tensor) -> torch.Tensor:
        """The normalised latents `[B, T, C]` as the pool stores them: its dtype, or the FP8 format
        (`kernels.fp8_cache`) when the pool is a uint8 FP8 latent pool."""
        normed = self.kv_a_layernorm(latent)
        return fp8_cache.encode(normed) if fp8_cache.is_fp8(kv_pool) else normed.to(kv_pool.dtype)

    def _rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE on x `[B, T, H, d]` (`model.rope`); batch-invariant: as separate real products."""
        return apply_rope(x, rope.real, rope.imag) if self.invariant is not None else rotate(x, rope)

    def compute_dtype(self) -> torch.dtype:
        """Compute dtype of this layer (the dtype of its norm weights)."""
        return self.kv_a_layernorm.weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        kv_pool: torch.Tensor,
        pe_pool: torch.Tensor,
        layer: int,
        write_slots: torch.Tensor,
        attn_mask: torch.Tensor,
        block_table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend new tokens to the cache, writing their latents first.

        Args:
            x: `[B, T, dim]` normed hidden states of the new tokens.
            rope: `[B, T, rope_dim/2]` complex64 rotation (cos + i·sin) at each token's position.
            kv_pool: `[layers, ≥B, S, kv_lora_rank]` latent cache pool (written in place); this layer
                uses `kv_pool[layer]`, rows 0..B-1 (further rows are left alone). A uint8 pool of
                width kv_lora_rank + 4 holds FP8 latents with per-token scales (`kernels.fp8_cache`).
            pe_pool: `[layers, ≥B, S, rope_dim]` rotated RoPE-key pool (written in place), as kv_pool.
            layer: this layer's index in the pools. (The pools, not per-layer views, are written: an
                in-place write into a view of a compiled graph's input costs a copy of the input.)
            write_slots: `[B, T]` int64 cache slot for each new token's latent.
            attn_mask: `[B, T, S_kv]` bool, True where token t may attend to slot s (S_kv ≤ S).
            block_table: None for a dense pool (row b = pool row b, slot s = pool slot s); for a paged
                pool `[layers, n_blocks, block_size, ·]`, `[≥B, max_blocks]` int64: row b's slot s lives
                in block `block_table[b, s // block_size]` (`kernels.paged`).
        Returns:
            `[B, T, dim]` attention output (summed over ranks).
        """
        bsz, seqlen, _ = x.shape
        if block_table is None and kv_pool.shape[1] < bsz:
            raise ValueError(f"cache rows ({kv_pool.shape[1]}) < batch rows ({bsz})")
        if self.q_kv_a is not None:
            q_a, kv_a = self.q_kv_a(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            kv_a = self.kv_a_proj_with_mqa(x)
        q = q.view(bsz, seqlen, self.n_local_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = self._rotate(q_pe, rope)
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = self._rotate(k_pe.unsqueeze(2), rope).squeeze(2)

        kv_len = attn_mask.shape[-1]
        if block_table is None:
            rows = torch.arange(bsz, device=x.device).unsqueeze(1)
            where = (rows.new_full((), layer), rows, write_slots)
            kv_pool.index_put_(where, self._stored_latent(latent, kv_pool))
            pe_pool.index_put_(where, k_pe.to(pe_pool.dtype))
            kv, pe, table = kv_pool[layer, :bsz, :kv_len], pe_pool[layer, :bsz, :kv_len], None
        else:
            paged.write_slots(kv_pool, layer, block_table, write_slots, self._stored_latent(latent, kv_pool))
            paged.write_slots(pe_pool, layer, block_table, write_slots, k_pe)
            kv, pe, table = kv_pool[layer], pe_pool[layer], block_table[:bsz]
        w_kv_b = self._kv_b()
        heads = self.n_local_heads
        bmm = torch.bmm if self.invariant is None else self.invariant.bmm
        # absorb W_uk into the queries: per head [B·T, nope] @ [nope, C] (one batched GEMM over heads)
        q_latent = bmm(q_nope.reshape(bsz * seqlen, heads, self.nope_dim).transpose(0, 1),
                       w_kv_b[:, : self.nope_dim]).transpose(0, 1).reshape(bsz, seqlen, heads, -1)
        # the cache as it is stored (dense rows or paged blocks, FP8 latents or not): the kernel reads it
        attention = kernels.mla_attention if self.invariant is None else self.invariant.mla_attention
        out_latent = attention(q_latent, q_pe, kv, pe, attn_mask, self.softmax_scale, block_table=table)
        # W_uv after attention: per head [B·T, C] @ [C, v]
        out = bmm(out_latent.reshape(bsz * seqlen, heads, -1).transpose(0, 1),
                  w_kv_b[:, self.nope_dim :].transpose(1, 2))
        return self.o_proj(out.transpose(0, 1).reshape(bsz, seqlen, heads * self.v_dim))
