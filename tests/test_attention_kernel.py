"""Tests for masked latent attention (`kernels.attention`, `kernels.triton_attention`).

1. The torch reference against a plain float64 computation (explicit per-query loops over the
   visible slots), including padding queries (all-False mask rows -> zeros), and a check that
   all-masked queries leave every other query's output unchanged.
2. The Triton kernel, run by the Triton interpreter on CPU, against the reference. The
   interpreter must be on before any kernel is defined, so those checks run in one fresh
   subprocess (`python tests/test_attention_kernel.py` with TRITON_INTERPRET=1) and report back
   as JSON; each check is then asserted by its own test.
3. Dispatch rules for `impl`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from specdec import kernels
from tests.interpreter_harness import main as interpreter_main
from tests.interpreter_harness import results_in_interpreter
from specdec.kernels import attention

REPO = Path(__file__).resolve().parents[1]
C, R = 128, 32  # kv_lora_rank and RoPE width of the test shapes (DeepSeek-V3: 512, 64)
Operands = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- helpers


def operands(b: int, t: int, h: int, s: int, seed: int, c: int = C, r: int = R,
             dtype: torch.dtype = torch.float32) -> Operands:
    """Random q_latent `[b,t,h,c]`, q_pe `[b,t,h,r]`, kv `[b,s,c]`, pe `[b,s,r]` of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, t, h, c), (b, t, h, r), (b, s, c), (b, s, r)]
    q, qp, kv, pe = (torch.randn(shape, generator=g).to(dtype) for shape in shapes)
    return q, qp, kv, pe


def prefill_mask(prefix: list[int], n_queries: list[int], t: int, s: int) -> torch.Tensor:
    """`[B, t, s]` causal mask for ragged rows: row b holds `prefix[b]` cached tokens and
    `n_queries[b]` new ones at slots `prefix[b] + i`; queries past `n_queries[b]` are padding."""
    mask = torch.zeros(len(prefix), t, s, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prefix, n_queries)):
        for i in range(n):
            mask[b, i, : p + i + 1] = True
    return mask


def tree_mask(prefix: list[int], n_nodes: list[int], t: int, s: int, seed: int) -> torch.Tensor:
    """`[B, t, s]` draft-tree mask: node i of row b sits at slot `prefix[b] + i` under a random
    earlier parent (or the committed prefix) and sees the prefix, its ancestors and itself;
    nodes past `n_nodes[b]` are padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(prefix), t, s, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prefix, n_nodes)):
        for i in range(n):
            parent = int(torch.randint(-1, i, (), generator=g)) if i > 0 else -1
            mask[b, i, :p] = True
            mask[b, i, p + i] = True
            if parent >= 0:
                mask[b, i] |= mask[b, parent]
    return mask


def loop_attention(q: torch.Tensor, qp: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                   mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Straightforward float64 attention: per (b, t, h), softmax over the visible slots only."""
    bsz, t, h, c = q.shape
    out = torch.zeros(bsz, t, h, c, dtype=torch.float64)
    for b in range(bsz):
        for i in range(t):
            slots = mask[b, i].nonzero().flatten()
            if slots.numel() == 0:
                continue
            keys, rope_keys = kv[b, slots].double(), pe[b, slots].double()
            for j in range(h):
                logits = (keys @ q[b, i, j].double() + rope_keys @ qp[b, i, j].double()) * scale
                weights = torch.exp(logits - logits.max())
                out[b, i, j] = (weights / weights.sum()) @ keys
    return out


def mixed_case() -> tuple[Operands, torch.Tensor]:
    """Small operands with a tree mask that has padding nodes, plus one all-False query."""
    mask = tree_mask([7, 3], [6, 4], 6, 15, seed=1)
    mask[0, 2] = False
    return operands(2, 6, 3, 15, seed=2, c=16, r=8), mask


