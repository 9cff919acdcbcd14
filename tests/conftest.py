"""Shared fixtures: small synthetic checkpoints in the exact HF layout, written once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# measured GEMM plans and step costs go to a cache of this test process's own, never the user's (nor,
# under pytest-xdist, another worker's)
os.environ["SPECDEC_CACHE"] = tempfile.mkdtemp(prefix="specdec-test-cache-")
# `make test` runs the suite in pytest-xdist workers: each takes its share of the cores, so that
# workers (and the processes their tests start, which inherit OMP_NUM_THREADS) do not oversubscribe them
if _workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // int(_workers))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

from specdec.bench.peers import import_hub_kernels  # noqa: E402
from specdec.model.synthetic import small_config, write_random_checkpoint  # noqa: E402

import_hub_kernels()  # run from the checkout, its kernels/ folder must not pass for Hugging Face's to transformers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fp8_ckpt(tmp_path_factory) -> Path:
    """FP8 checkpoint (block projections in float8_e4m3fn + scales, MTP layer), several shards."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "fp8", small_config(), fp8=True,
                                   shard_bytes=300_000)


@pytest.fixture(scope="session")
def f32_ckpt(tmp_path_factory) -> Path:
    """Float32 checkpoint of the same random weights (for exact peer checks)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "f32", small_config(), fp8=False,
                                   shard_bytes=1_000_000)


def run_cli(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `python <args>` in the repo with a clean, offline environment; capture text output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="session")
def tiny_vocab_ckpt(tmp_path_factory) -> Path:
    """Float32 checkpoint with an 8-token vocabulary: random drafts are often accepted, and joint
    distributions of a few tokens have few enough cells for exact goodness-of-fit tests."""
    cfg = small_config(vocab_size=8, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
                       qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "v8", cfg, fp8=False, seed=3)


@pytest.fixture(scope="session")
def f32_engine(f32_ckpt):
    """Engine over the float32 checkpoint (vocab 512), cache room for 160 tokens."""
    import torch

    from specdec import Engine

    return Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=160)


@pytest.fixture(scope="session")
def tiny_engine(tiny_vocab_ckpt):
    """Engine over the 8-token model; no end-of-sequence token, so every row runs to max_new_tokens."""
    import torch

    from specdec import Engine

    engine = Engine.from_pretrained(tiny_vocab_ckpt, device="cpu", dtype=torch.float32, max_seq_len=64)
    engine.eos_ids = frozenset()
    return engine
