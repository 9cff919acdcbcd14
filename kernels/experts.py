"""Routed experts run over stacked weights: one call for all of a rank's experts, whatever the routing.

A MoE layer's reference computation (`model.moe.MoE.routed_local`) sorts the routed slots (token,
choice) by expert and runs each expert on its tokens: few FLOPs, but a host read of the counts and
one dispatch per expert. These formulations run every local expert's projections together over
weights stacked `[E, …]` after load (`model.prepare`), each for a different backend:

- `grouped_fp8`: FP8 experts, one grouped GEMM per projection over all slots (`kernels.grouped_fp8_gemm`).
- `every_expert`: every local expert on every token as two batched GEMMs, mixed by the (mostly zero)
  routing weights: more FLOPs, far fewer dispatched ops (eager CPU, chosen by timing per row count).
- `gathered`: each slot gathers its expert's weights and applies them as batched GEMVs; shapes never
  depend on the routing, as `torch.compile` needs (beyond `GATHER_MAX_BYTES`, `every_expert`).
- `grouped`: unquantised experts, the slots sorted by expert on the device and each projection one
  grouped GEMM (`torch.nn.functional.grouped_mm`) with the group ends computed on the device:
  the routed FLOPs only, no host read, one launch per projection (CUDA; tuned on the CPU).

Arguments shared by all: `flat` `[N, dim]` tokens; `weights` `[N, k]` float32 routing weights;
`indices` `[N, k]` int64 global expert ids; `first` the id of this rank's first local expert
(the local ones are `first … first + E - 1`, slots routed elsewhere contribute nothing). Each
returns this rank's routed sum `[N, dim]` in flat's dtype, before the sum over ranks; the same
maths as the reference, summed in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch

GATHER_MAX_BYTES = 1 << 30
"""`gathered` gathers each routed slot's expert weights while the gathered copies (slots × one
expert's gate/up/down bytes) fit in this many bytes, and runs every expert on every token beyond it.

Measured on the embedded model (8 experts, top-2, 491 KB of float32 weights per expert; 2-core
CPU; the compiled verifier, each pair in one process, calls interleaved, median of 30): gathering
does the routed FLOPs (as batched GEMVs), running every expert does 4× them (as GEMMs), and
gathering was faster at every size tried, 16 to 2,048 slots. Batch 8: 14.1 → 12.0 ms for 2 tokens
per row (32 slots), 20.6 → 16.5 ms for 4 (64 slots), 36.2 → 29.9 ms for 8, 229 → 200 ms for 64;
batch 16 × 64 tokens (2,048 slots, 1 GiB gathered per layer): 492 → 425 ms. The cap keeps the
copies of larger experts (or longer calls) bounded; compiled calls hold at most 64 tokens per row.
"""


def _local(weights: torch.Tensor, indices: torch.Tensor, first: int, n_local: int,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(local expert index `[N, k]` clamped into 0..E-1, routing weights `[N, k]` in `dtype` with the
    slots of other ranks' experts zeroed)."""
    local = indices - first
    is_local = (local >= 0) & (local < n_local)
    return local.clamp(0, n_local - 1), weights.masked_fill(~is_local, 0.0).to(dtype)


