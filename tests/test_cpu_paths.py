"""The CPU fast paths compute the same maths as the plain formulations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec.kernels.cpu_gemm import FORMULATIONS, ROW_BUCKETS, RowPlan
from specdec.model.args import from_hf_config
from specdec.model.moe import MoE
from specdec.model.parallel import Linear, ParallelContext, RMSNorm
from specdec.model.prepare import prepare_cpu
from specdec.model.rope import apply_rope, rope_tables, rotate
from specdec.model.synthetic import small_config


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_cpu_linear_equals_f_linear(rows, formulation):
    g = torch.Generator().manual_seed(rows)
    lin = Linear(48, 72, torch.float32)
    lin.weight.data = torch.randn(72, 48, generator=g)
    x = torch.randn(rows, 1, 48, generator=g)
    assert lin.gemm_plan is None  # not prepared: the generic path
    expected = F.linear(x, lin.weight)
    torch.testing.assert_close(lin(x), expected)
    lin.prepare_cpu(RowPlan((formulation,) * len(ROW_BUCKETS)))
    assert (lin.weight_copy is not None) == (formulation == "x_wcopy")
    got = lin(x)
    assert got.shape == (rows, 1, 72) and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x, out_features=30), expected[..., :30], rtol=1e-5, atol=1e-5)


def test_rotate_equals_apply_rope():
    args = from_hf_config(small_config())
    cos, sin = rope_tables(args, 40)
    pos = torch.tensor([[3, 17, 39], [0, 1, 2]])
    q = torch.randn(2, 3, 4, 96, generator=torch.Generator().manual_seed(0))[..., 64:]  # a strided slice, as in MLA
    expected = apply_rope(q, cos[pos], sin[pos])
    torch.testing.assert_close(rotate(q, torch.complex(cos, sin)[pos]), expected, rtol=1e-6, atol=1e-6)
    odd = torch.randn(2, 3, 4, 33)[..., 1:]  # odd storage offset: rotate copies it first
    torch.testing.assert_close(rotate(odd, torch.complex(cos, sin)[pos]), apply_rope(odd, cos[pos], sin[pos]),
                               rtol=1e-6, atol=1e-6)


def test_rmsnorm_fast_path_equals_float_path():
    norm = RMSNorm(64, 1e-6, torch.float32)
    norm.weight.data = torch.rand(64) + 0.5
    x = torch.randn(3, 5, 64)
    x64 = x.double()
    ref = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()).float()
    torch.testing.assert_close(norm(x), ref, rtol=1e-6, atol=1e-6)


def random_moe(seed: int) -> MoE:
    """An MoE layer of the small config with random weights, prepared for the CPU."""
    torch.manual_seed(seed)
    moe = MoE(from_hf_config(small_config()), ParallelContext(), torch.float32, None)
    for p in moe.parameters():
        p.data = torch.randn_like(p) * 0.1
    prepare_cpu(moe)
    return moe


def test_moe_single_token_path_equals_batched_path():
    moe = random_moe(0)
    args = from_hf_config(small_config())
    tokens = torch.randn(5, 1, args.dim)
    with torch.inference_mode():
        batched = moe(tokens.view(1, 5, args.dim))[0]
        one_by_one = torch.cat([moe(tokens[i : i + 1]) for i in range(5)]).view(5, args.dim)
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_moe_expert_formulations_agree(tokens):
    moe = random_moe(1)
    x = torch.randn(tokens, moe.gate.weight.shape[1])
    with torch.inference_mode():
        weights, indices = moe.gate(x)
        loop, dense, grouped = (moe.routed_backend.run(x, weights, indices, f) for f in ("loop", "dense", "grouped"))
    torch.testing.assert_close(dense, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)


def test_fused_linears_share_storage_and_match_the_parts():
    from specdec.model.moe import MLP

    mlp = MLP(48, 80, ParallelContext(), torch.float32, None)
    g = torch.Generator().manual_seed(3)
    for p in mlp.parameters():
        p.data = torch.randn(p.shape, generator=g)
    x = torch.randn(3, 48, generator=g)
    expected = mlp.down_proj(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight))
    names = sorted(mlp.state_dict())
    prepare_cpu(mlp)
    assert mlp.gate_up is not None and sorted(mlp.state_dict()) == names  # checkpoint names unchanged
    fused = mlp.gate_up.weight
    assert mlp.gate_proj.weight.data_ptr() == fused.data_ptr()  # views, no second copy
    assert mlp.up_proj.weight.data_ptr() == fused[80:].data_ptr()
    for rows in (1, 3):
        torch.testing.assert_close(mlp(x[:rows]), expected[:rows], rtol=1e-4, atol=1e-3)  # outputs are O(100)


@pytest.mark.parametrize("first", [0, 3])
def test_grouped_experts_equal_the_sorted_loop_with_uneven_and_empty_experts(first):
    """`kernels.experts.grouped` (grouped GEMMs over slots sorted on the device) against the
    reference loop: experts crowded, empty, and (first = 3) slots routed to another rank's experts."""
    from specdec.kernels import experts

    moe = random_moe(2)
    stacked = moe.routed_backend
    n_local = stacked.gate_up.shape[0] - first
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, moe.gate.weight.shape[1], generator=g)
    weights = torch.rand(9, 2, generator=g)
    indices = torch.tensor([[2, 5], [2, 0], [2, 5], [5, 2], [0, 2], [2, 7], [7, 5], [2, 0], [5, 7]])  # 1, 3, 4, 6 empty
    with torch.inference_mode():
        got = experts.grouped(x, weights, indices, first, stacked.gate_up[first:], stacked.down[first:])
        local = (indices >= first).float()
        want = experts.every_expert(x, weights * local, indices, first, stacked.gate_up[first:],
                                    stacked.down[first:])
        if first == 0:
            torch.testing.assert_close(got, stacked.run(x, weights, indices, "loop"), rtol=1e-5, atol=1e-5)
    assert n_local > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_grouped_experts_backend_is_one_graph_and_equals_the_loop():
    """`GroupedExperts` (installed for unquantised bfloat16 experts on CUDA) built here on the CPU:
    the experts' weights become views of its stacks, its routed sum equals the layer's reference
    loop, and the whole MoE layer traces into one graph with it (no host read of the routing)."""
    from specdec.model.prepare import GroupedExperts

    torch.manual_seed(3)
    moe = MoE(from_hf_config(small_config()), ParallelContext(), torch.bfloat16, None)
    for p in moe.parameters():
        p.data = (torch.randn_like(p, dtype=torch.float32) * 0.1).to(p.dtype)
    x = torch.randn(2, 6, moe.gate.weight.shape[1]).to(torch.bfloat16)
    with torch.inference_mode():
        want = moe(x)
        assert not GroupedExperts.applies(moe)  # CPU: not installed by prepare_loaded
        moe.routed_backend = GroupedExperts(moe)
        first = moe.experts[str(moe.local_experts.start)]
        assert first.up_proj.weight.data_ptr() == moe.routed_backend.gate_up[0, first.gate_proj.weight.shape[0]:].data_ptr()
        got = moe(x)
        torch._dynamo.reset()
        traced = torch.compile(moe, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(traced, got)
