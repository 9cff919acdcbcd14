"""Feed-forward layers: the dense SwiGLU MLP and DeepSeekMoE (router, routed and shared experts).

Routed experts are split whole over ranks (expert parallelism): each rank holds
`n_routed_experts / world_size` of them, computes their contribution for every token routed to
them, and the partial sums are added over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from specdec.model.args import ModelArgs
from specdec.model.parallel import (ColumnParallelLinear, FusedLinears, Linear, ParallelContext, RowParallelLinear,
                                    sum_in_order)


class MLP(nn.Module):
    """SwiGLU MLP, tensor-parallel over the intermediate dim: down(silu(gate(x)) * up(x))."""

    invariant: ModuleType | None = None  # batch-invariant kernels (`model.prepare.prepare_batch_invariant`)

    def __init__(self, dim: int, inter_dim: int, ctx: ParallelContext, dtype: torch.dtype, fp8_block: int | None) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(dim, inter_dim, ctx, dtype, fp8_block, "intermediate_size")
        self.up_proj = ColumnParallelLinear(dim, inter_dim, ctx, dtype, fp8_block, "intermediate_size")
        self.down_proj = RowParallelLinear(inter_dim, dim, ctx, dtype, fp8_block, "intermediate_size")
        self.gate_up: FusedLinears | None = None  # gate and up as one GEMM on the CPU (`model.prepare`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _swiglu(self, x)


class Expert(nn.Module):
    """One routed expert: an unsharded SwiGLU MLP living entirely on one rank."""

    invariant: ModuleType | None = None  # as `MLP.invariant`

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, fp8_block: int | None) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, dtype, fp8_block)
        self.up_proj = Linear(dim, inter_dim, dtype, fp8_block)
        self.down_proj = Linear(inter_dim, dim, dtype, fp8_block)
        self.gate_up: FusedLinears | None = None  # as `MLP.gate_up`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _swiglu(self, x)


def _swiglu(mlp: MLP | Expert, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), with gate and up as one GEMM once fused."""
    gate, up = mlp.gate_up(x) if mlp.gate_up is not None else (mlp.gate_proj(x), mlp.up_proj(x))
    return mlp.down_proj(F.silu(gate) * up if mlp.invariant is None else mlp.invariant.silu_mul(gate, up))


