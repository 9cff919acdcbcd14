"""Feed-forward layers: the dense SwiGLU MLP and DeepSeekMoE (router, routed and shared experts).

Routed experts are split whole over ranks (expert parallelism): each rank holds
`n_routed_experts / world_size` of them, computes their contribution for every token routed to
them, and the partial sums are added over ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specdec import kernels
from specdec.model.args import ModelArgs
from specdec.kernels.cpu_gemm import GemmTuner, RowPlan, interleaved_seconds
from specdec.model.parallel import ColumnParallelLinear, FusedLinears, Linear, ParallelContext, RowParallelLinear


GATHER_MAX_BYTES = 1 << 30
"""`MoE._routed_static` (compiled forwards) gathers each routed slot's expert weights while the
gathered copies (slots × one expert's gate/up/down bytes) fit in this many bytes, and runs every
expert on every token beyond it.

Measured on the embedded model (8 experts, top-2, 491 KB of float32 weights per expert; 2-core
CPU; the compiled verifier, each pair in one process, calls interleaved, median of 30): gathering
does the routed FLOPs (as batched GEMVs), running every expert does 4× them (as GEMMs), and
gathering was faster at every size tried, 16 to 2,048 slots. Batch 8: 14.1 → 12.0 ms for 2 tokens
per row (32 slots), 20.6 → 16.5 ms for 4 (64 slots), 36.2 → 29.9 ms for 8, 229 → 200 ms for 64;
batch 16 × 64 tokens (2,048 slots, 1 GiB gathered per layer): 492 → 425 ms. The cap keeps the
copies of larger experts (or longer calls) bounded; compiled calls hold at most 64 tokens per row.
"""


EXPERT_FORMULATIONS = ("loop", "dense")
"""How eager CPU calls run the routed experts (`MoE.tune_cpu` times them per token count)."""


class MLP(nn.Module):
    """SwiGLU MLP, tensor-parallel over the intermediate dim: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter_dim: int, ctx: ParallelContext, dtype: torch.dtype, fp8_block: int | None) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(dim, inter_dim, ctx, dtype, fp8_block, "intermediate_size")
        self.up_proj = ColumnParallelLinear(dim, inter_dim, ctx, dtype, fp8_block, "intermediate_size")
        self.down_proj = RowParallelLinear(inter_dim, dim, ctx, dtype, fp8_block, "intermediate_size")
        self.gate_up: FusedLinears | None = None

    def fuse_for_cpu(self) -> None:
        """Run gate_proj and up_proj as one GEMM on the CPU (see `FusedLinears`); already done for
        routed experts whose MoE stacked them."""
        if self.gate_up is None and FusedLinears.possible([self.gate_proj, self.up_proj]):
            self.gate_up = FusedLinears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _swiglu(self, x)


