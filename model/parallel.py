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

    weight_t: torch.Tensor | None = None  # `[in, out]` (view or copy) once `prepare_cpu` ran

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        """x `[..., in]` → `[..., out]` in x's dtype; with `out_features`, only the first that many
        outputs (unquantised weights only: FP8 blocks cannot be cut at an arbitrary row)."""
        if self.weight_scale_inv is not None:
            if out_features is not None:
                raise ValueError("out_features needs an unquantised weight")
            return kernels.fp8_linear(x, self.weight, self.weight_scale_inv)
        weight, weight_t = self.weight, self.weight_t
        if out_features is not None:
            weight, weight_t = weight[:out_features], None if weight_t is None else weight_t[:, :out_features]
        if _cpu_path(x, weight_t, weight):
            return _cpu_linear(x, weight, weight_t)
        return F.linear(x, weight)

    def prepare_cpu(self, transposed_copy: bool = False) -> None:
        """Set up the CPU fast path for an unquantised weight (call after loading).

        `weight_t` is `weight.t()` (a view), or with `transposed_copy` an `[in, out]` contiguous copy:
        MKL's row-major GEMV over short rows (a vocabulary head with in = 256: 8192 dot products
        of 256) runs at about a third of the speed of the column-major one (measured: 1.3 ms vs
        0.5 ms for 8192 × 256 from DRAM), so the head, which every plain step and every draft step
        runs on one row, pays `in × out` more memory for the copy.
        """
        if self.weight_scale_inv is None:
            w = self.weight.detach()
            self.weight_t = w.t().contiguous() if transposed_copy else w.t()


def _cpu_path(x: torch.Tensor, weight_t: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether `_cpu_linear` serves x: the layer was prepared for the CPU and x is a CPU tensor of its dtype."""
    return weight_t is not None and x.device.type == "cpu" and x.dtype == weight.dtype


def _cpu_linear(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x `[..., in]` @ weight`[out, in]`ᵀ on the CPU with as few dispatched ops as possible, in the
    GEMM formulation MKL runs fastest: 2–16 rows as `weight @ xᵀ` (measured 2–4x faster than
    `x @ weightᵀ` for the small shapes of a verify step), otherwise `x @ weight_t`."""
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    if 2 <= rows <= 16:
        y = torch.mm(weight, x2.t()).t().contiguous()
    else:
        y = torch.mm(x2, weight_t)
    return y.view(*x.shape[:-1], y.shape[-1])


class FusedLinears:
    """Linears that read the same input, run as one GEMM on the CPU (`x @ [W_1; W_2; …]ᵀ`, then split).

    The fused weight is one `[Σ out, in]` tensor and each part's `weight` parameter becomes a view
    of its rows, so no memory is added and the parameters keep their checkpoint names and shapes.
    Only for unquantised weights (FP8 parts keep their own block scales and kernels). Inputs the
    CPU path does not serve (another device or dtype) run through each part as before.
    """

    def __init__(self, parts: list[Linear], storage: torch.Tensor | None = None) -> None:
        """`storage`: an `[Σ out, in]` tensor to hold the fused weight (filled here; e.g. a slice of a
        larger stack); None: a new one."""
        self.parts = parts
        self.weight = torch.cat([p.weight.detach() for p in parts], out=storage)
        self.weight_t = self.weight.t()
        self.sizes = [p.weight.shape[0] for p in parts]
        start = 0
        for p, n in zip(parts, self.sizes):
            p.weight.data = self.weight[start : start + n]
            p.weight_t = p.weight.detach().t()
            start += n

    @staticmethod
    def possible(parts: list[Linear]) -> bool:
        return all(p.weight_scale_inv is None and p.weight.dtype == parts[0].weight.dtype for p in parts)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x `[..., in]` → one `[..., out_i]` per part."""
        if not _cpu_path(x, self.weight_t, self.weight):
            return [p(x) for p in self.parts]
        return list(_cpu_linear(x, self.weight, self.weight_t).split(self.sizes, dim=-1))


def prepare_cpu(module: nn.Module, transposed_copies: tuple[Linear, ...] = ()) -> None:
    """Set up `module` for the CPU after loading: `Linear.prepare_cpu` on every linear layer (copies for
    those in `transposed_copies`), then `fuse_for_cpu()` on every submodule that has one."""
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.prepare_cpu(any(sub is t for t in transposed_copies))
    for sub in module.modules():
        if hasattr(sub, "fuse_for_cpu"):
            sub.fuse_for_cpu()


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
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # same maths, fewer ops
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
