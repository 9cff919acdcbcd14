"""`python bench/gpu_bench.py {gemm,attention,verify,all}`: CUDA micro-benchmarks.

gemm    FP8 block-scaled GEMM `y = x @ W^T` at DeepSeek-V3 (671B) projection shapes and a few row
        counts M (decode batch / tree nodes / prefill chunk): Triton `fp8_gemm` on pre-quantised
        activations, Triton `fp8_linear` (act_quant + fp8_gemm), per-call dequantisation + BF16 matmul
        (`weight_dequant` then cuBLAS), and BF16 matmul on weights dequantised once (cuBLAS; the
        memory-hungry baseline). TFLOP/s = 2·M·N·K / time (median of `triton.testing.do_bench`).
attention  decode attention at DeepSeek-V3 latent sizes: the Triton kernel over dense rows, over a
        paged pool read in place against gathering the rows first, over an FP8 latent pool decoded in
        the kernel against decoding the rows first (ms per layer).
invariant  the batch-invariant mode (`--batch-invariant`, Triton kernels) on the embedded model in bf16:
        a 4-draft chain's verified logits against its tokens decoded one by one (bitwise equal with the
        mode: the verdict; the usual kernels' difference reported), and greedy generate plain / chain 3 /
        adaptive 3 with the mode, token-equal to its plain decoding, tokens/s against the usual kernels.
verify  the embedded default model (or --ckpt-path) on CUDA: one verifier forward over the root + N
        draft-tree nodes (N = 0 is a plain decode step) for batch 1 and 8, the MTP forward, and an
        end-to-end greedy generate (plain, chain 2, tree 3x2x6) with tokens/s, speedup and the
        token-equality check against plain decoding (a mismatch makes the exit status 1).

Markdown on stdout; `--json FILE` writes the numbers too. Exit 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# (name, N, K) of DeepSeek-V3 671B projections (unsharded): y[M, N] = x[M, K] @ W[N, K]^T
SHAPES_671B = [
    ("attn wq_a", 1536, 7168),
    ("attn wq_b", 24576, 1536),
    ("attn wkv_a", 576, 7168),
    ("attn wo", 7168, 16384),
    ("dense w1", 18432, 7168),
    ("dense w2", 7168, 18432),
    ("expert w1", 2048, 7168),
    ("expert w2", 7168, 2048),
]
ROWS = [1, 16, 128, 1024]


DEVICE = "cuda"


def _ms(fn) -> float:
    """Median milliseconds of `fn` (triton's do_bench on CUDA; a plain timer loop on the CPU)."""
    if DEVICE != "cuda":
        import statistics
        import time

        fn()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench_gemm(rows: list[int], shapes=SHAPES_671B) -> list[dict]:
    from specdec import kernels
    from specdec.kernels import reference as ref

    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k in shapes:
        w_fp8, w_s = ref.weight_quant(torch.randn(n, k, device="cuda", generator=g))
        w_bf16 = kernels.weight_dequant(w_fp8, w_s, out_dtype=torch.bfloat16, impl="triton")
        for m in rows:
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            a, a_s = kernels.act_quant(x, impl="triton")
            flop = 2.0 * m * n * k
            times = {
                "triton fp8_gemm": _ms(lambda: kernels.fp8_gemm(a, a_s, w_fp8, w_s, out_dtype=torch.bfloat16,
                                                                impl="triton")),
                "triton fp8_linear": _ms(lambda: kernels.fp8_linear(x, w_fp8, w_s, impl="triton")),
                "dequant + bf16 matmul": _ms(lambda: x @ kernels.weight_dequant(w_fp8, w_s, out_dtype=torch.bfloat16,
                                                                                impl="triton").T),
                "bf16 matmul (pre-dequantised)": _ms(lambda: x @ w_bf16.T),
            }
            out.append({"shape": name, "M": m, "N": n, "K": k,
                        **{f"{impl} ms": t for impl, t in times.items()},
                        **{f"{impl} TFLOP/s": flop / (t * 1e-3) / 1e12 for impl, t in times.items()}})
        torch.cuda.empty_cache()
    return out


def bench_grouped(tokens: list[int], n_experts: int = 32, topk: int = 8, n: int = 2048, k: int = 7168) -> list[dict]:
    """One MoE projection of a rank holding `n_experts` of V3's 256 experts ([2048, 7168] each;
    32 = one rank of 8), `tokens` tokens × `topk` routed slots spread uniformly over all 256
    experts: the grouped FP8 GEMM (one launch) against a loop of per-expert `fp8_gemm` calls and
    against dequantise + BF16 matmul per expert. TFLOP/s counts the local slots' FLOPs only."""
    from specdec import kernels
    from specdec.kernels import reference as ref

    g = torch.Generator(device="cuda").manual_seed(1)
    quantised = [ref.weight_quant(torch.randn(n, k, device="cuda", generator=g)) for _ in range(n_experts)]
    w, w_s = torch.stack([q[0] for q in quantised]), torch.stack([q[1] for q in quantised])
    del quantised
    out = []
    for t in tokens:
        ids = torch.randint(0, 256, (t * topk,), device="cuda", generator=g)
        local = torch.where(ids < n_experts, ids, -1)
        a, a_s = kernels.act_quant(torch.randn(t * topk, k, device="cuda", generator=g).bfloat16(), impl="triton")
        rows_of = [(local == e).nonzero().squeeze(1) for e in range(n_experts)]

        def loop(dequant: bool) -> None:
            for e, rows in enumerate(rows_of):
                if rows.numel():
                    if dequant:
                        kernels.weight_dequant(w[e], w_s[e], out_dtype=torch.bfloat16, impl="triton")
                    else:
                        kernels.fp8_gemm(a[rows], a_s[rows], w[e], w_s[e], out_dtype=torch.bfloat16, impl="triton")

        times = {
            "grouped fp8 (1 launch)": _ms(lambda: kernels.grouped_fp8_gemm(a, a_s, w, w_s, local, torch.bfloat16,
                                                                            impl="triton")),
            "fp8_gemm per expert": _ms(lambda: loop(False)),
            "dequant per expert (no matmul)": _ms(lambda: loop(True)),
        }
        flop = 2.0 * int((local >= 0).sum()) * n * k
        out.append({"tokens": t, "local slots": int((local >= 0).sum()), "experts": n_experts,
                    **{f"{impl} ms": v for impl, v in times.items()},
                    **{f"{impl} TFLOP/s": flop / (v * 1e-3) / 1e12 for impl, v in times.items()}})
    return out


def bench_verify(ckpt: str | None, nodes: list[int], batches: list[int], new_tokens: int) -> tuple[list[dict], list[dict], bool]:
    import time

    from specdec.bench.microbench import heap_tree, prepare
    from specdec.bench.prompt_set import HELDOUT_FILE, load_prompt_file
    from specdec.bench.stats import compare_outputs
    from specdec import Engine, SpecConfig

    eng = Engine.from_pretrained(ckpt, device=DEVICE, max_seq_len=1024)
    ids = eng.encode([p.prompt for p in load_prompt_file(HELDOUT_FILE)[: max(batches + [8])]])
    steps_rows = []
    for batch in batches:
        steps = prepare(eng, ids[:batch])

        def decode():
            steps.reset()
            steps.decode()

        base = _ms(decode)
        steps.reset()  # the last decode's length bump: the verify views end where the lengths began
        steps_rows.append({"batch": batch, "step": "plain decode (1 token)", "nodes": 0, "ms": base, "x plain": 1.0})
        for n in nodes:
            tree = heap_tree(batch, n, eng.args.vocab_size, eng.device)
            t = _ms(lambda: steps.verify(tree))
            steps_rows.append({"batch": batch, "step": f"verify root + {n} nodes", "nodes": n, "ms": t, "x plain": t / base})
        t = _ms(steps.mtp_forward)
        steps_rows.append({"batch": batch, "step": "MTP forward (1 token)", "nodes": 0, "ms": t, "x plain": t / base})
    e2e, ok = [], True
    groups = [ids[i : i + 8] for i in range(0, len(ids), 8)][:1]
    plain_out = None
    for label, spec in [("plain", None), ("chain 2", SpecConfig(depth=2, adaptive=False)),
                        ("adaptive 3", SpecConfig(depth=3)), ("tree 3x2x6", SpecConfig(3, 2, 6))]:
        eng.generate(groups[0], max_new_tokens=8, spec=spec)  # warm-up (and Triton compilation)
        _sync()
        t0 = time.perf_counter()
        out = eng.generate(groups[0], max_new_tokens=new_tokens, spec=spec)
        _sync()
        wall = time.perf_counter() - t0
        plain_out = plain_out or (out, wall)
        same = compare_outputs(out.token_ids, plain_out[0].token_ids)
        ok &= same["equal"]
        e2e.append({"config": label, "batch": len(groups[0]), "tokens": out.stats.tokens, "tokens_per_s": out.stats.tokens / wall,
                    "tau": out.stats.tau, "speedup": (out.stats.tokens / wall) / (plain_out[0].stats.tokens / plain_out[1]),
                    "equal_to_plain": same["equal"], "identical_token_share": same["identical_token_share"]})
    return steps_rows, e2e, ok


def bench_invariant(ckpt: str | None, batches: list[int], new_tokens: int) -> tuple[list[dict], list[dict], bool]:
    """The batch-invariant mode against the usual kernels on the same checkpoint: (logits rows,
    generate rows, verdict). Verdict: verified logits bitwise equal to decoded ones with the mode,
    and every MTP configuration's tokens equal to the mode's plain decoding."""
    import time

    from specdec.bench.invariance import verified_and_decoded
    from specdec.bench.prompt_set import HELDOUT_FILE, load_prompt_file
    from specdec import Engine, SpecConfig

    usual = Engine.from_pretrained(ckpt, device=DEVICE, max_seq_len=1024)
    invariant = Engine.from_pretrained(ckpt, device=DEVICE, max_seq_len=1024, batch_invariant="auto")
    ids = usual.encode([p.prompt for p in load_prompt_file(HELDOUT_FILE)[: max(batches + [2])]])
    logits_rows = []
    for label, eng in (("usual", usual), ("batch-invariant", invariant)):
        verified, decoded = verified_and_decoded(eng.model, ids[0], ids[1][:5])
        logits_rows.append({"kernels": label, "dtype": str(eng.model.dtype), "bitwise equal": torch.equal(verified, decoded),
                            "max abs difference": float((verified - decoded).abs().max())})
    ok = logits_rows[1]["bitwise equal"]
    runs = []
    for batch in batches:
        plain_tokens, base = None, None
        for label, eng, spec in [("usual plain", usual, None), ("invariant plain", invariant, None),
                                 ("invariant chain 3", invariant, SpecConfig(depth=3, adaptive=False)),
                                 ("invariant adaptive 3", invariant, SpecConfig(depth=3))]:
            eng.generate(ids[:batch], max_new_tokens=8, spec=spec)  # warm-up (and Triton compilation)
            _sync()
            t0 = time.perf_counter()
            out = eng.generate(ids[:batch], max_new_tokens=new_tokens, spec=spec)
            _sync()
            rate = out.stats.tokens / (time.perf_counter() - t0)
            base = base or rate
            if label == "invariant plain":
                plain_tokens = out.token_ids
            equal = None if plain_tokens is None else out.token_ids == plain_tokens
            ok &= equal is not False
            runs.append({"batch": batch, "config": label, "tokens_per_s": rate, "x usual plain": rate / base,
                         "tau": out.stats.tau, "equal to invariant plain": equal})
    return logits_rows, runs, ok


def bench_graphs(ckpt: str | None, batches: list[int], new_tokens: int) -> tuple[list[dict], bool]:
    """Greedy generate with every step replayed from a CUDA graph (`--cuda-graphs`) against the same
    engine eager: tokens/s of each and whether the tokens agree, per batch size and configuration.
    Each configuration runs once untimed first (captures, Triton compilation). Verdict: at batch 1
    (whose row bucket is the batch itself: the captured step runs the eager step's shapes) the
    tokens must be equal; at larger batches rows that finish leave padding rows in the bucket,
    whose bf16 GEMMs may round otherwise, so the identical share is reported."""
    import time

    from specdec.bench.prompt_set import HELDOUT_FILE, load_prompt_file
    from specdec.bench.stats import compare_outputs
    from specdec import Engine, SpecConfig

    eager = Engine.from_pretrained(ckpt, device=DEVICE, max_seq_len=1024)
    graphed = Engine.from_pretrained(ckpt, device=DEVICE, max_seq_len=1024, cuda_graphs=DEVICE == "cuda")
    if DEVICE != "cuda":  # --cpu-dry-run: the CPU's stand-in capture (specdec.graphs.capture_by_rerun)
        from specdec.graphs import capture_by_rerun

        graphed.use_cuda_graphs(capture=capture_by_rerun)
    prompts = load_prompt_file(HELDOUT_FILE)
    ids = eager.encode([prompts[i % len(prompts)].prompt for i in range(max(batches))])
    rows, ok = [], True
    for batch in batches:
        for label, spec in [("plain", None), ("chain 3", SpecConfig(depth=3, adaptive=False)),
                            ("adaptive 3", SpecConfig(depth=3))]:
            timed = {}
            for name, eng in (("eager", eager), ("graphs", graphed)):
                eng.generate(ids[:batch], max_new_tokens=new_tokens, spec=spec)  # untimed: captures, compilation
                _sync()
                t0 = time.perf_counter()
                out = eng.generate(ids[:batch], max_new_tokens=new_tokens, spec=spec)
                _sync()
                timed[name] = (out, time.perf_counter() - t0)
            (e_out, e_wall), (g_out, g_wall) = timed["eager"], timed["graphs"]
            same = compare_outputs(g_out.token_ids, e_out.token_ids)
            ok &= same["equal"] or batch > 1
            rows.append({"batch": batch, "config": label, "eager tokens/s": e_out.stats.tokens / e_wall,
                         "graphs tokens/s": g_out.stats.tokens / g_wall,
                         "graphs x eager": e_wall / g_wall * g_out.stats.tokens / e_out.stats.tokens,
                         "tau": g_out.stats.tau, "equal to eager": same["equal"],
                         "identical token share": same["identical_token_share"]})
    print(f"captures: {graphed.graphs.captures}")
    return rows, ok


def bench_attention(batches: list[int], seq_len: int = 4096, heads: int = 16, page: int = 64) -> list[dict]:
    """Decode attention at DeepSeek-V3 latent sizes (C 512, R 64, bf16, `heads` local heads, rows of
    `seq_len` slots): the Triton kernel over dense rows; over a paged pool read in place, against
    gathering the rows first (what the torch path does); and over an FP8 latent pool decoded in the
    kernel, against decoding the rows first. Milliseconds per call (one layer)."""
    from specdec.kernels import fp8_cache, paged, triton_attention

    c, r, scale = 512, 64, 192 ** -0.5
    out = []
    for b in batches:
        g = torch.Generator(device=DEVICE).manual_seed(b)
        q = torch.randn(b, 1, heads, c, generator=g, device=DEVICE).bfloat16()
        qp = torch.randn(b, 1, heads, r, generator=g, device=DEVICE).bfloat16()
        per_row = seq_len // page
        table = (torch.randperm(b * per_row, generator=g, device=DEVICE) + 1).view(b, per_row)
        kv_pool = torch.randn(b * per_row + 1, page, c, generator=g, device=DEVICE).bfloat16()
        pe_pool = torch.randn(b * per_row + 1, page, r, generator=g, device=DEVICE).bfloat16()
        fp8_pool = fp8_cache.encode(kv_pool)
        mask = torch.ones(b, 1, seq_len, dtype=torch.bool, device=DEVICE)
        kv, pe = paged.dense_rows(kv_pool, table, b, seq_len), paged.dense_rows(pe_pool, table, b, seq_len)

        def gathered():
            rows = (paged.dense_rows(pool, table, b, seq_len) for pool in (kv_pool, pe_pool))
            return triton_attention.mla_attention(q, qp, *rows, mask, scale)

        def decoded():
            rows = fp8_cache.decode(paged.dense_rows(fp8_pool, table, b, seq_len), torch.bfloat16)
            return triton_attention.mla_attention(q, qp, rows, pe, mask, scale)

        out.append({
            "batch": b, "slots": seq_len,
            "dense ms": _ms(lambda: triton_attention.mla_attention(q, qp, kv, pe, mask, scale)),
            "paged in place ms": _ms(lambda: triton_attention.mla_attention(q, qp, kv_pool, pe_pool, mask, scale,
                                                                            block_table=table)),
            "gather + dense ms": _ms(gathered),
            "fp8 paged in place ms": _ms(lambda: triton_attention.mla_attention(q, qp, fp8_pool, pe_pool, mask,
                                                                                scale, block_table=table)),
            "decode + dense ms": _ms(decoded),
        })
    return out


def table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["gemm", "attention", "verify", "graphs", "invariant", "all"])
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="GEMM row counts M (default 1,16,128,1024)")
    p.add_argument("--ckpt-path", help="checkpoint for the verify benchmark (default: the embedded model)")
    p.add_argument("--nodes", default="1,4,8,16", help="draft-tree nodes verified (default 1,4,8,16)")
    p.add_argument("--batches", default="1,8", help="batch sizes of the verify benchmark (default 1,8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--graph-batches", default="1,8,32", help="batch sizes of the graphs benchmark (default 1,8,32)")
    p.add_argument("--json", help="write the numbers to this file")
    p.add_argument("--cpu-dry-run", action="store_true", help="run `verify` on the CPU (checks the script, not the GPU)")
    a = p.parse_args(argv)
    global DEVICE
    if a.cpu_dry_run:
        DEVICE = "cpu"
        if a.what not in ("verify", "graphs", "invariant"):
            print("gpu_bench.py: error: --cpu-dry-run runs only `verify`, `graphs` and `invariant`", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("gpu_bench.py: error: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)"
    print(f"device: {where}, torch {torch.__version__}, triton {__import__('triton').__version__}\n")
    result, status = {}, 0
    if a.what in ("gemm", "all"):
        if torch.cuda.get_device_capability() < (8, 9):
            print("FP8 GEMM benchmark skipped: needs compute capability 8.9+\n")
        else:
            rows = bench_gemm([int(m) for m in a.rows.split(",")])
            result["gemm"] = rows
            impls = ["triton fp8_gemm", "triton fp8_linear", "dequant + bf16 matmul", "bf16 matmul (pre-dequantised)"]
            print("### FP8 GEMM, DeepSeek-V3 671B shapes (TFLOP/s; higher is better)\n")
            print(table(rows, ["shape", "M", "N", "K"] + [f"{i} TFLOP/s" for i in impls]))
            print()
            grouped = bench_grouped([1, 8, 32, 128, 512])
            result["grouped"] = grouped
            impls = ["grouped fp8 (1 launch)", "fp8_gemm per expert", "dequant per expert (no matmul)"]
            print("### Grouped FP8 experts: 32 local experts [2048, 7168], top-8 of 256 (ms; lower is better)\n")
            print(table(grouped, ["tokens", "local slots"] + [f"{i} ms" for i in impls] +
                        ["grouped fp8 (1 launch) TFLOP/s"]))
            print()
    if a.what in ("attention", "all"):
        rows = bench_attention([1, 8, 32])
        result["attention"] = rows
        print("### Decode attention, V3 latent sizes, bf16, 16 heads, 4,096 slots, blocks of 64 (ms per layer)\n")
        print(table(rows, list(rows[0])))
        print()
    if a.what in ("verify", "all"):
        steps, e2e, ok = bench_verify(a.ckpt_path, [int(n) for n in a.nodes.split(",")],
                                      [int(b) for b in a.batches.split(",")], a.max_new_tokens)
        result["verify_steps"], result["generate"] = steps, e2e
        print(f"### One step on {DEVICE} (median ms; x plain = time / plain decode step)\n")
        print(table(steps, ["batch", "step", "ms", "x plain"]))
        print(f"\n### Greedy generate on {DEVICE} (one call of {len(e2e) and e2e[0]['batch']} rows, warm)\n")
        print(table(e2e, ["config", "batch", "tokens", "tokens_per_s", "tau", "speedup", "equal_to_plain"]))
        print()
        if not ok:
            print(f"FAILED: speculative greedy output differs from plain decoding on {DEVICE}", file=sys.stderr)
            status = 1
    if a.what in ("graphs", "all"):
        rows, ok = bench_graphs(a.ckpt_path, [int(b) for b in a.graph_batches.split(",")], a.max_new_tokens)
        result["graphs"] = rows
        print(f"### Greedy generate on {DEVICE}: steps replayed from CUDA graphs against eager (warm)\n")
        print(table(rows, list(rows[0])))
        print()
        if not ok:
            print("FAILED: at batch 1 the graph-replayed tokens differ from eager decoding", file=sys.stderr)
            status = 1
    if a.what in ("invariant", "all"):
        logits, runs, ok = bench_invariant(a.ckpt_path, [int(b) for b in a.batches.split(",")], a.max_new_tokens)
        result["invariant_logits"], result["invariant_generate"] = logits, runs
        print(f"### Batch-invariant mode on {DEVICE}: a chain of 4 drafts verified in one forward vs decoded alone\n")
        print(table(logits, list(logits[0])))
        print(f"\n### Greedy generate on {DEVICE} with the batch-invariant kernels (warm)\n")
        print(table(runs, list(runs[0])))
        print()
        if not ok:
            print("FAILED: the batch-invariant mode's verified logits or MTP tokens differ from decoding alone",
                  file=sys.stderr)
            status = 1
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