class Expert(nn.Module):
    """One routed expert: an unsharded SwiGLU MLP living entirely on one rank."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, fp8_block: int | None) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, dtype, fp8_block)
        self.up_proj = Linear(dim, inter_dim, dtype, fp8_block)
        self.down_proj = Linear(inter_dim, dim, dtype, fp8_block)
        self.gate_up: FusedLinears | None = None

    fuse_for_cpu = MLP.fuse_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _swiglu(self, x)


def _swiglu(mlp: MLP | Expert, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), with gate and up as one GEMM once fused."""
    gate, up = mlp.gate_up(x) if mlp.gate_up is not None else (mlp.gate_proj(x), mlp.up_proj(x))
    return mlp.down_proj(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: scores experts, restricts to the best groups, picks top-k, returns their weights.

    `e_score_correction_bias` (V3) shifts the scores used for *selection* only; the weights come
    from the unbiased scores (normalised over the chosen k when `norm_topk_prob`), times
    `routed_scaling_factor`.

    Scores are computed in float32 (as DeepSeek-V3's reference does); the weight is held in float32
    from load on (the stored bf16 values, exactly), so no call copies it. It is `n_routed_experts ×
    dim` per MoE layer: 7 MB at V3's size.
    """

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
        logits = F.linear(x.float(), self.weight)
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        indices = self.select(scores.detach())
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
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
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self.expert_plan: RowPlan | None = None  # eager CPU: "loop" or "dense" per token count
        # FP8 experts after `stack_fp8`: projection name -> (weights [E, out, in] fp8, scales [E, out/b, in/b])
        self.fp8_stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def stack_fp8(self) -> None:
        """After load, for FP8 experts: stack the local experts' gate, up and down weights and
        their block scales (`[E, out, in]` float8_e4m3fn, `[E, ceil(out/b), ceil(in/b)]` float32), so
        every routed projection runs as one grouped GEMM over all local experts
        (`kernels.grouped_fp8_gemm`). Each expert's parameters become views of its slice, so no
        memory is added and names are unchanged."""
        experts = [self.experts[str(e)] for e in self.local_experts]
        if not experts or experts[0].gate_proj.weight_scale_inv is None:
            return
        stacked = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            linears = [getattr(x, name) for x in experts]
            w = torch.stack([lin.weight.detach() for lin in linears])
            s = torch.stack([lin.weight_scale_inv.detach() for lin in linears])
            for lin, w_e, s_e in zip(linears, w, s):
                lin.weight.data, lin.weight_scale_inv.data = w_e, s_e
            stacked[name] = (w, s)
        self.fp8_stacked = stacked

    def fuse_for_cpu(self) -> None:
        """Stack the local experts' weights (unquantised ones) for `_routed_static`: gate and up as
        `[E, 2·I, dim]`, down as `[E, dim, I]`. Each expert's parameters become views of its slice
        (and its gate/up run as one GEMM), so no memory is added and names are unchanged."""
        experts = [self.experts[str(e)] for e in self.local_experts]
        linears = [lin for x in experts for lin in (x.gate_proj, x.up_proj, x.down_proj)]
        if not FusedLinears.possible(linears):
            return
        w = experts[0].gate_proj.weight
        gate_up = torch.empty(len(experts), 2 * w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        down = torch.stack([x.down_proj.weight.detach() for x in experts])
        for x, gu, d in zip(experts, gate_up, down):
            x.gate_up = FusedLinears([x.gate_proj, x.up_proj], storage=gu)
            x.down_proj.weight.data = d
            x.down_proj.prepare_cpu()
        self.stacked = (gate_up, down)

    def tune_cpu(self, tuner: GemmTuner) -> None:
        """Choose, by timing on this machine per token count, how eager CPU calls run the experts
        (`RowPlan` over `EXPERT_FORMULATIONS`): "loop" (each chosen expert on its tokens) or
        "dense" (every local expert on every token as two batched GEMMs, mixed by the routing
        weights: more FLOPs, far fewer dispatched ops). Only for stacked (unquantised) experts."""
        if self.stacked is None:
            return
        gate_up, down = self.stacked
        dim = gate_up.shape[-1]
        name = f"moe {gate_up.shape[0]}x{down.shape[-1]}x{dim} top{self.gate.topk} {gate_up.dtype}"

        def timer(candidates: tuple[str, ...], rows: int) -> dict[str, float]:
            x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows)).to(gate_up.dtype)
            with torch.inference_mode():
                return interleaved_seconds({c: (lambda c=c: self._routed_local(x, *self.gate(x), c))
                                            for c in candidates})

        self.expert_plan = tuner.choose(name, EXPERT_FORMULATIONS, "loop", timer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., dim]` → `[..., dim]` (compiled: `_routed_static`; eager: the plan's formulation)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if torch.compiler.is_compiling() and self.stacked is not None:
            weights, indices = self.gate(flat)
            return self._routed_static(flat, weights, indices).view(shape)
        plan = self.expert_plan
        return self._eager(flat, plan.for_rows(flat.shape[0]) if plan else "loop").view(shape)

    def _eager(self, flat: torch.Tensor, formulation: str) -> torch.Tensor:
        """flat `[N, dim]` through the experts by `formulation` ("loop" or "dense", see `tune_cpu`):
        this rank's routed sum, summed over ranks, plus the shared experts."""
        routed = self._routed_local(flat, *self.gate(flat), formulation)
        if self.ctx.world_size > 1:
            routed = self.ctx.all_reduce(routed if routed is not None else torch.zeros_like(flat))
        if self.shared_experts is None:
            return routed if routed is not None else torch.zeros_like(flat)
        shared = self.shared_experts(flat)
        return shared if routed is None else routed + shared

    def _routed_local(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                      formulation: str) -> torch.Tensor | None:
        """This rank's routed-expert sum `[N, dim]` before the sum over ranks, so it can be timed on
        its own (`tune_cpu`: no collectives, whose call counts would differ between ranks); None
        when a single token chose no local expert.

        "loop": routed slots (token, choice) are sorted by expert, so each local expert runs once on
        a contiguous slice of gathered tokens and one `index_add_` scatters all results back; a
        single token skips the sort (`_one_token`). "dense": `_routed_dense`. FP8 experts stacked
        by `stack_fp8` always run grouped (`_routed_grouped`)."""
        if self.fp8_stacked is not None:
            return self._routed_grouped(flat, weights, indices)
        if formulation == "dense" and self.stacked is not None:
            return self._routed_dense(flat, weights, indices)
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

    def _routed_grouped(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """This rank's routed-expert sum `[N, dim]` for FP8 experts: each projection is one grouped
        FP8 GEMM over all routed slots (token, choice), rows of other ranks' experts giving zeros;
        shapes and launches never depend on the routing and nothing is read back to the host (with
        the Triton kernels). Same maths as each expert's `fp8_linear` on its tokens."""
        n, k = indices.shape
        block = self.experts[str(self.local_experts.start)].gate_proj.fp8_block
        (gate_w, gate_s), (up_w, up_s), (down_w, down_s) = (self.fp8_stacked[p] for p in
                                                             ("gate_proj", "up_proj", "down_proj"))
        expert_ids = (indices - self.local_experts.start).flatten()  # outside [0, E): another rank's
        xq, xs = kernels.act_quant(flat, block_size=block)  # each token quantised once, then per slot
        slot_token = torch.arange(n, device=flat.device).repeat_interleave(k)
        xq, xs = xq[slot_token], xs[slot_token]
        gate = kernels.grouped_fp8_gemm(xq, xs, gate_w, gate_s, expert_ids, flat.dtype, block_size=block)
        up = kernels.grouped_fp8_gemm(xq, xs, up_w, up_s, expert_ids, flat.dtype, block_size=block)
        hq, hs = kernels.act_quant(F.silu(gate) * up, block_size=block)
        y = kernels.grouped_fp8_gemm(hq, hs, down_w, down_s, expert_ids, flat.dtype, block_size=block)
        return (y.view(n, k, -1) * weights.to(flat.dtype).unsqueeze(-1)).sum(dim=1)

    def _one_token(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """The single-token case (batch-1 decode, one draft step) without sorting or scattering: this
        rank's routed sum, or None when the token chose no local expert."""
        routed = None
        for e, w in zip(indices[0].tolist(), weights[0].to(flat.dtype).unbind()):
            if e in self.local_experts:
                y = self.experts[str(e)](flat) * w
                routed = y if routed is None else routed + y
        return routed

    def _routed_dense(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """This rank's routed-expert sum for flat `[N, dim]`: every local expert on every token (two
        batched GEMMs over the stacked weights), mixed by the (mostly zero) routing weights."""
        gate_up, down = self.stacked
        n_local, inter = gate_up.shape[0], down.shape[-1]
        local = indices - self.local_experts.start
        is_local = (local >= 0) & (local < n_local)
        w = weights.masked_fill(~is_local, 0.0).to(flat.dtype)
        h = torch.matmul(flat, gate_up.transpose(1, 2))  # [E, N, 2I]
        y = torch.matmul(F.silu(h[..., :inter]) * h[..., inter:], down.transpose(1, 2))  # [E, N, dim]
        mix = torch.zeros(flat.shape[0], n_local, dtype=flat.dtype, device=flat.device)
        mix.scatter_add_(1, local.clamp(0, n_local - 1), w)
        return torch.einsum("end,ne->nd", y, mix)

    def _routed_static(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """All experts (shared + routed) for `flat` `[N, dim]` with shapes that never depend on the
        routing, as `torch.compile` needs: while the copies fit in `GATHER_MAX_BYTES`, each routed
        slot (token, choice) gathers its expert's stacked weights and applies them by batched GEMMs;
        beyond that, every local expert runs on every token and the results are mixed by the
        (mostly zero) routing weights. `GATHER_MAX_BYTES` has the measurements.
        """
        gate_up, down = self.stacked
        n_local, inter = gate_up.shape[0], down.shape[-1]
        n, k = indices.shape
        local = indices - self.local_experts.start
        is_local = (local >= 0) & (local < n_local)
        local = local.clamp(0, n_local - 1)
        w = weights.masked_fill(~is_local, 0.0).to(flat.dtype)
        expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
        if n * k * expert_bytes <= GATHER_MAX_BYTES:
            chosen = local.flatten()
            h = torch.bmm(gate_up[chosen], flat.repeat_interleave(k, dim=0).unsqueeze(-1)).squeeze(-1)
            y = torch.bmm(down[chosen], (F.silu(h[:, :inter]) * h[:, inter:]).unsqueeze(-1)).squeeze(-1)
            routed = (y.view(n, k, -1) * w.unsqueeze(-1)).sum(dim=1)
        else:
            routed = self._routed_dense(flat, weights, indices)
        self.ctx.all_reduce(routed)
        return routed if self.shared_experts is None else routed + self.shared_experts(flat)
