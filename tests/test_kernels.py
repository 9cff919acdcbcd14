"""Tests for `kernels/`: FP8 block quantisation.

1. Torch references against straightforward float maths (loops over blocks, float64 matmul).
2. Triton kernels, run by the Triton interpreter on CPU, against the references. The
   interpreter must be switched on before any kernel is defined, so those checks run in one
   fresh subprocess (`python tests/test_kernels.py` with TRITON_INTERPRET=1) and report back
   as JSON; each check is then asserted by its own test.
3. Dispatch rules for `impl`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from specdec import kernels
from tests.interpreter_harness import main as interpreter_main
from tests.interpreter_harness import results_in_interpreter
from specdec.kernels import reference as ref

REPO = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn
B = 128


# ----------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw uint8 codes of an fp8 tensor (bitwise comparison, NaN-safe)."""
    return t.view(torch.uint8)


def wide_range(*shape: int, seed: int = 0) -> torch.Tensor:
    """float32 values whose magnitudes span ~1e-7..1e3, so groups differ in scale and hit fp8 subnormals."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp2(torch.empty(shape).uniform_(-24, 10, generator=g))
    return torch.randn(shape, generator=g) * mags


def tie_rows() -> torch.Tensor:
    """Rows whose amax is 448 (so the scale is exactly 1) holding every fp8 code, every midpoint
    between neighbouring codes (round-half-to-even cases, subnormals included) and their neighbours."""
    codes = torch.arange(127, dtype=torch.uint8).view(FP8).float()
    mids = (codes[:-1] + codes[1:]) / 2
    vals = torch.cat([codes, mids, mids.nextafter(torch.zeros(())), mids.nextafter(torch.full((), 1e9))])
    vals = torch.cat([vals, -vals])
    vals = torch.cat([vals, torch.zeros((-vals.numel()) % 127)]).reshape(-1, 127)
    return torch.cat([torch.full((vals.shape[0], 1), 448.0), vals], dim=1)


def loop_act_quant(x: torch.Tensor, block: int, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant written group by group, with the power-of-two rounding done in float64."""
    rows = x.reshape(-1, x.shape[-1]).float()
    k = rows.shape[1]
    kb = math.ceil(k / block)
    y = torch.empty(rows.shape, dtype=FP8)
    s = torch.empty(rows.shape[0], kb)
    for r in range(rows.shape[0]):
        for g in range(kb):
            seg = rows[r, g * block:(g + 1) * block]
            sc = torch.clamp(seg.abs().max(), min=1e-4) / 448.0
            if scale_fmt == "ue8m0":
                sc = torch.tensor(2.0 ** math.ceil(math.log2(float(sc))), dtype=torch.float32)
            y[r, g * block:(g + 1) * block] = (seg / sc).to(FP8)
            s[r, g] = sc
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], kb)


def loop_weight_dequant(w: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    """weight_dequant written tile by tile (float32)."""
    out = torch.empty(w.shape)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            tile = (slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block))
            out[tile] = w[tile].float() * s[bi, bj]
    return out


def fp8_error_bound(x: torch.Tensor, s_full: torch.Tensor) -> torch.Tensor:
    """Max |dequant(quant(x)) - x| for e4m3 with scale s: half an ulp, i.e. 2**-4 relative for normal
    codes and 2**-10 * s absolute in the subnormal range (plus float32 slack)."""
    return torch.maximum(x.abs() * 2.0**-4, s_full * 2.0**-10) * (1 + 1e-5)


# ------------------------------------------------------------- 1. reference correctness