def paged_operands(ops: Operands, page: int, seed: int,
                   index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ops' kv / pe rows stored in block pools of `page` slots, each row's blocks drawn at random from
    the pool (block 0 never handed out, as `specdec.paged_cache` does; one table column to spare,
    pointing at it): (kv pool `[n_blocks, page, C]`, pe pool `[n_blocks, page, R]`, block table
    `[B, blocks per row + 1]`). Slots no row holds are finite noise, as stale cache entries are."""
    _, _, kv, pe = ops
    b, s = kv.shape[:2]
    per_row = -(-s // page)
    n_blocks = 1 + b * per_row + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.zeros(b, per_row + 1, dtype=index_dtype)
    table[:, :per_row] = (torch.randperm(n_blocks - 1, generator=g)[: b * per_row] + 1).view(b, per_row)
    pools = []
    for rows in (kv, pe):
        pool = torch.randn(n_blocks, page, rows.shape[-1], generator=g).to(rows.dtype)
        for row in range(b):
            for j in range(per_row):
                part = rows[row, j * page : (j + 1) * page]
                pool[table[row, j], : part.shape[0]] = part
        pools.append(pool)
    return pools[0], pools[1], table


# ------------------------------------------------------------- 1. reference correctness


def test_reference_matches_plain_loop() -> None:
    (q, qp, kv, pe), mask = mixed_case()
    got = kernels.mla_attention_reference(q, qp, kv, pe, mask, 0.3)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), loop_attention(q, qp, kv, pe, mask, 0.3), rtol=1e-5, atol=1e-6)


def test_reference_zeros_for_all_masked_queries() -> None:
    (q, qp, kv, pe), mask = mixed_case()
    padding = ~mask.any(-1)
    assert padding.sum() == 3  # node 2 of row 0 (cleared) and nodes 4, 5 of row 1 (4-node tree)
    for dtype in (torch.float32, torch.bfloat16):
        got = kernels.mla_attention_reference(q.to(dtype), qp.to(dtype), kv.to(dtype), pe.to(dtype), mask, 0.3)
        assert torch.isfinite(got).all()
        assert (got[padding] == 0).all()
        assert (got[~padding].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_unchanged_for_queries_that_see_slots(dtype: torch.dtype) -> None:
    """A query that sees slots gets the same output whether or not other queries are all-masked.

    Compared against the same operands with every all-masked query given one visible slot, so no
    NaN or -inf exists anywhere in the comparison: the verdict cannot depend on how a CPU's GEMM
    spreads NaN (an earlier version of this test compared against the unfixed reference, whose NaN
    rows leaked into other rows in bfloat16 on some CPUs). Also checked against float64 loops."""
    (q, qp, kv, pe), mask = mixed_case()
    q, qp, kv, pe = (x.to(dtype) for x in (q, qp, kv, pe))
    padding = ~mask.any(-1)
    filled = mask.clone()
    filled[..., 0] |= padding  # all-masked queries now see slot 0; the others are untouched
    new = kernels.mla_attention_reference(q, qp, kv, pe, mask, 0.3)
    want = kernels.mla_attention_reference(q, qp, kv, pe, filled, 0.3)
    assert torch.isfinite(new).all() and (new[padding] == 0).all()
    tol = {} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}  # bf16: GEMMs grouped differently
    torch.testing.assert_close(new[~padding], want[~padding], **tol)
    exact = loop_attention(q, qp, kv, pe, mask, 0.3)
    tol64 = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 6e-2}
    torch.testing.assert_close(new[~padding].double(), exact[~padding], **tol64)


@pytest.mark.parametrize("page", [4, 16])
def test_reference_over_a_paged_cache_equals_dense_rows(page: int) -> None:
    """With a block table, the torch path gathers each row's blocks and attends exactly as over the
    dense rows they hold."""
    (q, qp, kv, pe), mask = mixed_case()
    kv_pool, pe_pool, table = paged_operands((q, qp, kv, pe), page, seed=5)
    got = attention.mla_attention(q, qp, kv_pool, pe_pool, mask, 0.3, impl="torch", block_table=table)
    assert torch.equal(got, kernels.mla_attention_reference(q, qp, kv, pe, mask, 0.3))


# ------------------------------------------- 2. Triton kernel (interpreter subprocess)

FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _compare(ops: Operands, mask: torch.Tensor, scale: float, label: str, num_splits: int | None = None,
             tol: dict[str, float] = FP32_TOL) -> None:
    """Assert the Triton kernel matches the reference (and is exactly 0 on padding queries)."""
    from specdec.kernels import triton_attention

    want = kernels.mla_attention_reference(*ops, mask, scale)
    got = triton_attention.mla_attention(*ops, mask, scale, num_splits=num_splits)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{label}: {got.shape} {got.dtype}"
    assert torch.isfinite(got).all(), f"{label}: non-finite output"
    padding = ~mask.expand(ops[0].shape[0], -1, -1).any(-1)
    assert (got[padding] == 0).all(), f"{label}: padding queries are not zero"
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{label}: {m}")


def _check_causal_prefill() -> None:
    ops = operands(2, 37, 2, 37, seed=10)
    _compare(ops, prefill_mask([0, 0], [37, 37], 37, 37), 0.09, "fresh prefill, S=37")
    ops = operands(2, 9, 3, 52, seed=11)
    _compare(ops, prefill_mask([40, 23], [9, 9], 9, 52), 0.09, "prefill after a cached prefix")


def _check_ragged_rows() -> None:
    ops = operands(3, 6, 2, 61, seed=12)
    mask = prefill_mask([0, 17, 55], [6, 3, 1], 6, 61)  # rows 1 and 2 have padding queries
    _compare(ops, mask, 0.09, "ragged prefill")
    lengths = torch.tensor([5, 33, 64, 100])
    decode = (torch.arange(100) < lengths[:, None]).unsqueeze(1)  # [4, 1, 100]
    _compare(operands(4, 1, 16, 100, seed=13), decode, 0.09, "ragged decode, 16 heads")


def _check_tree_masks() -> None:
    for seed, (prefix, nodes, t, h, s) in enumerate([([30, 7], [12, 9], 12, 4, 45),
                                                      ([64, 0, 5], [5, 8, 1], 8, 3, 80)]):
        mask = tree_mask(prefix, nodes, t, s, seed=20 + seed)
        _compare(operands(len(prefix), t, h, s, seed=30 + seed), mask, 0.09, f"tree {seed}")


def _check_padding_queries() -> None:
    ops = operands(2, 4, 3, 40, seed=40)
    mask = torch.zeros(2, 4, 40, dtype=torch.bool)
    mask[0, 1, 39] = True  # one query sees only the very last slot
    _compare(ops, mask, 0.09, "mostly padding")
    _compare(ops, torch.zeros(2, 4, 40, dtype=torch.bool), 0.09, "all padding")
    _compare(operands(2, 4, 3, 0, seed=41), torch.zeros(2, 4, 0, dtype=torch.bool), 0.09, "empty cache")


def _check_short_caches() -> None:
    for s in (1, 5, 32, 33):
        mask = torch.rand(2, 3, s, generator=torch.Generator().manual_seed(s)) < 0.7
        mask[:, :, 0] = True
        _compare(operands(2, 3, 5, s, seed=50 + s), mask, 0.09, f"S={s}")
        _compare(operands(2, 3, 5, s, seed=60 + s, c=96, r=24), mask, 0.09, f"S={s}, C=96, R=24 (padded tiles)")


def _check_split_slots() -> None:
    mask = tree_mask([70, 3], [10, 6], 10, 90, seed=60)
    ops = operands(2, 10, 3, 90, seed=61)
    for splits in (2, 3, 50):  # 50 is clamped to the 3 blocks of 32 slots
        _compare(ops, mask, 0.09, f"tree, {splits} splits", num_splits=splits)
    lengths = torch.tensor([3, 64, 90])  # row 0 sees nothing in its later splits
    decode = (torch.arange(90) < lengths[:, None]).unsqueeze(1)
    _compare(operands(3, 1, 16, 90, seed=62), decode, 0.09, "ragged decode, 3 splits", num_splits=3)
    _compare(ops, torch.zeros(2, 10, 90, dtype=torch.bool), 0.09, "all padding, 3 splits", num_splits=3)


def _check_exact(ops: Operands, mask: torch.Tensor, scale: float, label: str, tol: float) -> None:
    """Assert the Triton kernel is within `tol` (relative and absolute) of float64 attention."""
    from specdec.kernels import triton_attention

    got = triton_attention.mla_attention(*ops, mask, scale).double()
    torch.testing.assert_close(got, loop_attention(*ops, mask, scale), rtol=tol, atol=tol,
                               msg=lambda m: f"{label} vs float64: {m}")


def _check_low_precision() -> None:
    mask = tree_mask([30, 7], [12, 9], 12, 45, seed=70)
    for dtype, ulp in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-10)):
        ops = operands(2, 12, 4, 45, seed=71, dtype=dtype)
        # The reference rounds the logits to the input dtype, the kernel keeps them in float32:
        # a few output ulps apart, while the kernel stays within about one ulp of exact maths.
        tol = {"rtol": 4 * ulp, "atol": 4 * ulp}
        _compare(ops, mask, 0.09, f"{dtype}", tol=tol)
        _compare(ops, mask, 0.09, f"{dtype}, 2 splits", num_splits=2, tol=tol)
        _check_exact(ops, mask, 0.09, f"{dtype}", tol=ulp)


def _check_strided_operands() -> None:
    b, t, h, s, full = 2, 7, 3, 53, 80
    q, qp, kv_cache, pe_cache = operands(b, t, h, full, seed=80)
    q_bhtc = q.transpose(1, 2).contiguous()
    q_view = q_bhtc.transpose(1, 2)  # [b, t, h, C] with permuted strides
    qp_view = torch.cat([torch.randn(b, t, h, 16), qp], dim=-1)[..., 16:]  # like q.split(...)
    kv, pe = kv_cache[:, :s], pe_cache[:, :s]
    mask_full = prefill_mask([46, 46], [7, 7], t, full)
    for mask, label in [(mask_full[:, :, :s], "sliced mask"), (mask_full[:1, :, :s], "broadcast mask")]:
        ops = (q_view, qp_view, kv, pe)
        assert not any(x.is_contiguous() for x in ops)
        _compare(ops, mask, 0.09, f"strided operands, {label}")


def _check_large_logits() -> None:
    q, qp, kv, pe = operands(2, 9, 3, 52, seed=90)
    mask = prefill_mask([40, 23], [9, 9], 9, 52)
    # Without the running max, exp of these logits (~200) would overflow float32 (errors of order
    # one, or NaN). Their float32 rounding (ulp ~1.5e-5) moves the outputs by a few such ulps,
    # how many depends on the order the dot products sum in: 2.4e-5 on an AMD EPYC, under 1e-5 on
    # an Intel Xeon. The tolerance allows several ulps on any CPU and still fails a lost max.
    ops = (q * 30, qp * 30, kv, pe)
    _compare(ops, mask, 0.5, "logits in the hundreds", tol={"rtol": 1e-4, "atol": 1e-4})
    _check_exact(ops, mask, 0.5, "logits in the hundreds", tol=1e-4)


def _check_dispatch_and_validation() -> None:
    import specdec.kernels.triton_attention as ta

    ops = operands(2, 3, 2, 20, seed=95)
    mask = prefill_mask([10, 17], [3, 3], 3, 20)
    torch.testing.assert_close(kernels.mla_attention(*ops, mask, 0.1, impl="triton"),
                               ta.mla_attention(*ops, mask, 0.1), rtol=0, atol=0)
    q, qp, kv, pe = ops
    bad = [
        ((q, qp, kv[:, :-1], pe, mask), "pe shape"),
        ((q, qp[..., :-1], kv, pe, mask), "q_pe shape"),
        ((q, qp, kv, pe, mask[:, :2]), "mask shape"),
        ((q, qp, kv, pe, mask.float()), "mask must be bool"),
        ((q.double(), qp.double(), kv.double(), pe.double(), mask), "dtype"),
        ((q, qp, kv.bfloat16(), pe, mask), "dtype"),
    ]
    for args, message in bad:
        try:
            ta.mla_attention(*args, 0.1)
        except ValueError as e:
            assert message in str(e), f"wrong error for {message!r}: {e}"
        else:
            raise AssertionError(f"no ValueError for {message!r}")


def _check_paged_cache() -> None:
    """Over block pools read through a block table the kernel computes what it computes over the
    dense rows those blocks hold, bit for bit (same values, same order), for decode, trees, splits,
    pages that are not a power of two or smaller than a tile, int32 tables and bf16."""
    from specdec.kernels import triton_attention

    lengths = torch.tensor([5, 33, 64, 100])
    decode = (torch.arange(100) < lengths[:, None]).unsqueeze(1)
    cases = [(operands(4, 1, 16, 100, seed=100), decode, 16, None, torch.int64, "ragged decode, page 16"),
             (operands(2, 10, 3, 90, seed=101), tree_mask([70, 3], [10, 6], 10, 90, seed=102), 5, None,
              torch.int32, "tree, page 5, int32 table"),
             (operands(2, 10, 3, 90, seed=103), tree_mask([70, 3], [10, 6], 10, 90, seed=104), 64, 3,
              torch.int64, "tree, page 64, 3 splits"),
             (operands(2, 12, 4, 45, seed=105, dtype=torch.bfloat16), tree_mask([30, 7], [12, 9], 12, 45, seed=106),
              8, 2, torch.int64, "bf16, page 8, 2 splits")]
    for ops, mask, page, splits, index_dtype, label in cases:
        kv_pool, pe_pool, table = paged_operands(ops, page, seed=107, index_dtype=index_dtype)
        q, qp = ops[:2]
        got = triton_attention.mla_attention(q, qp, kv_pool, pe_pool, mask, 0.09, num_splits=splits, block_table=table)
        dense = triton_attention.mla_attention(*ops, mask, 0.09, num_splits=splits)
        assert torch.equal(got, dense), f"{label}: paged differs from dense"
        tol = FP32_TOL if ops[0].dtype == torch.float32 else {"rtol": 2.0**-6, "atol": 2.0**-6}
        _compare(ops, mask, 0.09, label, num_splits=splits, tol=tol)
        via_dispatch = kernels.mla_attention(q, qp, kv_pool, pe_pool, mask, 0.09, impl="triton", block_table=table)
        if splits is None:
            assert torch.equal(via_dispatch, got), f"{label}: dispatch"
    ops = operands(2, 3, 2, 20, seed=108)
    kv_pool, pe_pool, table = paged_operands(ops, 8, seed=109)
    for bad_table, message in ((table[:, :2], "does not cover"), (table.float(), "int32/int64"),
                               (table[:1], "does not cover")):
        try:
            triton_attention.mla_attention(*ops[:2], kv_pool, pe_pool, prefill_mask([10, 17], [3, 3], 3, 20), 0.1,
                                           block_table=bad_table)
        except ValueError as e:
            assert message in str(e), f"wrong error for {message!r}: {e}"
        else:
            raise AssertionError(f"no ValueError for {message!r}")


def _check_fp8_latents() -> None:
    """Over an FP8 latent cache (uint8 e4m3 codes + a float32 scale per token), dense or paged, the
    kernel decodes each tile as it reads it and computes what it computes over the decoded rows, bit
    for bit: the decode is exact, every code (subnormals, both signs, the largest) included."""
    from specdec.kernels import fp8_cache, triton_attention

    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[~torch.isnan(codes.view(torch.float8_e4m3fn).float())]  # every finite e4m3fn value (254)
    codes = torch.cat([codes, codes[:2]])  # C = 256: a float32 scale after the codes stays aligned
    scale = torch.tensor([0.37], dtype=torch.float32).view(torch.uint8)
    every_code = torch.cat([codes, scale]).view(1, 1, -1)  # one token whose latent takes every value
    q, qp, kv, pe = operands(2, 5, 3, 70, seed=130, c=codes.numel())
    kv = fp8_cache.encode(kv)
    kv[1, 7] = every_code
    mask = tree_mask([60, 9], [5, 5], 5, 70, seed=131)
    decoded = fp8_cache.decode(kv, torch.float32)
    assert decoded[1, 7].tolist() == (codes.view(torch.float8_e4m3fn).float() * 0.37).tolist()
    dense = triton_attention.mla_attention(q, qp, decoded, pe, mask, 0.09)
    got = triton_attention.mla_attention(q, qp, kv, pe, mask, 0.09)
    assert torch.equal(got, dense), "fp8 rows: differs from the decoded rows"
    kv_pool, pe_pool, table = paged_operands((q, qp, kv, pe), 16, seed=132)
    got = triton_attention.mla_attention(q, qp, kv_pool, pe_pool, mask, 0.09, num_splits=2, block_table=table)
    assert torch.equal(got, triton_attention.mla_attention(q, qp, decoded, pe, mask, 0.09, num_splits=2)), \
        "fp8 paged pool: differs from the decoded rows"
    reference = kernels.mla_attention(q, qp, kv_pool, pe_pool, mask, 0.09, impl="torch", block_table=table)
    torch.testing.assert_close(got, reference, **FP32_TOL)
    try:
        triton_attention.mla_attention(q, qp, kv[..., :-1], pe, mask, 0.09)
    except ValueError as e:
        assert "kv shape" in str(e), e
    else:
        raise AssertionError("no ValueError for an FP8 pool of the wrong width")


def _check_batch_invariant_layouts() -> None:
    """The batch-invariant kernel (one query per program over its visible slots compacted) matches
    the reference on trees, ragged rows and padding queries, and reads a paged pool and an FP8 latent
    pool as it reads the dense rows they hold, bit for bit."""
    from specdec.kernels import fp8_cache, triton_attention

    ops = operands(2, 10, 3, 90, seed=140)
    mask = tree_mask([70, 3], [10, 6], 10, 90, seed=141)
    mask[1, 4] = False  # a padding query
    want = kernels.mla_attention_reference(*ops, mask, 0.09)
    dense = triton_attention.mla_attention(*ops, mask, 0.09, batch_invariant=True)
    torch.testing.assert_close(dense, want, **FP32_TOL)
    assert (dense[1, 4] == 0).all(), "padding query"
    kv_pool, pe_pool, table = paged_operands(ops, 7, seed=142)
    paged = triton_attention.mla_attention(*ops[:2], kv_pool, pe_pool, mask, 0.09, block_table=table,
                                           batch_invariant=True)
    assert torch.equal(paged, dense), "paged pool differs from dense rows"
    q, qp, kv, pe = ops
    fp8 = fp8_cache.encode(kv)
    decoded = triton_attention.mla_attention(q, qp, fp8_cache.decode(fp8, torch.float32), pe, mask, 0.09,
                                             batch_invariant=True)
    assert torch.equal(triton_attention.mla_attention(q, qp, fp8, pe, mask, 0.09, batch_invariant=True), decoded), \
        "fp8 rows differ from the decoded rows"


def _check_mla_layer_over_a_paged_pool() -> None:
    """An MLA layer decoding over a paged pool (what the server runs) with the Triton kernel reading
    the blocks in place gives the output and writes the pool of the torch path that gathers them."""
    from specdec.model.args import from_hf_config
    from specdec.model.mla import MLA
    from specdec.model.parallel import ParallelContext
    from specdec.model.rope import rope_tables
    from specdec.model.synthetic import small_config

    args = from_hf_config(small_config())
    g = torch.Generator().manual_seed(120)
    layer = MLA(args, ParallelContext(), torch.float32, None)
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    bsz, t, page, n_blocks, layers = 2, 3, 4, 12, 2
    cos, sin = rope_tables(args, 64)
    positions = torch.tensor([[9, 10, 11], [17, 18, 19]])
    rope = torch.complex(cos, sin)[positions]
    table = torch.zeros(3, 8, dtype=torch.int64)  # a spare third row, as the pool's other rows
    table[0, :3], table[1, :5] = torch.tensor([7, 2, 9]), torch.tensor([4, 11, 1, 6, 3])
    mask = torch.zeros(bsz, t, 20, dtype=torch.bool)
    for b in range(bsz):
        for i in range(t):
            mask[b, i, : positions[b, i] + 1] = True
    x = torch.randn(bsz, t, args.dim, generator=g)
    pools = (torch.randn(layers, n_blocks, page, args.kv_lora_rank, generator=g),
             torch.randn(layers, n_blocks, page, args.qk_rope_head_dim, generator=g))
    results, tables = [], []

    def forced(*a, impl: str, **kw) -> torch.Tensor:
        tables.append(kw.get("block_table"))
        return attention.mla_attention(*a, impl=impl, **kw)

    for impl in ("torch", "triton"):
        kv_pool, pe_pool = (p.clone() for p in pools)
        with torch.inference_mode(), mock.patch.object(kernels, "mla_attention", partial(forced, impl=impl)):
            out = layer(x, rope, kv_pool, pe_pool, 1, positions, mask, block_table=table)
        results.append((out, kv_pool, pe_pool))
    assert all(t is not None and t.shape[0] == bsz for t in tables), "attention did not get the block table"
    (want, want_kv, want_pe), (got, got_kv, got_pe) = results
    assert torch.equal(got_kv, want_kv) and torch.equal(got_pe, want_pe), "pools written differently"
    torch.testing.assert_close(got, want, **FP32_TOL)


def _check_kernels_are_interpreted() -> None:
    from specdec.kernels import triton_attention

    assert triton_attention.INTERPRETED


INTERPRETER_CHECKS: dict[str, Callable[[], None]] = {
    "interpreted": _check_kernels_are_interpreted,
    "causal_prefill": _check_causal_prefill,
    "ragged_rows": _check_ragged_rows,
    "tree_masks": _check_tree_masks,
    "padding_queries": _check_padding_queries,
    "short_caches": _check_short_caches,
    "split_slots": _check_split_slots,
    "low_precision": _check_low_precision,
    "strided_operands": _check_strided_operands,
    "large_logits": _check_large_logits,
    "dispatch_and_validation": _check_dispatch_and_validation,
    "paged_cache": _check_paged_cache,
    "mla_layer_over_a_paged_pool": _check_mla_layer_over_a_paged_pool,
    "fp8_latents": _check_fp8_latents,
    "batch_invariant_layouts": _check_batch_invariant_layouts,
}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    """Run the interpreter checks once, in a fresh process with TRITON_INTERPRET=1."""
    return results_in_interpreter(__file__)


@pytest.mark.parametrize("name", list(INTERPRETER_CHECKS))
def test_triton_interpreter_matches_reference(interpreter_results: dict[str, str], name: str) -> None:
    assert interpreter_results[name] == "ok", interpreter_results[name]


# ----------------------------------------------------------------------------- 3. dispatch


def test_auto_and_torch_on_cpu_use_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_triton() -> None:
        raise AssertionError("the Triton path was taken for CPU tensors")

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter available
    monkeypatch.setattr(attention, "_triton_impl", no_triton)
    (q, qp, kv, pe), mask = mixed_case()
    want = kernels.mla_attention_reference(q, qp, kv, pe, mask, 0.3)
    assert torch.equal(kernels.mla_attention(q, qp, kv, pe, mask, 0.3), want)
    assert torch.equal(kernels.mla_attention(q, qp, kv, pe, mask, 0.3, impl="torch"), want)


def test_auto_picks_triton_for_cuda_tensors_only_when_triton_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_tensor = SimpleNamespace(is_cuda=True)  # `uses_triton` only asks where the operand lives
    monkeypatch.setattr(kernels.dispatch, "triton_available", lambda: True)
    assert attention.uses_triton("auto", cuda_tensor, needs_grad=False)
    assert attention.uses_triton("triton", cuda_tensor, needs_grad=False)
    assert not attention.uses_triton("torch", cuda_tensor, needs_grad=False)
    assert not attention.uses_triton("auto", torch.zeros(1), needs_grad=False)
    assert not attention.uses_triton("auto", cuda_tensor, needs_grad=True)  # no backward in Triton
    with pytest.raises(ValueError, match="no backward"):
        attention.uses_triton("triton", cuda_tensor, needs_grad=True)
    monkeypatch.setattr(kernels.dispatch, "triton_available", lambda: False)
    assert not attention.uses_triton("auto", cuda_tensor, needs_grad=False)
    with pytest.raises(ValueError, match="cannot be imported"):
        attention.uses_triton("triton", cuda_tensor, needs_grad=False)


def test_gradients_flow_through_auto() -> None:
    ops, mask = mixed_case()
    for x in ops:
        x.requires_grad_(True)
    kernels.mla_attention(*ops, mask, 0.3).sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in ops)
    assert (ops[0].grad[~mask.any(-1)] == 0).all()  # padding queries get zero gradient, not NaN


def test_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (q, qp, kv, pe), mask = mixed_case()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.mla_attention(q, qp, kv, pe, mask, 0.3, impl="triton")


def test_unknown_impl_raises() -> None:
    (q, qp, kv, pe), mask = mixed_case()
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.mla_attention(q, qp, kv, pe, mask, 0.3, impl="cuda")


def test_cpu_attention_does_not_import_triton() -> None:
    code = (
        "import sys, torch, kernels; "
        "m = torch.ones(1, 2, 3, dtype=torch.bool); "
        "out = kernels.mla_attention(torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 2), torch.ones(1, 3, 8), "
        "torch.ones(1, 3, 2), m, 0.5); "
        "assert out.shape == (1, 2, 4, 8); "
        "assert 'triton' not in sys.modules, 'CPU attention imported triton'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr


if __name__ == "__main__":
    interpreter_main(INTERPRETER_CHECKS)
