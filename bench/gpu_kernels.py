"""`python bench/gpu_kernels.py`: the Triton kernels of `kernels/`, compiled on a CUDA GPU, against their
torch references (the test suite checks them only under TRITON_INTERPRET=1 on the CPU).

Checks (each reports ok or the failure; exit status 1 if any fails, 2 when there is no CUDA GPU):

* act_quant: identical FP8 codes and scales (float32/bf16/fp16 inputs, both scale formats, partial
  groups, block sizes 32/64/128), Triton vs `kernels.reference`;
* weight_dequant: identical values (float32/bf16/fp16 outputs, partial tiles);
* fp8_gemm / fp8_linear: Triton vs the reference's float32 block-by-block sum (the order of the
  float32 additions differs, and Hopper's FP8 MMA accumulates with reduced precision, hence a
  tolerance of 2e-3 of the output's magnitude); also at DeepSeek-V3 projection shapes;
* mla_attention: Triton vs the reference evaluated in float64 (float32 inputs: 1e-4; bf16/fp16 inputs:
  2 ulps of the output dtype) for causal prefill, ragged decode, draft-tree masks, all-padding
  queries, strided cache views and DeepSeek-V3 sizes (C=512, R=64, 128 heads, 4096 slots);
* grouped_experts: unquantised bf16 experts as grouped GEMMs (`kernels.experts.grouped`) against a
  float32 per-expert sum (not Triton: `torch.nn.functional.grouped_mm`'s CUDA kernel).

FP8 checks need compute capability 8.9+ (they are skipped, not failed, on older GPUs).
`--dry-run` (with TRITON_INTERPRET=1, CPU tensors, small cases only) checks this script itself
without a GPU: `TRITON_INTERPRET=1 python bench/gpu_kernels.py --dry-run`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from specdec import kernels  # noqa: E402
from specdec.kernels import reference as ref  # noqa: E402

FP8 = torch.float8_e4m3fn
DEV = "cuda"
LARGE = True  # DeepSeek-V3-sized cases (off in --dry-run: the interpreter is slow)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def wide_range(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Values whose magnitudes span ~1e-7..1e3 (groups differ in scale, subnormals are hit)."""
    g = _gen(seed)
    mags = torch.exp2(torch.empty(shape, device=DEV).uniform_(-24, 10, generator=g))
    return (torch.randn(shape, device=DEV, generator=g) * mags).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ----------------------------------------------------------------------------- FP8


def check_act_quant() -> None:
    cases = [((3, 5, 300), torch.float32, None), ((3, 5, 300), torch.float32, "ue8m0"),
             ((70, 256), torch.bfloat16, None), ((2, 130), torch.float16, "ue8m0"), ((3, 7), torch.float32, None)]
    if LARGE:
        cases.append(((4096, 7168), torch.bfloat16, None))
    for i, (shape, dtype, fmt) in enumerate(cases):
        x = wide_range(*shape, seed=i, dtype=dtype) if shape != (3, 7) else torch.zeros(shape, device=DEV)
        y_t, s_t = kernels.act_quant(x, scale_fmt=fmt, impl="triton")
        y_r, s_r = kernels.act_quant(x, scale_fmt=fmt, impl="torch")
        assert torch.equal(s_t, s_r), f"scales differ for {shape} {dtype} {fmt}"
        assert torch.equal(bits(y_t), bits(y_r)), f"fp8 codes differ for {shape} {dtype} {fmt}"
    x = wide_range(4, 100, seed=9)
    for block in (32, 64):
        y_t, s_t = kernels.act_quant(x, block_size=block, impl="triton")
        y_r, s_r = kernels.act_quant(x, block_size=block, impl="torch")
        assert torch.equal(s_t, s_r) and torch.equal(bits(y_t), bits(y_r)), f"block_size={block}"


def check_weight_dequant() -> None:
    for shape in [(200, 300), (256, 128), (1, 129)] + ([(7168, 2048)] if LARGE else []):
        w_fp8, s = ref.weight_quant(wide_range(*shape, seed=10))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = kernels.weight_dequant(w_fp8, s, out_dtype=dtype, impl="triton")
            want = kernels.weight_dequant(w_fp8, s, out_dtype=dtype, impl="torch")
            assert got.dtype == dtype and torch.equal(got, want), f"{shape} {dtype}"


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, label: str) -> None:
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * scale,
                               msg=lambda m: f"{label}: {m}")