@pytest.mark.parametrize("shape", [(2, 3, 300), (4, 128), (5, 130), (3, 64)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_reference_matches_group_loop(shape: tuple[int, ...], scale_fmt: str | None) -> None:
    x = wide_range(*shape)
    y, s = ref.act_quant(x, scale_fmt=scale_fmt)
    y_loop, s_loop = loop_act_quant(x, B, scale_fmt)
    assert y.dtype == FP8 and y.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(shape[-1] / B))
    assert torch.equal(s, s_loop)
    assert torch.equal(bits(y), bits(y_loop))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_reference_error_bound(scale_fmt: str | None) -> None:
    x = wide_range(3, 7, 300, seed=1)
    y, s = ref.act_quant(x, scale_fmt=scale_fmt)
    s_full = s.repeat_interleave(B, dim=-1)[..., :300]
    err = (y.float() * s_full - x).abs()
    assert (err <= fp8_error_bound(x, s_full)).all()
    if scale_fmt is None:  # every group's amax lands on the top code
        groups = torch.nn.functional.pad(y.float().abs(), (0, 84)).reshape(3, 7, 3, B)
        assert (groups.amax(-1) == 448.0).all()


def test_act_quant_reference_ties_and_zeros() -> None:
    x = tie_rows()
    y, s = ref.act_quant(x)
    assert (s == 1.0).all()
    assert torch.equal(bits(y), bits(x.to(FP8)))  # torch's cast rounds half to even
    y0, s0 = ref.act_quant(torch.zeros(2, 130))
    assert (y0.float() == 0).all()
    assert (s0 == torch.tensor(1e-4) / 448.0).all()


def test_act_quant_ue8m0_rounds_up_exactly() -> None:
    amax_exact = 448.0 * 2.0**-3  # amax / 448 is exactly 2**-3
    above = torch.tensor(2.0**-3).nextafter(torch.tensor(1.0)).item() * 448.0
    x = torch.zeros(4, B)
    x[0, 5] = amax_exact
    x[1, 7] = -above
    x[3, 0] = 448.0 * 3.0  # s = 3 -> 4
    y, s = ref.act_quant(x, scale_fmt="ue8m0")
    assert s[:, 0].tolist() == [2.0**-3, 2.0**-2, 2.0 ** math.ceil(math.log2(1e-4 / 448)), 4.0]
    assert y[0, 5].float() == 448.0 and y[1, 7].float() == -224.0 and y[3, 0].float() == 320.0


@pytest.mark.parametrize("shape", [(200, 300), (256, 128), (1, 129)])
def test_weight_dequant_reference_matches_tile_loop(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(shape, generator=g) * 100).to(FP8)
    s = torch.rand(math.ceil(shape[0] / B), math.ceil(shape[1] / B), generator=g) + 0.01
    expected = loop_weight_dequant(w, s, B)
    assert torch.equal(ref.weight_dequant(w, s), expected)
    assert torch.equal(ref.weight_dequant(w, s, out_dtype=torch.bfloat16), expected.to(torch.bfloat16))


def test_weight_dequant_rejects_wrong_scale_shape() -> None:
    w = torch.zeros(200, 300, dtype=FP8)
    with pytest.raises(ValueError, match="scale shape"):
        ref.weight_dequant(w, torch.ones(1, 3))


@pytest.mark.parametrize("shape", [(200, 300), (256, 128), (1, 1)])
def test_weight_quant_round_trip(shape: tuple[int, int]) -> None:
    w = wide_range(*shape, seed=3) * 1e-3
    w[:128, :128] = 0.0  # one all-zero tile
    w_fp8, s = ref.weight_quant(w)
    mb, nb = math.ceil(shape[0] / B), math.ceil(shape[1] / B)
    assert w_fp8.dtype == FP8 and w_fp8.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (mb, nb) and torch.isfinite(s).all() and (s > 0).all()
    back = ref.weight_dequant(w_fp8, s)
    s_full = ref.expand_block_scales(s, shape, B)
    assert ((back - w).abs() <= fp8_error_bound(w, s_full)).all()
    assert (back[:128, :128] == 0).all()
    tile_max = loop_weight_dequant(w_fp8, torch.ones(mb, nb), B).abs()
    for bi in range(mb):
        for bj in range(nb):
            tile = tile_max[bi * B:(bi + 1) * B, bj * B:(bj + 1) * B]
            assert tile.max() == (0.0 if bi == bj == 0 else 448.0)


@pytest.mark.parametrize(("a_shape", "n"), [((2, 5, 130), 300), ((7, 256), 128), ((130,), 200), ((3, 64), 17)])
def test_fp8_gemm_reference_matches_dequantised_matmul(a_shape: tuple[int, ...], n: int) -> None:
    k = a_shape[-1]
    a, a_s = ref.act_quant(wide_range(*a_shape, seed=4))
    b, b_s = ref.weight_quant(torch.randn(n, k, generator=torch.Generator().manual_seed(5)))
    a_deq = a.double() * a_s.double().repeat_interleave(B, dim=-1)[..., :k]
    expected = a_deq @ ref.weight_dequant(b, b_s).double().T
    c = ref.fp8_gemm(a, a_s, b, b_s)
    assert c.dtype == torch.float32 and c.shape == (*a_shape[:-1], n)
    torch.testing.assert_close(c.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert torch.equal(ref.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.bfloat16), c.to(torch.bfloat16))


def test_fp8_gemm_rejects_bad_operands() -> None:
    a, a_s = ref.act_quant(torch.randn(4, 130))
    b, b_s = ref.weight_quant(torch.randn(300, 130))
    with pytest.raises(ValueError, match="b_s shape"):
        ref.fp8_gemm(a, a_s, b, b_s[:1])
    with pytest.raises(ValueError, match="a_s shape"):
        ref.fp8_gemm(a, a_s[:, :1], b, b_s)
    with pytest.raises(ValueError, match="float8"):
        ref.fp8_gemm(a.float(), a_s, b, b_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_approximates_float_linear(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 200, generator=g).to(dtype)
    w = torch.randn(300, 200, generator=g)
    w_fp8, w_s = kernels.weight_quant(w)
    y = kernels.fp8_linear(x, w_fp8, w_s, impl="torch")
    exact = x.float() @ w.T
    assert y.dtype == dtype and y.shape == (2, 3, 300)
    assert (y.float() - exact).norm() / exact.norm() < 0.05
    assert kernels.fp8_linear(x, w_fp8, w_s, out_dtype=torch.float32, impl="torch").dtype == torch.float32


def test_grouped_fp8_gemm_reference_is_per_expert_fp8_gemm() -> None:
    """Each row is its expert's `fp8_gemm`; rows of experts outside [0, E) are zero; an expert
    with no rows is fine."""
    a, a_s, w, w_s, ids = _grouped_case(9, 3, 40, 70, ids=[2, 0, 2, -1, 2, 0, 3, 2, 2])
    got = kernels.grouped_fp8_gemm(a, a_s, w, w_s, ids, impl="torch")
    for s, e in enumerate(ids.tolist()):
        want = kernels.fp8_gemm(a[s:s + 1], a_s[s:s + 1], w[e], w_s[e], impl="torch")[0] if 0 <= e < 3 else 0 * got[s]
        assert torch.equal(got[s], want), f"row {s} (expert {e})"
    with pytest.raises(ValueError, match="w_s shape"):
        kernels.grouped_fp8_gemm(a, a_s, w, w_s[:1], ids, impl="torch")


# ------------------------------------------- 2. Triton kernels (interpreter subprocess)


def _check_act_quant() -> None:
    cases = [
        (wide_range(3, 5, 300), None),
        (wide_range(3, 5, 300), "ue8m0"),
        (wide_range(70, 256, seed=7).bfloat16(), None),
        (wide_range(2, 130, seed=8).half(), "ue8m0"),
        (tie_rows(), None),
        (torch.zeros(3, 7), None),
    ]
    for x, fmt in cases:
        y_t, s_t = kernels.act_quant(x, scale_fmt=fmt, impl="triton")
        y_r, s_r = kernels.act_quant(x, scale_fmt=fmt, impl="torch")
        assert torch.equal(s_t, s_r), f"scales differ for {tuple(x.shape)} {x.dtype} {fmt}"
        assert torch.equal(bits(y_t), bits(y_r)), f"fp8 codes differ for {tuple(x.shape)} {x.dtype} {fmt}"
    x = wide_range(4, 100, seed=9)
    for block in (32, 64):
        y_t, s_t = kernels.act_quant(x, block_size=block, impl="triton")
        y_r, s_r = kernels.act_quant(x, block_size=block, impl="torch")
        assert torch.equal(s_t, s_r) and torch.equal(bits(y_t), bits(y_r)), f"block_size={block}"


def _check_weight_dequant() -> None:
    for shape in [(200, 300), (256, 128), (1, 129)]:
        w_fp8, s = ref.weight_quant(wide_range(*shape, seed=10))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = kernels.weight_dequant(w_fp8, s, out_dtype=dtype, impl="triton")
            want = kernels.weight_dequant(w_fp8, s, out_dtype=dtype, impl="torch")
            assert got.dtype == dtype and torch.equal(got, want), f"{shape} {dtype}"


def _check_fp8_gemm() -> None:
    g = torch.Generator().manual_seed(11)
    for a_shape, n in [((2, 5, 130), 300), ((70, 256), 128), ((1, 64), 200), ((130,), 17)]:
        a, a_s = ref.act_quant(torch.randn(a_shape, generator=g))
        b, b_s = ref.weight_quant(torch.randn(n, a_shape[-1], generator=g))
        want = kernels.fp8_gemm(a, a_s, b, b_s, impl="torch")
        got = kernels.fp8_gemm(a, a_s, b, b_s, impl="triton")
        assert got.shape == want.shape and got.dtype == torch.float32, f"{a_shape} x {n}"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        got_bf16 = kernels.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.bfloat16, impl="triton")
        assert got_bf16.dtype == torch.bfloat16
        torch.testing.assert_close(got_bf16.float(), want, rtol=2.0**-8, atol=1e-5 * want.abs().max().item())


def _check_fp8_linear() -> None:
    x = torch.randn(3, 4, 200, generator=torch.Generator().manual_seed(12)).bfloat16()
    w_fp8, w_s = ref.weight_quant(torch.randn(300, 200))
    got = kernels.fp8_linear(x, w_fp8, w_s, out_dtype=torch.float32, impl="triton")
    want = kernels.fp8_linear(x, w_fp8, w_s, out_dtype=torch.float32, impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert kernels.fp8_linear(x, w_fp8, w_s, impl="triton").dtype == torch.bfloat16


def _grouped_case(rows: int, n_experts: int, n: int, k: int, ids: list[int] | None = None, seed: int = 0):
    """Operands of a grouped FP8 GEMM: `rows` slots over `n_experts` experts `[n, k]` (ids given,
    or random with some outside the range: experts of another rank)."""
    g = torch.Generator().manual_seed(seed)
    a, a_s = ref.act_quant(torch.randn(rows, k, generator=g))
    quantised = [ref.weight_quant(torch.randn(n, k, generator=g)) for _ in range(n_experts)]
    w, w_s = torch.stack([q[0] for q in quantised]), torch.stack([q[1] for q in quantised])
    expert_ids = torch.tensor(ids) if ids is not None else torch.randint(-1, n_experts + 1, (rows,), generator=g)
    return a, a_s, w, w_s, expert_ids


def _check_grouped_fp8_gemm() -> None:
    from specdec.kernels.triton_fp8 import align_by_expert
    cases = [
        _grouped_case(37, 4, 200, 130),                                   # random, partial blocks, ids -1 and E
        _grouped_case(5, 6, 64, 256, ids=[3, 3, 3, 3, 3]),                # one expert has every row, five none
        _grouped_case(40, 3, 96, 128, ids=[0] * 33 + [2] * 7, seed=1),    # uneven: 33 rows (3 tiles of 16), 0, 7
        _grouped_case(3, 2, 64, 64, ids=[-1, -1, -1], seed=2),            # no local rows at all
    ]
    for a, a_s, w, w_s, ids in cases:
        want = kernels.grouped_fp8_gemm(a, a_s, w, w_s, ids, impl="torch")
        got = kernels.grouped_fp8_gemm(a, a_s, w, w_s, ids, impl="triton")
        label = f"{tuple(a.shape)} x {tuple(w.shape)} ids {ids.tolist()[:8]}"
        assert got.shape == want.shape and got.dtype == torch.float32, label
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(want.abs().max().item(), 1e-6), msg=label)
        bf16 = kernels.grouped_fp8_gemm(a, a_s, w, w_s, ids, out_dtype=torch.bfloat16, impl="triton")
        assert bf16.dtype == torch.bfloat16, label
    rows, block_expert = align_by_expert(torch.tensor([2, 0, 2, -1, 2, 5]), 3, 2)
    assert rows.tolist()[:6] == [1, -1, 0, 2, 4, -1] and block_expert.tolist()[:3] == [0, 2, 2]
    assert all(b == -1 for b in block_expert.tolist()[3:])


def _check_kernels_are_interpreted() -> None:
    from specdec.kernels import triton_fp8

    assert triton_fp8.INTERPRETED


INTERPRETER_CHECKS: dict[str, Callable[[], None]] = {
    "interpreted": _check_kernels_are_interpreted,
    "act_quant": _check_act_quant,
    "weight_dequant": _check_weight_dequant,
    "fp8_gemm": _check_fp8_gemm,
    "fp8_linear": _check_fp8_linear,
    "grouped_fp8_gemm": _check_grouped_fp8_gemm,
}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    """Run the interpreter checks once, in a fresh process with TRITON_INTERPRET=1."""
    return results_in_interpreter(__file__)


@pytest.mark.parametrize("name", list(INTERPRETER_CHECKS))
def test_triton_interpreter_matches_reference(interpreter_results: dict[str, str], name: str) -> None:
    assert interpreter_results[name] == "ok", interpreter_results[name]


# ----------------------------------------------------------------------------- 3. dispatch


def _operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 130, generator=torch.Generator().manual_seed(13))
    w_fp8, w_s = ref.weight_quant(torch.randn(200, 130))
    return x, w_fp8, w_s