class Gate(nn.Module):
    """Router: scores experts, restricts to the best groups, picks top-k, returns their weights.

    `e_score_correction_bias` (V3) shifts the scores used for *selection* only; the weights come
    from the unbiased scores (normalised over the chosen k when `norm_topk_prob`), times
    `routed_scaling_factor`.

    Scores are computed in float32 (as DeepSeek-V3's reference does); the weight is held in float32
    from load on (the stored bf16 values, exactly), so no call copies it. It is `n_routed_experts ×
    dim` per MoE layer: 7 MB at V3's size.
    """

    invariant: ModuleType | None = None
    """Batch-invariant kernels (`model.prepare.prepare_batch_invariant`) for the logits and scores; the
    chosen weights are then normalised by a sum in choice order. None: the usual kernels."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale, self.norm_topk_prob = args.score_func, args.route_scale, args.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, dtype=torch.float32),
                                   requires_grad=False)
        if args.has_score_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts), requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, dim]` → (weights `[N, topk]` float32, expert indices `[N, topk]` int64)."""
        if self.invariant is not None:
            scores = self.invariant.gate_scores(self.invariant.linear(x.float(), self.weight), self.score_func)
        else:
            logits = F.linear(x.float(), self.weight)
            scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        indices = self.select(scores.detach())
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            total = weights.sum(dim=-1) if self.invariant is None else sum_in_order(weights.unbind(1))
            weights = weights / (total.unsqueeze(1) + 1e-20)
        return weights * self.route_scale, indices

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k expert indices `[N, topk]` int64 from scores `[N, E]`: scores plus the correction
        bias, restricted to the `topk_groups` best expert groups (a group's score: its best expert's,
        or its best two's sum when biased)."""
        bias = self.e_score_correction_bias
        choice = scores if bias is None else scores + bias
        if self.n_groups > 1:
            grouped = choice.view(scores.shape[0], self.n_groups, -1)
            group_scores = grouped.amax(dim=-1) if bias is None else grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        return choice.topk(self.topk, dim=-1)[1]


class MoE(nn.Module):
    """DeepSeekMoE: shared experts for every token plus top-k routed experts (whole experts per rank)."""

    def __init__(self, args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype, fp8_block: int | None) -> None:
        super().__init__()
        self.ctx = ctx
        self.n_routed_experts = args.n_routed_experts
        start, n_local = ctx.split(args.n_routed_experts, "n_routed_experts")
        self.local_experts = range(start, start + n_local)
        self.gate = Gate(args)
        self.experts = nn.ModuleDict(
            {str(i): Expert(args.dim, args.moe_inter_dim, dtype, fp8_block) for i in self.local_experts}
        )
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, ctx, dtype, fp8_block)
            if args.n_shared_experts > 0 else None
        )
        # this rank's routed sum over weights stacked after load (`model.prepare`: FP8 grouped GEMMs,
        # the CPU's timed formulations); None: `routed_local`
        self.routed_backend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., dim]` → `[..., dim]`: the shared experts plus the routed ones (this rank's routed
        sum, by `routed_backend` once one is installed, summed over ranks)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = self.gate(flat)
        run = self.routed_local if self.routed_backend is None else self.routed_backend
        routed = run(flat, weights, indices)
        if self.ctx.world_size > 1:
            routed = self.ctx.all_reduce(routed if routed is not None else torch.zeros_like(flat))
        if self.shared_experts is None:
            return (routed if routed is not None else torch.zeros_like(flat)).view(shape)
        shared = self.shared_experts(flat)
        return (shared if routed is None else routed + shared).view(shape)

    def routed_local(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """This rank's routed-expert sum `[N, dim]` before the sum over ranks (None when a single
        token chose no local expert): the routed slots (token, choice) sorted by expert, each local
        expert run once on a contiguous slice of gathered tokens, one `index_add_` scattering all
        results back; a single token skips the sort (`_one_token`). flat `[N, dim]`, weights /
        indices `[N, k]` from the gate."""
        if flat.device.type == "meta":  # a dry run (`specdec.dry_run`): the routing is unknown, so
            return sum(self.experts[str(e)](flat) for e in self.local_experts)  # every local expert meets every token
        if flat.shape[0] == 1:
            return self._one_token(flat, weights, indices)
        expert_of = indices.flatten()
        order = expert_of.argsort()
        counts = torch.bincount(expert_of, minlength=self.n_routed_experts).tolist()
        first = sum(counts[: self.local_experts.start])  # local experts' slots are contiguous once sorted
        slots = order[first : first + sum(counts[e] for e in self.local_experts)]
        tokens = slots // indices.shape[1]
        gathered = flat[tokens]
        outs, start = [], 0
        for e in self.local_experts:
            if counts[e]:
                outs.append(self.experts[str(e)](gathered[start : start + counts[e]]))
                start += counts[e]
        routed = torch.zeros_like(flat)
        if outs:
            scaled = torch.cat(outs) * weights.flatten()[slots].unsqueeze(1).to(flat.dtype)
            routed.index_add_(0, tokens, scaled)
        return routed

    def _one_token(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """The single-token case (batch-1 decode, one draft step) without sorting or scattering: this
        rank's routed sum, or None when the token chose no local expert."""
        routed = None
        for e, w in zip(indices[0].tolist(), weights[0].to(flat.dtype).unbind()):
            if e in self.local_experts:
                y = self.experts[str(e)](flat) * w
                routed = y if routed is None else routed + y
        return routed
