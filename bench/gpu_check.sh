#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU checks of specdec, in one go, on a machine with an NVIDIA GPU.
#
#   bash bench/gpu_check.sh            # from the repository root; results in bench/results/gpu/
#
# 1. Environment: if python3 already has a CUDA build of torch (a system or venv Python: a venv
#    made from a venv would not see its packages), it runs everything and nothing is downloaded;
#    otherwise (or with $GPU_VENV set) the venv $GPU_VENV (default .venv-gpu) is created when
#    missing and pip installs the default (CUDA) torch wheel into it -- never the CPU pin
#    torch==2.13.0 of the Makefile. specdec runs from the source tree (PYTHONPATH, no
#    install); its dependencies (triton, safetensors, tokenizers, transformers, tqdm, numpy) are
#    pip-installed only if they do not import.
# 2. Kernels: bench/gpu_kernels.py compiles the Triton kernels of kernels/ for this GPU and
#    compares them with the torch references (act_quant and weight_dequant bit-exact, fp8_gemm,
#    grouped_fp8_gemm and mla_attention within tolerance, including DeepSeek-V3 sizes, and mla_attention
#    over a paged cache equal to it over dense rows). The test suite only runs
#    them under TRITON_INTERPRET=1 on the CPU.
# 3. FP8 GEMM micro-benchmark: Triton fp8_gemm / fp8_linear vs dequant+matmul vs BF16 matmul at
#    DeepSeek-V3 671B projection shapes, TFLOP/s, and the grouped FP8 expert GEMM (one launch for
#    32 local experts) against per-expert calls (bench/gpu_bench.py gemm).
# 4. Decode attention at V3 latent sizes: the paged cache read in place against gathering its rows,
#    the FP8 latent cache decoded in the kernel against decoding its rows (bench/gpu_bench.py attention).
# 5. Verify-step micro-benchmark on the embedded default model on CUDA: plain decode step vs
#    verifier forward over 1/4/8/16 tree nodes, MTP forward, and greedy generate (plain, chain,
#    tree) checked token-equal to plain decoding (bench/gpu_bench.py verify).
# 6. CUDA graphs: greedy generate with every step replayed from a captured graph (--cuda-graphs)
#    against the same engine eager, tokens/s at batch 1, 8 and 32, tokens equal at batch 1
#    (bench/gpu_bench.py graphs). The embedded model is unquantised: on CUDA its routed experts run
#    as grouped GEMMs (model.prepare.GroupedExperts), which steps 2 (grouped_experts), 5 and 6 exercise.
# 7. Batch-invariant mode (--batch-invariant, Triton's fixed-tile kernels, bf16): a chain of drafts
#    verified in one forward bitwise equal to its tokens decoded alone, and greedy MTP (chain 3,
#    adaptive 3) token-equal to plain decoding at batch 1 and 8, with the mode's tokens/s against the
#    usual kernels (bench/gpu_bench.py invariant). The CPU tests prove the kernels' structure under
#    the interpreter; only a GPU shows that its MMA sums each row alike whatever the rows beside it.
#
# Each step has its own time limit (STEP_TIMEOUT seconds, default 240) and the script goes on
# after a failure; the exit status is non-zero if any step failed. It ends with one verdict table
# (step, verdict, seconds; also $OUT/verdicts.json). Everything should take 4-6 minutes on an
# H100/H200 (most of it Triton compilation; never run on a GPU yet), plus the venv set-up if a
# torch wheel has to be downloaded.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
mkdir -p "$OUT"
unset TRITON_INTERPRET

log() { printf '\n== %s ==\n' "$*"; }

log "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi not found"
if [ -z "${GPU_VENV:-}" ] && python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY=python3   # python3 already has a CUDA torch (maybe a venv's own): used as it is
else
    GPU_VENV=${GPU_VENV:-.venv-gpu}
    PY="$GPU_VENV/bin/python"
    [ -x "$PY" ] || python3 -m venv "$GPU_VENV"
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q torch           # the default wheel is a CUDA build on Linux x86_64
    fi
fi
for mod in triton safetensors tokenizers transformers tqdm numpy; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q "$mod"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import torch, sys; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name()); sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no usable CUDA device for $PY: stopping" >&2
    exit 2
fi

status=0
verdicts=()
step() {  # step NAME CMD...: run with a time limit, keep the log, remember the verdict
    local name=$1; shift
    log "$name"
    local start=$SECONDS
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]} verdict=passed
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && verdict="timed out after ${STEP_TIMEOUT}s" || verdict="FAILED (exit $rc)"
        echo "STEP $name $verdict" >&2
        status=1
    fi
    verdicts+=("$name|$verdict|$((SECONDS - start))")
}

step kernels "$PY" bench/gpu_kernels.py --json "$OUT/kernels.json"
step gemm "$PY" bench/gpu_bench.py gemm --json "$OUT/gemm.json"
step attention "$PY" bench/gpu_bench.py attention --json "$OUT/attention.json"
step verify "$PY" bench/gpu_bench.py verify --json "$OUT/verify.json"
step graphs "$PY" bench/gpu_bench.py graphs --json "$OUT/graphs.json"
step invariant "$PY" bench/gpu_bench.py invariant --json "$OUT/invariant.json"

log "summary"
echo "| step | verdict | seconds |"
echo "|---|---|---|"
for v in "${verdicts[@]}"; do IFS='|' read -r name verdict secs <<< "$v"; echo "| $name | $verdict | $secs |"; done
printf '%s\n' "${verdicts[@]}" | "$PY" -c 'import json, sys; rows = [l.rstrip("\n").split("|") for l in sys.stdin if l.strip()]; json.dump([{"step": n, "verdict": v, "seconds": int(s)} for n, v, s in rows], sys.stdout, indent=2)' > "$OUT/verdicts.json"
echo "logs and JSON in $OUT (verdicts.json: the table above)"
[ "$status" -eq 0 ] && echo "all GPU checks passed" || echo "some GPU checks FAILED"
exit "$status"
