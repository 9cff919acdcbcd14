"""One step of each phase on the default model: verifier forward over 1 vs N tree nodes, plain
decode step, MTP draft (one MTP forward; a chain of 3; a 3x2x6 tree).

Compare within one run: e.g. `verify[batch1-nodes8]` / `decode[batch1]` is what verifying an
8-node tree costs in plain steps.
"""

from __future__ import annotations

import pytest

from specdec.bench.microbench import heap_tree
from specdec.bench.perf.conftest import run_rounds
from specdec import SpecConfig


def test_decode_step(benchmark, steps):
    benchmark.group = f"decode vs verify, batch {steps.batch}"
    run_rounds(benchmark, steps.decode, setup=steps.reset)


@pytest.mark.parametrize("nodes", [1, 4, 8, 16])
def test_verify_step(benchmark, steps, nodes):
    benchmark.group = f"decode vs verify, batch {steps.batch}"
    tree = heap_tree(steps.batch, nodes, steps.eng.args.vocab_size, steps.eng.device)
    run_rounds(benchmark, lambda: steps.verify(tree), setup=steps.reset)


def test_mtp_forward(benchmark, steps):
    benchmark.group = f"MTP draft, batch {steps.batch}"
    run_rounds(benchmark, steps.mtp_forward, setup=steps.reset)


@pytest.mark.parametrize("shape", ["3x1", "3x2x6"])
def test_mtp_draft(benchmark, steps, shape):
    benchmark.group = f"MTP draft, batch {steps.batch}"
    dims = [int(x) for x in shape.split("x")]
    spec = SpecConfig(depth=dims[0], topk=dims[1], nodes=dims[2] if len(dims) > 2 else None)
    run_rounds(benchmark, lambda: steps.draft(spec), setup=steps.reset)