def test_auto_on_cpu_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_triton() -> None:
        raise AssertionError("impl='auto' took the Triton path for CPU tensors")

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter available
    monkeypatch.setattr(kernels.dispatch, "_triton_impl", no_triton)
    x, w_fp8, w_s = _operands()
    y, s = kernels.act_quant(x)
    y_r, s_r = ref.act_quant(x)
    assert torch.equal(bits(y), bits(y_r)) and torch.equal(s, s_r)
    assert torch.equal(kernels.weight_dequant(w_fp8, w_s), ref.weight_dequant(w_fp8, w_s))
    assert torch.equal(kernels.fp8_gemm(y, s, w_fp8, w_s), ref.fp8_gemm(y_r, s_r, w_fp8, w_s))
    assert torch.equal(kernels.fp8_linear(x, w_fp8, w_s), ref.fp8_gemm(y_r, s_r, w_fp8, w_s))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w_fp8, w_s = _operands()
    y, s = ref.act_quant(x)
    calls = [
        lambda: kernels.act_quant(x, impl="triton"),
        lambda: kernels.weight_dequant(w_fp8, w_s, impl="triton"),
        lambda: kernels.fp8_gemm(y, s, w_fp8, w_s, impl="triton"),
        lambda: kernels.fp8_linear(x, w_fp8, w_s, impl="triton"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            call()


def test_unknown_impl_and_scale_fmt_raise() -> None:
    x, _, _ = _operands()
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.act_quant(x, impl="cuda")
    with pytest.raises(ValueError, match="scale_fmt"):
        kernels.act_quant(x, scale_fmt="e8m0")


def test_import_does_not_import_triton() -> None:
    code = (
        "import sys, kernels; "
        "assert 'triton' not in sys.modules, 'importing kernels imported triton'; "
        "assert not hasattr(kernels, '__version__'); "
        "assert kernels.BLOCK_SIZE == 128 and isinstance(kernels.triton_available(), bool)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr


if __name__ == "__main__":
    interpreter_main(INTERPRETER_CHECKS)