def check_fp8_gemm() -> None:
    g = _gen(11)
    cases = [((2, 5, 130), 300), ((70, 256), 128), ((1, 64), 200), ((130,), 17)]
    if LARGE:
        cases += [((1, 7168), 1536), ((16, 7168), 576), ((64, 2048), 7168), ((256, 1536), 4096)]
    for a_shape, n in cases:
        a, a_s = ref.act_quant(torch.randn(a_shape, device=DEV, generator=g))
        b, b_s = ref.weight_quant(torch.randn(n, a_shape[-1], device=DEV, generator=g))
        want = kernels.fp8_gemm(a, a_s, b, b_s, impl="torch")
        got = kernels.fp8_gemm(a, a_s, b, b_s, impl="triton")
        assert got.shape == want.shape and got.dtype == torch.float32, f"{a_shape} x {n}"
        _close(got, want, 2e-3, f"fp8_gemm {a_shape} x {n}")
        got_bf16 = kernels.fp8_gemm(a, a_s, b, b_s, out_dtype=torch.bfloat16, impl="triton")
        assert got_bf16.dtype == torch.bfloat16
        _close(got_bf16, want, 2e-3 + 2.0 ** -8, f"fp8_gemm bf16 {a_shape} x {n}")


def check_fp8_linear() -> None:
    x = torch.randn(3, 4, 200, device=DEV, generator=_gen(12)).bfloat16()
    w_fp8, w_s = ref.weight_quant(torch.randn(300, 200, device=DEV, generator=_gen(13)))
    got = kernels.fp8_linear(x, w_fp8, w_s, out_dtype=torch.float32, impl="triton")
    want = kernels.fp8_linear(x, w_fp8, w_s, out_dtype=torch.float32, impl="torch")
    _close(got, want, 2e-3, "fp8_linear")
    assert kernels.fp8_linear(x, w_fp8, w_s, impl="triton").dtype == torch.bfloat16
    if DEV == "cuda":
        auto = kernels.fp8_linear(x, w_fp8, w_s, out_dtype=torch.float32, impl="auto")
        assert torch.equal(auto, got), "impl='auto' did not take the Triton kernel on this GPU"


def check_grouped_fp8_gemm() -> None:
    """Grouped FP8 expert GEMM (one launch for all experts) against the per-expert reference: uneven
    and empty experts, rows of other ranks' experts (-1), and (not in a dry run) V3's expert shape
    [2048, 7168] for 32 local experts (one rank of 8) and 512 routed slots."""
    cases = [(37, 4, 200, 130, None), (40, 3, 96, 128, [0] * 33 + [2] * 7), (5, 6, 64, 256, [3] * 5)]
    if LARGE:
        cases.append((512, 32, 2048, 7168, None))
    for seed, (rows, n_experts, n, k, ids) in enumerate(cases):
        a, a_s = ref.act_quant(torch.randn(rows, k, device=DEV, generator=_gen(40 + seed)))
        w = torch.randn(n_experts, n, k, device=DEV, generator=_gen(50 + seed))
        quantised = [ref.weight_quant(w_e) for w_e in w]
        w_fp8, w_s = torch.stack([q[0] for q in quantised]), torch.stack([q[1] for q in quantised])
        expert_ids = (torch.tensor(ids, device=DEV) if ids is not None else
                      torch.randint(-1, n_experts, (rows,), device=DEV, generator=_gen(60 + seed)))
        got = kernels.grouped_fp8_gemm(a, a_s, w_fp8, w_s, expert_ids, impl="triton")
        want = kernels.grouped_fp8_gemm(a, a_s, w_fp8, w_s, expert_ids, impl="torch")
        _close(got, want, 2e-3, f"grouped_fp8_gemm {rows} rows x {n_experts} experts [{n}, {k}]")


# ----------------------------------------------------------------------------- attention


