"""Fixtures of the micro-benchmarks: the embedded default model (or `SPECDEC_BENCH_CKPT`), prefilled
with held-out prompts. Every benchmark runs a fixed number of rounds (pedantic mode), so the whole
suite takes about a minute on 2 CPU cores; set SPECDEC_BENCH_ROUNDS to change it."""

from __future__ import annotations

import os

import pytest
import torch

from specdec.bench.microbench import prepare
from specdec.bench.prompt_set import HELDOUT_FILE, load_prompt_file
from specdec import Engine

ROUNDS = int(os.environ.get("SPECDEC_BENCH_ROUNDS", "30"))


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine.from_pretrained(os.environ.get("SPECDEC_BENCH_CKPT") or None, max_seq_len=1024)


@pytest.fixture(scope="session")
def prompt_ids(engine) -> list[list[int]]:
    return engine.encode([p.prompt for p in load_prompt_file(HELDOUT_FILE)[:16]])


@pytest.fixture(scope="session", params=[1, 4], ids=lambda b: f"batch{b}")
def steps(request, engine, prompt_ids):
    """A prefilled batch of 1 or 4 held-out prompts."""
    return prepare(engine, prompt_ids[: request.param])


def run_rounds(benchmark, fn, setup=None):
    """`fn` timed over ROUNDS rounds of one call each, after one warm-up round."""
    def wrapped_setup():
        if setup is not None:
            setup()
        return (), {}

    return benchmark.pedantic(fn, setup=wrapped_setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record torch's thread count (set it with OMP_NUM_THREADS) with the results."""
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["torch"] = torch.__version__
