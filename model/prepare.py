"""Transforms applied to a loaded model: how it runs on this backend, not what it computes.

The model modules (`model.mla`, `model.moe`, `model.parallel`) hold the architecture with its
reference computation; after loading, these transforms choose faster forms of the same maths:

- `prepare_loaded` (every device): FP8 `kv_b_proj` dequantised once for the absorbed attention
  (`MLA.absorb_once`); routed experts stacked for grouped GEMMs: FP8 ones (`GroupedFP8Experts`),
  unquantised bfloat16 ones on CUDA (`GroupedExperts`); neither reads the routing back to the host.
- `prepare_cpu` (CPU): linears that read the same input fused into one GEMM (`FusedLinears`: MLA's
  q_a/kv_a, every SwiGLU's gate/up); unquantised routed experts stacked (`StackedExperts`: timed
  eager formulations, the static one `torch.compile` needs); a GEMM formulation per weight shape
  and row count, and the experts' formulation per token count, timed on this machine by a tuner.
- `prepare_batch_invariant` (instead of `prepare_cpu`): every matmul, norm, router score, SwiGLU
  and attention through batch-invariant kernels (`kernels.invariant`: Triton's fixed tiles on CUDA,
  one torch call per row elsewhere), routed experts summed in choice order (`InvariantExperts`), so
  a token's logits are bitwise the same whether it is decoded alone or verified among N drafts.

Stacking and fusing make each parameter a view of its slice of the stack, so no memory is added
and every parameter keeps its checkpoint name and shape.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.kernels import experts as expert_kernels
from specdec.kernels import invariant
from specdec.kernels.cpu_gemm import GemmTuner, RowPlan, interleaved_seconds
from specdec.model.errors import ConfigError
from specdec.model.mla import MLA
from specdec.model.moe import MLP, Expert, Gate, MoE
from specdec.model.parallel import FusedLinears, Linear, RMSNorm, sum_in_order

EXPERT_FORMULATIONS = ("loop", "dense", "grouped")
"""How eager CPU calls run stacked routed experts (`StackedExperts.tune` times them per token count):
"loop" (`MoE.routed_local`: each chosen expert on its tokens), "dense" (`kernels.experts.every_expert`)
or "grouped" (`kernels.experts.grouped`: grouped GEMMs over the slots sorted by expert)."""


class GroupedFP8Experts:
    """A MoE layer's FP8 routed experts run as one grouped GEMM per projection over all local experts
    (`kernels.experts.grouped_fp8`). Built after load: the local experts' gate, up and down weights
    and block scales are stacked (`[E, out, in]` float8_e4m3fn, `[E, ceil(out/b), ceil(in/b)]`
    float32) and each expert's parameters become views of its slice."""

    def __init__(self, moe: MoE) -> None:
        experts = [moe.experts[str(e)] for e in moe.local_experts]
        self.first, self.block = moe.local_experts.start, experts[0].gate_proj.fp8_block
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            linears = [getattr(x, name) for x in experts]
            w = torch.stack([lin.weight.detach() for lin in linears])
            s = torch.stack([lin.weight_scale_inv.detach() for lin in linears])
            for lin, w_e, s_e in zip(linears, w, s):
                lin.weight.data, lin.weight_scale_inv.data = w_e, s_e
            self.stacks[name] = (w, s)

    @staticmethod
    def applies(moe: MoE) -> bool:
        return len(moe.local_experts) > 0 and moe.experts[str(moe.local_experts.start)].gate_proj.weight_scale_inv is not None

    def __call__(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return expert_kernels.grouped_fp8(flat, weights, indices, self.first, self.stacks, self.block)


class GroupedExperts:
    """A MoE layer's unquantised routed experts on CUDA run as one grouped GEMM per projection
    (`kernels.experts.grouped`: routing sorted on the device, no host read). Built after load: the
    local experts' gate and up weights stacked `[E, 2·I, dim]` (gate rows first) and down weights
    `[E, dim, I]`, each expert's parameters becoming views of its slice."""

    def __init__(self, moe: MoE) -> None:
        experts = [moe.experts[str(e)] for e in moe.local_experts]
        w = experts[0].gate_proj.weight
        inter = w.shape[0]
        self.gate_up = torch.empty(len(experts), 2 * inter, w.shape[1], dtype=w.dtype, device=w.device)
        self.down = torch.empty(len(experts), w.shape[1], inter, dtype=w.dtype, device=w.device)
        for x, gu, d in zip(experts, self.gate_up, self.down):
            for lin, stacked in ((x.gate_proj, gu[:inter]), (x.up_proj, gu[inter:]), (x.down_proj, d)):
                stacked.copy_(lin.weight.detach())
                lin.weight.data = stacked
        self.first = moe.local_experts.start

    @staticmethod
    def applies(moe: MoE) -> bool:
        """Unquantised bfloat16 experts on CUDA (`torch.nn.functional.grouped_mm`'s CUDA kernels)."""
        if len(moe.local_experts) == 0:
            return False
        lin = moe.experts[str(moe.local_experts.start)].gate_proj
        return (lin.weight_scale_inv is None and lin.weight.device.type == "cuda"
                and lin.weight.dtype == torch.bfloat16)

    def __call__(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return expert_kernels.grouped(flat, weights, indices, self.first, self.gate_up, self.down)


class StackedExperts:
    """A MoE layer's unquantised routed experts over stacked weights (CPU): gate and up `[E, 2·I, dim]`
    (each expert's gate/up then run as one GEMM), down `[E, dim, I]`, each expert's parameters views
    of its slice. Compiled forwards run `kernels.experts.gathered` (shapes independent of the
    routing); eager ones the formulation `plan` gives for the token count (`EXPERT_FORMULATIONS`),
    "loop" until `tune` measured."""

    def __init__(self, moe: MoE) -> None:
        experts = [moe.experts[str(e)] for e in moe.local_experts]
        w = experts[0].gate_proj.weight
        self.gate_up = torch.empty(len(experts), 2 * w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        self.down = torch.stack([x.down_proj.weight.detach() for x in experts])
        for x, gu, d in zip(experts, self.gate_up, self.down):
            x.gate_up = FusedLinears([x.gate_proj, x.up_proj], storage=gu)
            x.down_proj.weight.data = d
            x.down_proj.prepare_cpu()
        self.first, self.loop, self.gate = moe.local_experts.start, moe.routed_local, moe.gate
        self.plan: RowPlan | None = None

    @staticmethod
    def applies(moe: MoE) -> bool:
        experts = [moe.experts[str(e)] for e in moe.local_experts]
        return len(experts) > 0 and FusedLinears.possible(
            [lin for x in experts for lin in (x.gate_proj, x.up_proj, x.down_proj)])

    def __call__(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling():
            return expert_kernels.gathered(flat, weights, indices, self.first, self.gate_up, self.down)
        return self.run(flat, weights, indices, self.plan.for_rows(flat.shape[0]) if self.plan else "loop")

    def run(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
            formulation: str) -> torch.Tensor | None:
        """This rank's routed sum by `formulation` (one of `EXPERT_FORMULATIONS`)."""
        if formulation == "dense":
            return expert_kernels.every_expert(flat, weights, indices, self.first, self.gate_up, self.down)
        if formulation == "grouped":
            return expert_kernels.grouped(flat, weights, indices, self.first, self.gate_up, self.down)
        return self.loop(flat, weights, indices)

    def tune(self, tuner: GemmTuner) -> None:
        """Choose the eager formulation per token count by timing both on this machine (`RowPlan` over
        `EXPERT_FORMULATIONS`; the layer's own routed sum, no collectives, whose call counts would
        differ between ranks)."""
        dim = self.gate_up.shape[-1]
        name = f"moe {self.gate_up.shape[0]}x{self.down.shape[-1]}x{dim} top{self.gate.topk} {self.gate_up.dtype}"

        def timer(candidates: tuple[str, ...], rows: int) -> dict[str, float]:
            x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows)).to(self.gate_up.dtype)
            with torch.inference_mode():
                return interleaved_seconds({c: (lambda c=c: self.run(x, *self.gate(x), c)) for c in candidates})

        self.plan = tuner.choose(name, EXPERT_FORMULATIONS, "loop", timer)


class InvariantExperts:
    """A MoE layer's routed experts for the batch-invariant mode: each local expert runs on the tokens
    that chose it (its linears batch-invariant), and a token's weighted expert outputs are added in
    its choice order (`sum_in_order`), so neither the number of tokens nor which experts the other
    tokens chose changes a token's bits. Reads the routing back to the host (one `nonzero` per expert)."""

    def __init__(self, moe: MoE) -> None:
        self.experts = {e: moe.experts[str(e)] for e in moe.local_experts}

    def __call__(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """This rank's routed sum `[N, dim]`: flat `[N, dim]`, weights / indices `[N, k]` from the gate."""
        per_choice = flat.new_zeros(indices.shape[1], *flat.shape)  # [k, N, dim]: choice j of each token
        for e, expert in self.experts.items():
            token, choice = (indices == e).nonzero(as_tuple=True)
            if token.numel():
                per_choice[choice, token] = expert(flat[token]) * weights[token, choice].unsqueeze(1).to(flat.dtype)
        return sum_in_order(per_choice.unbind(0))


def prepare_batch_invariant(module: nn.Module, impl: str = "auto") -> None:
    """Put `module` in the batch-invariant mode (after `prepare_loaded`; in place of `prepare_cpu`):
    linears, norms, router scores, SwiGLUs and attention run the kernels `kernels.invariant.select`
    gives for `impl` on the module's device (FP8 linears their `fp8_linear`), MoE layers
    `InvariantExperts`. Raises ConfigError when those kernels cannot run there."""
    device = next(module.parameters()).device
    try:
        kernels = invariant.select(impl, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for sub in module.modules():
        if isinstance(sub, (Linear, RMSNorm, MLA, Gate, MLP, Expert)):
            sub.invariant = kernels
        if isinstance(sub, MoE):
            sub.routed_backend = InvariantExperts(sub)


def prepare_backend(module: nn.Module, device: torch.device | str, tuner: GemmTuner | None,
                    heads: tuple[Linear, ...] = (), batch_invariant: str | None = None) -> None:
    """Every transform a freshly loaded module gets: `prepare_loaded`, then `prepare_batch_invariant`
    with the kernels `batch_invariant` names ("auto", "torch", "triton"; None: off), else on the CPU
    `prepare_cpu` (`tuner`, `heads`: see there). The batch-invariant mode runs its own routed experts
    (`InvariantExperts`), so the grouped-GEMM stacks are not built for it."""
    prepare_loaded(module, stack_experts=batch_invariant is None)
    if batch_invariant is not None:
        prepare_batch_invariant(module, batch_invariant)
    elif torch.device(device).type == "cpu":
        prepare_cpu(module, tuner, heads)


def prepare_loaded(module: nn.Module, stack_experts: bool = True) -> None:
    """Work done once after loading, on every device: FP8 `kv_b_proj` dequantised for the absorbed
    attention (`MLA.absorb_once`); with `stack_experts`, routed experts stacked for grouped GEMMs,
    FP8 ones (`GroupedFP8Experts`) and unquantised bfloat16 ones on CUDA (`GroupedExperts`)."""
    for sub in module.modules():
        if isinstance(sub, MLA):
            sub.absorb_once()
        elif isinstance(sub, MoE) and stack_experts:
            if GroupedFP8Experts.applies(sub):
                sub.routed_backend = GroupedFP8Experts(sub)
            elif GroupedExperts.applies(sub):
                sub.routed_backend = GroupedExperts(sub)


def _fuse_for_cpu(module: nn.Module) -> None:
    """Fuse the linears that read the same input (unquantised ones): MLA's q_a_proj and
    kv_a_proj_with_mqa, each SwiGLU's gate_proj and up_proj; stack each MoE's routed experts
    (`StackedExperts`, which fuses theirs in its stack)."""
    for sub in module.modules():
        if isinstance(sub, MoE) and sub.routed_backend is None and StackedExperts.applies(sub):
            sub.routed_backend = StackedExperts(sub)
    for sub in module.modules():
        if isinstance(sub, MLA) and hasattr(sub, "q_a_proj"):
            parts = [sub.q_a_proj, sub.kv_a_proj_with_mqa]
            if sub.q_kv_a is None and FusedLinears.possible(parts):
                sub.q_kv_a = FusedLinears(parts)
        elif isinstance(sub, (MLP, Expert)):
            parts = [sub.gate_proj, sub.up_proj]
            if sub.gate_up is None and FusedLinears.possible(parts):
                sub.gate_up = FusedLinears(parts)


def prepare_cpu(module: nn.Module, tuner: GemmTuner | None = None, heads: tuple[Linear, ...] = ()) -> None:
    """Set up `module` for the CPU after loading: fuse (`_fuse_for_cpu`), then a GEMM plan for every
    unquantised linear layer and fused group, timed by `tuner` on this machine (None: the default
    formulation everywhere), then each stacked MoE's expert formulation (`StackedExperts.tune`).
    Layers in `heads` (vocabulary heads) may also get a transposed copy of their weight when the
    tuner finds it faster."""
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.prepare_cpu()
    _fuse_for_cpu(module)
    if tuner is None:
        return
    fused = [v for sub in module.modules() for v in vars(sub).values() if isinstance(v, FusedLinears)]
    parts = {id(p) for f in fused for p in f.parts}  # run through their group on the CPU
    for f in fused:
        f.plan = tuner.plan(*f.weight.shape)
    for sub in module.modules():
        if isinstance(sub, Linear) and sub.weight_scale_inv is None and id(sub) not in parts:
            out, inp = sub.weight.shape
            sub.prepare_cpu(tuner.plan(out, inp, allow_copy=any(sub is h for h in heads)))
    for sub in module.modules():
        if isinstance(sub, MoE) and isinstance(sub.routed_backend, StackedExperts):
            sub.routed_backend.tune(tuner)
    tuner.save()
