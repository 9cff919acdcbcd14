"""Parameter layout of the MTP module stored at `model.layers.{num_hidden_layers}` of a checkpoint.

It is a full decoder block plus `enorm`, `hnorm`, `eh_proj [dim, 2·dim]`, `shared_head.{norm,head}`
and its own `embed_tokens`, named exactly as in the release, sharded like the main layers
(heads/intermediate dims over ranks, whole experts per rank, vocab-parallel embedding and head;
`eh_proj` replicated). The converter and planner use this layout; the drafting forward belongs
to the MTP drafter.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.model.args import ModelArgs
from specdec.model.parallel import ColumnParallelLinear, Linear, ParallelContext, ParallelEmbedding, RMSNorm
from specdec.model.transformer import Block


class SharedHead(nn.Module):
    """`shared_head.norm` and the vocab-parallel `shared_head.head`."""

    def __init__(self, args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.head = ColumnParallelLinear(args.dim, args.vocab_size, ctx, dtype, None, "vocab_size")


class MTPLayer(Block):
    """The MTP module's tensors: `Block` (self_attn, mlp, norms) + enorm, hnorm, eh_proj, shared_head, embed_tokens."""

    def __init__(self, layer_id: int, args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype,
                 fp8_block: int | None) -> None:
        super().__init__(layer_id, args, ctx, dtype, fp8_block)
        self.enorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(args.dim, args.rms_norm_eps, dtype)
        self.eh_proj = Linear(2 * args.dim, args.dim, dtype, None)
        self.shared_head = SharedHead(args, ctx, dtype)
        self.embed_tokens = ParallelEmbedding(args.vocab_size, args.dim, ctx, dtype)