def operands(b: int, t: int, h: int, s: int, seed: int, c: int = 128, r: int = 32, dtype=torch.float32):
    g = _gen(seed)
    return tuple(torch.randn(shape, device=DEV, generator=g).to(dtype)
                 for shape in [(b, t, h, c), (b, t, h, r), (b, s, c), (b, s, r)])


def prefill_mask(prefix: list[int], n_queries: list[int], t: int, s: int) -> torch.Tensor:
    mask = torch.zeros(len(prefix), t, s, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prefix, n_queries)):
        for i in range(n):
            mask[b, i, : p + i + 1] = True
    return mask.to(DEV)


def tree_mask(prefix: list[int], n_nodes: list[int], t: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(prefix), t, s, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prefix, n_nodes)):
        for i in range(n):
            parent = int(torch.randint(-1, i, (), generator=g)) if i > 0 else -1
            mask[b, i, :p] = True
            mask[b, i, p + i] = True
            if parent >= 0:
                mask[b, i] |= mask[b, parent]
    return mask.to(DEV)


ULP = {torch.float32: 1e-4, torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -10}


def compare_attention(ops, mask: torch.Tensor, scale: float, label: str) -> None:
    from specdec.kernels import triton_attention

    got = triton_attention.mla_attention(*ops, mask, scale)
    want = kernels.mla_attention_reference(*(x.double() for x in ops), mask, scale)
    tol = ULP[ops[0].dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{label}: {m}")
    if DEV == "cuda":
        assert torch.equal(kernels.mla_attention(*ops, mask, scale, impl="auto"), got), f"{label}: auto != triton"


def check_attention_masks() -> None:
    compare_attention(operands(2, 37, 2, 37, 10), prefill_mask([0, 0], [37, 37], 37, 37), 0.09, "prefill")
    compare_attention(operands(2, 9, 3, 52, 11), prefill_mask([40, 23], [9, 9], 9, 52), 0.09, "cached prefix")
    compare_attention(operands(3, 6, 2, 61, 12), prefill_mask([0, 17, 55], [6, 3, 1], 6, 61), 0.09, "ragged")
    lengths = torch.tensor([5, 33, 64, 100], device=DEV)
    decode = (torch.arange(100, device=DEV) < lengths[:, None]).unsqueeze(1)
    compare_attention(operands(4, 1, 16, 100, 13), decode, 0.09, "ragged decode")
    for seed, (prefix, nodes, t, h, s) in enumerate([([30, 7], [12, 9], 12, 4, 45), ([64, 0, 5], [5, 8, 1], 8, 3, 80)]):
        compare_attention(operands(len(prefix), t, h, s, 30 + seed), tree_mask(prefix, nodes, t, s, 20 + seed), 0.09,
                          f"tree {seed}")
    ops = operands(2, 4, 3, 40, 40)
    compare_attention(ops, torch.zeros(2, 4, 40, dtype=torch.bool, device=DEV), 0.09, "all padding")


def check_attention_dtypes_and_views() -> None:
    mask = tree_mask([30, 7], [12, 9], 12, 45, 70)
    for dtype in (torch.bfloat16, torch.float16):
        compare_attention(operands(2, 12, 4, 45, 71, dtype=dtype), mask, 0.09, f"{dtype}")
    q, qp, kv_cache, pe_cache = operands(2, 7, 3, 80, 80)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    compare_attention((q_view, qp, kv_cache[:, :53], pe_cache[:, :53]),
                      prefill_mask([46, 46], [7, 7], 7, 53), 0.09, "strided views")


def check_attention_deepseek_sizes() -> None:
    """DeepSeek-V3 latent sizes: C=512, R=64; decode over 4096 slots with 128 (or 16 per-rank) heads;
    a 9-node tree verify at 16 heads."""
    if not LARGE:
        return
    scale = (192 ** -0.5)
    lengths = torch.tensor([4096, 1000, 3000, 17], device=DEV)
    decode = (torch.arange(4096, device=DEV) < lengths[:, None]).unsqueeze(1)
    for heads in (128, 16):
        compare_attention(operands(4, 1, heads, 4096, 90 + heads, c=512, r=64, dtype=torch.bfloat16), decode,
                          scale, f"decode, {heads} heads, bf16")
    tree = tree_mask([4000, 2500], [9, 9], 9, 4096, 99)
    compare_attention(operands(2, 9, 16, 4096, 98, c=512, r=64, dtype=torch.bfloat16), tree, scale, "tree verify")
    compare_attention(operands(2, 9, 16, 4096, 97, c=512, r=64), tree, scale, "tree verify, float32")


def paged(ops, page: int, seed: int):
    """ops' kv / pe rows in block pools of `page` slots with shuffled blocks (block 0 never handed
    out): (kv pool, pe pool, block table `[B, blocks per row]`)."""
    _, _, kv, pe = ops
    b, s = kv.shape[:2]
    per_row = -(-s // page)
    n_blocks = 1 + b * per_row
    table = (torch.randperm(n_blocks - 1, generator=_gen(seed), device=DEV)[: b * per_row] + 1).view(b, per_row)
    pools = []
    for rows in (kv, pe):
        pool = torch.zeros(n_blocks, page, rows.shape[-1], dtype=rows.dtype, device=DEV)
        padded = torch.zeros(b, per_row * page, rows.shape[-1], dtype=rows.dtype, device=DEV)
        padded[:, :s] = rows
        pool[table.flatten()] = padded.view(b * per_row, page, -1)
        pools.append(pool)
    return pools[0], pools[1], table


def check_attention_paged() -> None:
    """Over block pools read through a block table (the paged cache of the server) the kernel
    equals itself over the dense rows, bit for bit, and over FP8 latent pools it equals itself over
    the decoded rows; DeepSeek-V3 sizes when not a dry run."""
    from specdec.kernels import fp8_cache, triton_attention

    lengths = torch.tensor([5, 33, 64, 100], device=DEV)
    cases = [(operands(4, 1, 16, 100, 110), (torch.arange(100, device=DEV) < lengths[:, None]).unsqueeze(1), 16,
              0.09, "ragged decode, page 16"),
             (operands(2, 12, 4, 45, 111), tree_mask([30, 7], [12, 9], 12, 45, 112), 8, 0.09, "tree, page 8")]
    if LARGE:
        lengths = torch.tensor([4096, 1000, 3000, 17], device=DEV)
        cases.append((operands(4, 1, 16, 4096, 113, c=512, r=64, dtype=torch.bfloat16),
                      (torch.arange(4096, device=DEV) < lengths[:, None]).unsqueeze(1), 64, 192 ** -0.5,
                      "decode, 16 heads, bf16, page 64"))
    for ops, mask, page, scale, label in cases:
        kv_pool, pe_pool, table = paged(ops, page, 114)
        got = triton_attention.mla_attention(*ops[:2], kv_pool, pe_pool, mask, scale, block_table=table)
        assert torch.equal(got, triton_attention.mla_attention(*ops, mask, scale)), f"{label}: paged != dense"
        # the FP8 latent cache (--kv-cache-dtype fp8), decoded in the kernel as tiles are read
        q, qp, kv, pe = ops
        stored = fp8_cache.encode(kv)
        decoded = fp8_cache.decode(stored, kv.dtype)
        kv_pool, pe_pool, table = paged((q, qp, stored, pe), page, 115)
        got = triton_attention.mla_attention(q, qp, kv_pool, pe_pool, mask, scale, block_table=table)
        want = triton_attention.mla_attention(q, qp, decoded, pe, mask, scale)
        assert torch.equal(got, want), f"{label}, fp8 latents: in-kernel decode != decoded rows"


def check_grouped_experts() -> None:
    """Unquantised bf16 routed experts as grouped GEMMs (`kernels.experts.grouped`, the CUDA backend
    of `model.prepare.GroupedExperts`) against each expert run on its tokens in float32: crowded and
    empty experts, slots of another rank's experts; V3's expert shapes when not a dry run."""
    from specdec.kernels import experts

    n_experts, inter, dim, tokens, topk = (32, 2048, 7168, 96, 8) if LARGE else (8, 64, 128, 9, 2)
    g = _gen(120)
    gate_up = (torch.randn(n_experts, 2 * inter, dim, device=DEV, generator=g) * dim ** -0.5).to(torch.bfloat16)
    down = (torch.randn(n_experts, dim, inter, device=DEV, generator=g) * inter ** -0.5).to(torch.bfloat16)
    x = torch.randn(tokens, dim, device=DEV, generator=g).to(torch.bfloat16)
    weights = torch.rand(tokens, topk, device=DEV, generator=g)
    first = 3  # experts 3 … 3 + n_experts - 1 are this rank's; ids below are another rank's
    indices = torch.randint(0, n_experts // 2, (tokens, topk), device=DEV, generator=g)  # half the experts empty
    indices[:, 0] = first + 1  # one crowded expert
    got = experts.grouped(x, weights, indices, first, gate_up, down).float()
    want = torch.zeros(tokens, dim, device=DEV)
    for e in range(n_experts):
        token, choice = torch.nonzero(indices == first + e, as_tuple=True)
        if len(token):
            h = x[token].float() @ gate_up[e].float().T
            y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ down[e].float().T
            want.index_add_(0, token, y * weights[token, choice].unsqueeze(1))
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < 2e-2, f"grouped experts: relative error {err:.2e} against the float32 per-expert sum"


CHECKS: dict[str, tuple[Callable[[], None], bool]] = {  # name -> (check, needs FP8)
    "grouped_fp8_gemm": (check_grouped_fp8_gemm, True),
    "act_quant": (check_act_quant, True),
    "weight_dequant": (check_weight_dequant, True),
    "fp8_gemm": (check_fp8_gemm, True),
    "fp8_linear": (check_fp8_linear, True),
    "attention_masks": (check_attention_masks, False),
    "attention_dtypes_and_views": (check_attention_dtypes_and_views, False),
    "attention_deepseek_sizes": (check_attention_deepseek_sizes, False),
    "attention_paged": (check_attention_paged, False),
    "grouped_experts": (check_grouped_experts, False),
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python bench/gpu_kernels.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--only", default="", help=f"comma-separated checks to run (default: all of {', '.join(CHECKS)})")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU tensors through the Triton interpreter (needs TRITON_INTERPRET=1), small cases only")
    a = p.parse_args(argv)
    global DEV, LARGE
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if a.dry_run != interpreted:
        print("gpu_kernels.py: error: " + ("--dry-run needs TRITON_INTERPRET=1" if a.dry_run else
              "TRITON_INTERPRET=1 would run the interpreter, not the GPU: unset it (or pass --dry-run)"),
              file=sys.stderr)
        return 2
    only = [n for n in a.only.split(",") if n]
    unknown = [n for n in only if n not in CHECKS]
    if unknown:
        print(f"gpu_kernels.py: error: --only: unknown check {unknown[0]!r} (checks: {', '.join(CHECKS)})",
              file=sys.stderr)
        return 2
    if a.dry_run:
        DEV, LARGE, fp8_ok = "cpu", False, True
        print(f"device: CPU through the Triton interpreter (dry run), torch {torch.__version__}")
    else:
        if not torch.cuda.is_available():
            print("gpu_kernels.py: error: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # the references must be exact float32 maths
        torch.backends.cudnn.allow_tf32 = False
        fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
        print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
              f"torch {torch.__version__}, triton {__import__('triton').__version__}")
    results: dict[str, str] = {}
    for name, (check, needs_fp8) in CHECKS.items():
        if only and name not in only:
            continue
        if needs_fp8 and not fp8_ok:
            results[name] = "skipped (needs compute capability 8.9+)"
        else:
            try:
                check()
                results[name] = "ok"
            except Exception as e:  # noqa: BLE001 - every failure is reported, not only the first
                results[name] = f"FAILED: {type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
        print(f"  {name:32s} {results[name]}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    failed = [n for n, r in results.items() if r.startswith("FAILED")]
    print(f"{len(results) - len(failed)}/{len(results)} kernel checks passed" + (f"; FAILED: {', '.join(failed)}"
                                                                                 if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
