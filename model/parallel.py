"""Tensor-parallel building blocks: the rank context and the sharded linear/embedding layers.

Every layer takes its `ParallelContext` explicitly (no module-level world size), records which
slice of the full checkpoint tensor it owns (`shard_dim`, `shard_start`, `shard_len`), and names
its parameters exactly as the Hugging Face checkpoint does, so loading is name-for-name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels
from model.errors import ConfigError


@dataclass(frozen=True)
class ParallelContext:
    """Which rank this process is among `world_size` tensor/expert-parallel ranks."""

    world_size: int = 1
    rank: int = 0
    group: Any = None  # torch.distributed process group; None: the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks in place (no-op on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along its last dim (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, size: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of `size` elements; `what` names them in errors."""
        if size % self.world_size:
            raise ConfigError(f"{what}={size} is not divisible by world size {self.world_size}")
        part = size // self.world_size
        return self.rank * part, part


class Linear(nn.Module):
    """y = x Wᵀ with W `[out, in]` stored in the compute dtype, or as FP8 with 128×128 block scales.

    Attributes:
        weight: `[out, in]`, float or `float8_e4m3fn`.
        weight_scale_inv: `[ceil(out/128), ceil(in/128)]` float32 (only when `weight` is FP8).
        shard_dim / shard_start / shard_len: the slice of the full checkpoint tensor this rank holds
            (`shard_dim` None: the whole tensor).
    """

    shard_dim: int | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        fp8_block: int | None = None,
        shard_start: int = 0,
        shard_full: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp8_block = fp8_block
        self.shard_start = shard_start
        self.shard_full = shard_full  # full size of the sharded dim in the checkpoint
        weight_dtype = torch.float8_e4m3fn if fp8_block else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype), requires_grad=False)
        if fp8_block:
            scale_shape = (-(-out_features // fp8_block), -(-in_features // fp8_block))
            self.weight_scale_inv = nn.Parameter(torch.empty(scale_shape, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("weight_scale_inv", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., in]` → `[..., out]` in x's dtype."""
        if self.weight_scale_inv is None:
            return F.linear(x, self.weight)
        return kernels.fp8_linear(x, self.weight, self.weight_scale_inv)


class ColumnParallelLinear(Linear):
    """Linear whose output features are split over ranks; output stays sharded."""

    shard_dim = 0

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, dtype: torch.dtype,
                 fp8_block: int | None = None, what: str = "out_features") -> None:
        start, part = ctx.split(out_features, what)
        super().__init__(in_features, part, dtype, fp8_block, start, out_features)


class RowParallelLinear(Linear):
    """Linear whose input features are split over ranks; partial outputs are summed over ranks."""

    shard_dim = 1

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, dtype: torch.dtype,
                 fp8_block: int | None = None, what: str = "in_features") -> None:
        start, part = ctx.split(in_features, what)
        super().__init__(part, out_features, dtype, fp8_block, start, in_features)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce(super().forward(x))


class ParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over ranks; `weight` is `[vocab/world, dim]`."""

    shard_dim = 0

    def __init__(self, vocab_size: int, dim: int, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.ctx = ctx
        self.shard_start, part = ctx.split(vocab_size, "vocab_size")
        self.shard_full = vocab_size
        self.weight = nn.Parameter(torch.empty(part, dim, dtype=dtype), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[...]` int64 → `[..., dim]`."""
        if self.ctx.world_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.shard_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(y)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
