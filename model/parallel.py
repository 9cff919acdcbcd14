"""Tensor-parallel building blocks: the rank context and the sharded linear/embedding layers.

Every layer takes its `ParallelContext` explicitly (no module-level world size), records which
slice of the full checkpoint tensor it owns (`shard_dim`, `shard_start`, `shard_len`), and names
its parameters exactly as the Hugging Face checkpoint does, so loading is name-for-name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from specdec import kernels
from specdec.kernels import cpu_gemm
from specdec.kernels.cpu_gemm import DEFAULT_PLAN, RowPlan
from specdec.model.errors import ConfigError


def sum_in_order(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """`((t_0 + t_1) + t_2) + …`, elementwise: every element is summed in this one order (what the
    batch-invariant mode needs where a reduction kernel may pick its order from the shape)."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


@dataclass(frozen=True)
class ParallelContext:
    """Which rank this process is among `world_size` tensor/expert-parallel ranks."""

    world_size: int = 1
    rank: int = 0
    group: Any = None  # torch.distributed process group; None: the default group
    ordered_sums: bool = False  # sums over ranks added in rank order (batch-invariant mode)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks in place (no-op on one rank). With `ordered_sums` every element is
        `((x_0 + x_1) + x_2) + …` in rank order: a collective's own reduction order can change with
        the message size, i.e. with the number of tokens, which the batch-invariant mode forbids."""
        if self.world_size == 1:
            return x
        if not self.ordered_sums:
            dist.all_reduce(x, group=self.group)
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return x.copy_(sum_in_order(parts))

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along its last dim (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_int(self, value: int, device: torch.device) -> int:
        """Rank 0's `value` on every rank (one collective; no-op on one rank), e.g. a decision that
        rests on per-rank timings and must be the same everywhere."""
        if self.world_size == 1:
            return value
        box = torch.tensor([value], dtype=torch.long, device=device)
        dist.broadcast(box, src=0, group=self.group)
        return int(box)

    def broadcast_object(self, obj: Any, device: torch.device) -> Any:
        """Rank 0's picklable `obj` on every rank (other ranks pass anything, e.g. None; no-op on one
        rank): how followers under torchrun learn a scheduler's decisions."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group, device=device if device.type == "cuda" else None)
        return box[0]

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

    gemm_plan: RowPlan | None = None  # the CPU formulation per row count once prepared (`model.prepare`)
    weight_copy: torch.Tensor | None = None  # `[in, out]` contiguous copy when the plan runs "x_wcopy"
    invariant: ModuleType | None = None  # batch-invariant kernels to run (`model.prepare.prepare_batch_invariant`)

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        """x `[..., in]` → `[..., out]` in x's dtype; with `out_features`, only the first that many
        outputs (unquantised weights only: FP8 blocks cannot be cut at an arbitrary row)."""
        if self.weight_scale_inv is not None:
            if out_features is not None:
                raise ValueError("out_features needs an unquantised weight")
            if self.invariant is not None:
                return self.invariant.fp8_linear(x, self.weight, self.weight_scale_inv)
            return kernels.fp8_linear(x, self.weight, self.weight_scale_inv)
        weight, weight_copy = self.weight, self.weight_copy
        if out_features is not None:
            weight, weight_copy = weight[:out_features], None if weight_copy is None else weight_copy[:, :out_features]
        if self.invariant is not None:
            return self.invariant.linear(x, weight)
        if _cpu_path(x, self.gemm_plan, weight):
            return _cpu_linear(x, weight, weight_copy, self.gemm_plan)
        return F.linear(x, weight)

    def prepare_cpu(self, plan: RowPlan | None = None) -> None:
        """Set up the CPU path for an unquantised weight (call after loading): each call runs the
        formulation `plan` gives for its row count (`kernels.cpu_gemm`; default: keep the plan set
        before, else `DEFAULT_PLAN`). A plan that runs "x_wcopy" gets an `[in, out]` copy of the
        weight (in × out more memory), which only `model.prepare.prepare_cpu(module, tuner)` offers, to heads."""
        if self.weight_scale_inv is None:
            self.gemm_plan = plan or self.gemm_plan or DEFAULT_PLAN
            needs_copy = self.gemm_plan.needs_copy
            self.weight_copy = self.weight.detach().t().contiguous() if needs_copy else None


def _cpu_path(x: torch.Tensor, plan: RowPlan | None, weight: torch.Tensor) -> bool:
    """Whether `_cpu_linear` serves x: the layer was prepared for the CPU and x is a CPU tensor of its dtype."""
    return plan is not None and x.device.type == "cpu" and x.dtype == weight.dtype


def _cpu_linear(x: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None,
                plan: RowPlan) -> torch.Tensor:
    """x `[..., in]` @ weight`[out, in]`ᵀ on the CPU in the formulation `plan` measured fastest on
    this machine for x's row count (see `kernels.cpu_gemm`), with as few dispatched ops as possible."""
    rows = x.numel() // x.shape[-1]
    y = cpu_gemm.gemm(x.reshape(rows, x.shape[-1]), weight, weight_copy, plan.for_rows(rows))
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
        self.plan: RowPlan = DEFAULT_PLAN
        self.sizes = [p.weight.shape[0] for p in parts]
        start = 0
        for p, n in zip(parts, self.sizes):
            p.weight.data = self.weight[start : start + n]
            p.prepare_cpu()
            start += n

    @staticmethod
    def possible(parts: list[Linear]) -> bool:
        return all(p.weight_scale_inv is None and p.weight.dtype == parts[0].weight.dtype for p in parts)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x `[..., in]` → one `[..., out_i]` per part."""
        if not _cpu_path(x, self.plan, self.weight):
            return [p(x) for p in self.parts]
        return list(_cpu_linear(x, self.weight, None, self.plan).split(self.sizes, dim=-1))


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

    invariant: ModuleType | None = None  # as `Linear.invariant`

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invariant is not None:
            return self.invariant.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # same maths, fewer ops
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
