"""The DeepSeek-V3 verifier: embedding → decoder blocks (MLA + MLP/MoE) → norm → vocab-parallel head.

The forward is cache-explicit and position-explicit: callers pass per-row positions, the cache
slots to write, and a boolean attention mask over cache slots. Causal prefill, ragged batches,
single-token decode and draft trees are all just different (positions, slots, mask).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from specdec.model.args import ModelArgs
from specdec.model.mla import MLA
from specdec.model.moe import MLP, MoE
from specdec.model.parallel import ColumnParallelLinear, ParallelContext, ParallelEmbedding, RMSNorm
from specdec.model.rope import rope_tables


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(x)); MLP for dense layers, else MoE."""

    def __init__(self, layer_id: int, args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype,
                 fp8_block: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.self_attn = MLA(args, ctx, dtype, fp8_block)
        self.post_attention_layernorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        dense = layer_id < args.n_dense_layers
        self.mlp = MLP(args.dim, args.inter_dim, ctx, dtype, fp8_block) if dense else MoE(args, ctx, dtype, fp8_block)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv_pool: torch.Tensor, pe_pool: torch.Tensor,
                layer: int, write_slots: torch.Tensor, attn_mask: torch.Tensor,
                block_table: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B, T, dim]` → `[B, T, dim]`; see `MLA.forward` for the other arguments."""
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_pool, pe_pool, layer, write_slots, attn_mask,
                               block_table)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """`model.*` of the checkpoint: embed_tokens, layers 0..L-1, final norm."""

    def __init__(self, args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype, fp8_block: int | None) -> None:
        super().__init__()
        self.embed_tokens = ParallelEmbedding(args.vocab_size, args.dim, ctx, dtype)
        self.layers = nn.ModuleList(Block(i, args, ctx, dtype, fp8_block) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, dtype)


class ForwardOutput(NamedTuple):
    """What one verifier forward returns.

    hidden_prenorm: `[B, T, dim]` last block's output (before `model.norm`).
    hidden: `[B, T, dim]` after `model.norm` (the head's input; the MTP module's default input).
    logits: `[B, T', vocab]` float32 at the requested positions (all T when none requested).
    """

    hidden_prenorm: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor


class Transformer(nn.Module):
    """DeepSeek-V2/V3 main model with tensor/expert parallelism over `ctx`.

    Args:
        args: architecture.
        ctx: this rank's place among the parallel ranks.
        dtype: compute dtype (activations, norms, embeddings, non-FP8 weights).
        fp8_block: keep block projections in FP8 with this block size (None: compute dtype).
        max_seq_len: positions covered by the RoPE tables.
    """

    def __init__(self, args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype, fp8_block: int | None,
                 max_seq_len: int) -> None:
        super().__init__()
        self.args, self.ctx, self.dtype, self.max_seq_len = args, ctx, dtype, max_seq_len
        self.fp8_block = fp8_block
        self.model = DecoderStack(args, ctx, dtype, fp8_block)
        self.lm_head = ColumnParallelLinear(args.dim, args.vocab_size, ctx, dtype, None, "vocab_size")
        self.init_rope(torch.get_default_device())

    def init_rope(self, device: torch.device | str) -> None:
        """(Re)compute the RoPE table `rope_cis` `[max_seq_len, rope_dim/2]` complex64 (cos + i·sin) on
        `device` (needed after building on the meta device)."""
        cos, sin = rope_tables(self.args, self.max_seq_len, device)
        self.register_buffer("rope_cis", torch.complex(cos, sin), persistent=False)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden `[..., dim]` → full-vocab float32 logits `[..., vocab]` (gathered over ranks)."""
        return self.ctx.all_gather_last_dim(self.lm_head(hidden).float())

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        pe_cache: torch.Tensor,
        write_slots: torch.Tensor,
        attn_mask: torch.Tensor,
        logits_at: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Run the new tokens through every layer, writing their cache rows.

        Args:
            tokens: `[B, T]` int64 token ids.
            positions: `[B, T]` int64 RoPE positions (< max_seq_len).
            kv_cache: `[≥n_layers, ≥B, S, kv_lora_rank]` latent cache; layer i uses `kv_cache[i]`, rows
                0..B-1 (the pool may hold more rows than this batch).
            pe_cache: `[≥n_layers, ≥B, S, qk_rope_head_dim]` RoPE-key cache.
            write_slots: `[B, T]` int64 cache slot of each new token.
            attn_mask: `[B, T, S_kv]` bool attention mask over cache slots `0 .. S_kv-1`.
            logits_at: optional `[B, K]` int64 indices into T: logits only there (saves the head's work).
            block_table: `[≥B, max_blocks]` int64 for a paged pool `[layers, n_blocks, block_size, ·]`
                (`specdec.paged_cache`; row b's slot s is in block `block_table[b, s // block_size]`);
                None for a dense pool as above.
        """
        rope = self.rope_cis[positions]
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, rope, kv_cache, pe_cache, i, write_slots, attn_mask, block_table)
        hidden = self.model.norm(h)
        picked = hidden if logits_at is None else hidden.gather(
            1, logits_at.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return ForwardOutput(h, hidden, self.head(picked))
