"""Failure behaviour: rank faults under torchrun, Ctrl-C, long runs, and the memory planner."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from specdec.model.args import load_model_args
from specdec.model.convert import convert
from specdec.model.load import load_verifier
from specdec.model.parallel import ParallelContext
from specdec.mtp.drafter import load_drafter
from specdec import Engine, SpecConfig
from specdec.plan import plan
from tests.conftest import REPO, run_cli

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_a_failing_rank_does_not_hang_the_others(fp8_ckpt, tmp_path):
    sharded = convert(fp8_ckpt, tmp_path / "mp2", 2)
    bad = sharded / "model1-mp2.safetensors"
    bad.write_bytes(bad.read_bytes()[:1000])  # only rank 1 reads this file
    start = time.monotonic()
    proc = run_cli([*TORCHRUN, "-m", "specdec.generate", "--ckpt-path", str(sharded), "--prompt", "x"], timeout=180)
    assert time.monotonic() - start < 120
    assert proc.returncode != 0
    assert "specdec.generate: error:" in proc.stderr and "model1-mp2.safetensors" in proc.stderr


def test_ctrl_c_in_interactive_mode_ends_cleanly(fp8_ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "specdec.generate", "--ckpt-path", str(fp8_ckpt), "--interactive"],
                            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a shell's background job (e.g. `make test &`) ignores SIGINT
                            # and its children inherit that, so restore the default before exec
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.monotonic() + 120
    while not seen.endswith(">>> ") and time.monotonic() < deadline:
        seen += proc.stdout.read(1)
    assert seen.endswith(">>> ")
    # stdin stays open (closing it could end the chat by EOF first). A person's Ctrl-C comes while
    # input() waits, so give it time; press again if the first one fell before the read began.
    for _ in range(3):
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=20)
    err = proc.stderr.read()
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_soak_many_batches_no_growth_and_always_lossless(f32_ckpt):
    eng = Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=128)
    gen = torch.Generator().manual_seed(0)
    shapes = [None, SpecConfig(depth=3), SpecConfig(depth=3, topk=2, nodes=6)]

    def one_round(i: int) -> None:
        prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist()
                   for n in torch.randint(2, 12, (4,), generator=gen)]
        plain = eng.generate(prompts, max_new_tokens=16).token_ids
        for spec in shapes[1:]:
            assert eng.generate(prompts, max_new_tokens=16, spec=spec).token_ids == plain, (i, spec)
        eng.generate(prompts, max_new_tokens=16, temperature=1.0, seed=i, spec=shapes[i % 3])

    for i in range(3):  # warm-up: caches and allocator pools reach their steady size
        one_round(i)
    gc.collect()
    before = _rss_bytes()
    for i in range(3, 13):
        one_round(i)
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 32 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 10 rounds"


@pytest.mark.parametrize("world_size", [1, 2])
def test_planner_counts_exactly_the_loaded_tensors(fp8_ckpt, world_size):
    args = load_model_args(fp8_ckpt)
    for rank in range(world_size):
        ctx = ParallelContext(world_size, rank)
        model, reader = load_verifier(fp8_ckpt, ctx, keep_fp8=True, show_progress=False)
        drafter = load_drafter(model, reader, "cpu", model.fp8_block)
        loaded = list(model.parameters()) + list(drafter.layer.parameters())
        fp8 = sum(p.numel() for p in loaded if p.dtype == torch.float8_e4m3fn)
        total = sum(p.numel() * p.element_size() for p in loaded)
        m = plan(args, world_size, 2, 64, 4, dtype=torch.float32, keep_fp8=True, rank=rank)
        assert m.fp8_weights == fp8
        assert m.fp8_weights + m.fp8_scales + m.other_weights == total
        assert m.mtp_weights == sum(p.numel() * p.element_size() for p in drafter.layer.parameters())
        assert m.cache_bytes_per_token == (128 + 32) * 4 * 4  # (kv_lora + rope) x (3 layers + MTP) x fp32


def test_planner_counts_the_prefill_chunk():
    """Activations are the larger of the verify step and one prefill chunk (the last chunk of a
    full context attends over all of it), not the decode step alone."""
    args = load_model_args("configs/config_671B.json")
    small = plan(args, 16, 32, 16384, 8, prefill_chunk=512)
    whole = plan(args, 16, 32, 16384, 8, prefill_chunk=16384)
    assert small.decode_activations == whole.decode_activations
    assert whole.prefill_activations > 16 * small.prefill_activations
    assert whole.activations == whole.prefill_activations > whole.decode_activations
    # 16,384 queries x 8 local heads x 16,384 slots of float32 attention logits and probabilities
    assert whole.prefill_activations >= 16384 * 8 * 16384 * 4 * 2
    assert whole.total - small.total == whole.activations - small.activations


def test_planner_cli_on_the_671b_config():
    proc = run_cli(["-m", "specdec.plan", "--config", "configs/config_671B.json", "--world-size", "16",
                    "--max-batch-size", "32", "--max-seq-len", "16384", "--spec", "mtp", "--tree-nodes", "8",
                    "--gpu-mem-gib", "141"])
    assert proc.returncode == 0, proc.stderr
    assert "69.8 KiB per token" in proc.stdout and "fits" in proc.stdout
    assert "prefill chunk of 512 tokens" in proc.stdout
    proc = run_cli(["-m", "specdec.plan", "--config", "configs/config_671B.json", "--world-size", "3"])
    assert proc.returncode == 2 and "not divisible by world size 3" in proc.stderr


@pytest.mark.parametrize("config, world_size, spec_nodes, ranks", [
    ("configs/config_671B.json", 8, 3, [7]),    # ranks differ only in their slices: the last one's
    ("configs/config_671B.json", 16, 8, [0]),
    ("configs/config_236B.json", 8, None, [0]),   # V2: bf16 experts, no MTP layer
    ("configs/config_236B.json", 16, None, [15]),
])
def test_dry_run_pushes_full_size_steps_through_each_rank(config, world_size, spec_nodes, ranks):
    """Every shape of the real model, built as the loader builds it for a rank (on the meta device):
    a 512-token prefill chunk at the end of the context and the largest verify step."""
    from specdec.dry_run import dry_run
    lines = dry_run(load_model_args(config), world_size, 32, 16384, spec_nodes, torch.bfloat16, 512,
                    kv_cache_dtype="fp8" if world_size == 16 else "auto", ranks=ranks)
    width = spec_nodes + 1 if spec_nodes else 1
    assert len(lines) == len(ranks)
    for rank, line in zip(ranks, lines):
        assert line.startswith(f"rank {rank}/{world_size}: prefill chunk [1 x 512 tokens")
        assert f"verify step [32 x {width} tokens" in line
        assert line.count("MTP layer ok") == (2 if spec_nodes else 0)


def test_dry_run_cli_says_what_it_checked(tmp_path):
    import json

    from specdec.model.synthetic import small_config
    config = tmp_path / "config.json"
    config.write_text(json.dumps(small_config()))
    proc = run_cli(["-m", "specdec.plan", "--config", str(config), "--world-size", "2", "--max-seq-len", "64",
                    "--dry-run", "--prefill-chunk", "16"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("verifier ok, MTP layer ok") == 4 and "rank 1/2" in proc.stdout
    proc = run_cli(["-m", "specdec.plan", "--config", "configs/config_236B.json", "--world-size", "8",
                    "--spec", "none", "--dry-run", "--prefill-chunk", "0"])
    assert proc.returncode == 2 and "--prefill-chunk must be >= 1, got 0" in proc.stderr