def every_expert(flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, first: int,
                 gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Every local expert on every token, mixed by the routing weights. gate_up `[E, 2·I, dim]`
    (gate rows first), down `[E, dim, I]`."""
    n_local, inter = gate_up.shape[0], down.shape[-1]
    local, w = _local(weights, indices, first, n_local, flat.dtype)
    h = torch.matmul(flat, gate_up.transpose(1, 2))  # [E, N, 2I]
    y = torch.matmul(F.silu(h[..., :inter]) * h[..., inter:], down.transpose(1, 2))  # [E, N, dim]
    mix = torch.zeros(flat.shape[0], n_local, dtype=flat.dtype, device=flat.device)
    mix.scatter_add_(1, local, w)
    return torch.einsum("end,ne->nd", y, mix)


def gathered(flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, first: int,
             gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each slot's expert weights gathered and applied by batched GEMVs while the copies fit in
    `GATHER_MAX_BYTES`, else `every_expert`. Stacks as in `every_expert`."""
    n, k = indices.shape
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    if n * k * expert_bytes > GATHER_MAX_BYTES:
        return every_expert(flat, weights, indices, first, gate_up, down)
    inter = down.shape[-1]
    local, w = _local(weights, indices, first, gate_up.shape[0], flat.dtype)
    chosen = local.flatten()
    h = torch.bmm(gate_up[chosen], flat.repeat_interleave(k, dim=0).unsqueeze(-1)).squeeze(-1)
    y = torch.bmm(down[chosen], (F.silu(h[:, :inter]) * h[:, inter:]).unsqueeze(-1)).squeeze(-1)
    return (y.view(n, k, -1) * w.unsqueeze(-1)).sum(dim=1)


def grouped_fp8(flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, first: int,
                stacks: dict[str, tuple[torch.Tensor, torch.Tensor]], block: int) -> torch.Tensor:
    """FP8 experts: each projection one grouped FP8 GEMM over all routed slots, rows of other ranks'
    experts giving zeros; shapes and launches never depend on the routing and nothing is read back
    to the host (with the Triton kernels). `stacks`: "gate_proj" / "up_proj" / "down_proj" →
    (weights `[E, out, in]` float8_e4m3fn, block scales `[E, ceil(out/b), ceil(in/b)]` float32).
    Same maths as each expert's `fp8_linear` on its tokens."""
    n, k = indices.shape
    (gate_w, gate_s), (up_w, up_s), (down_w, down_s) = (stacks[p] for p in ("gate_proj", "up_proj", "down_proj"))
    expert_ids = (indices - first).flatten()  # outside [0, E): another rank's
    xq, xs = dispatch.act_quant(flat, block_size=block)  # each token quantised once, then per slot
    slot_token = torch.arange(n, device=flat.device).repeat_interleave(k)
    xq, xs = xq[slot_token], xs[slot_token]
    gate = dispatch.grouped_fp8_gemm(xq, xs, gate_w, gate_s, expert_ids, flat.dtype, block_size=block)
    up = dispatch.grouped_fp8_gemm(xq, xs, up_w, up_s, expert_ids, flat.dtype, block_size=block)
    hq, hs = dispatch.act_quant(F.silu(gate) * up, block_size=block)
    y = dispatch.grouped_fp8_gemm(hq, hs, down_w, down_s, expert_ids, flat.dtype, block_size=block)
    return (y.view(n, k, -1) * weights.to(flat.dtype).unsqueeze(-1)).sum(dim=1)


def grouped(flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, first: int,
            gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each projection one grouped GEMM over the routed slots sorted by expert; stacks as in
    `every_expert`. The group ends come from a search over the sorted expert ids (no counts read
    back), and the results return to their slots by the inverse permutation and sum over the k
    choices in slot order (no atomic adds: the same bits every run). Slots routed to another
    rank's experts run through a clamped expert with weight 0."""
    n, k = indices.shape
    n_local, inter = gate_up.shape[0], down.shape[-1]
    local, w = _local(weights, indices, first, n_local, flat.dtype)
    expert_of = local.flatten()  # [n·k] slot s = token s // k, choice s % k
    order = expert_of.argsort(stable=True)
    ends = torch.searchsorted(expert_of[order], torch.arange(n_local, device=flat.device), right=True)
    ends = ends.to(torch.int32)
    x = flat[order // k]  # [n·k, dim] the slots' tokens, grouped by expert
    h = F.grouped_mm(x, gate_up.transpose(1, 2), offs=ends)  # [n·k, 2I]
    y = F.grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], down.transpose(1, 2), offs=ends)
    y = y[order.argsort()]  # back to slot order
    return (y.view(n, k, -1) * w.unsqueeze(-1)).sum(dim=1)
