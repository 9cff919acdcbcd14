"""The acceptance engine (`specdec.acceptance`) alone, on random logits over the default model's
vocabulary size (8192): greedy walk, one-hot draws, multi-candidate speculative sampling; a chain
of 4 and a 3x2x6-shaped tree, batch 8."""

from __future__ import annotations

import pytest
import torch

from bench.microbench import heap_tree
from bench.perf.conftest import run_rounds
from specdec.acceptance import accept_greedy, accept_onehot, accept_sampled
from specdec.tree import chain_tree

VOCAB, BATCH = 8192, 8


def _tree(kind: str, sampled: bool):
    g = torch.Generator().manual_seed(0)
    if kind == "chain4":
        tree = chain_tree(torch.randint(3, VOCAB, (BATCH, 4), generator=g))
    else:
        tree = heap_tree(BATCH, 6, VOCAB, "cpu")
    if sampled:
        tree.child_probs = torch.softmax(torch.randn(BATCH, tree.n_nodes + 1, VOCAB, generator=g), -1)
    logits = torch.randn(BATCH, tree.n_nodes + 1, VOCAB, generator=g) * 3
    return tree, logits


@pytest.mark.parametrize("kind", ["chain4", "tree6"])
def test_accept_greedy(benchmark, kind):
    benchmark.group = f"acceptance, {kind}"
    tree, logits = _tree(kind, False)
    run_rounds(benchmark, lambda: accept_greedy(tree, logits))


@pytest.mark.parametrize("kind", ["chain4", "tree6"])
def test_accept_onehot(benchmark, kind):
    benchmark.group = f"acceptance, {kind}"
    tree, logits = _tree(kind, False)
    p = torch.softmax(logits, -1)
    g = torch.Generator().manual_seed(1)
    run_rounds(benchmark, lambda: accept_onehot(tree, p, g))


@pytest.mark.parametrize("kind", ["chain4", "tree6"])
def test_accept_sampled(benchmark, kind):
    benchmark.group = f"acceptance, {kind}"
    tree, logits = _tree(kind, True)
    p = torch.softmax(logits, -1)
    g = torch.Generator().manual_seed(1)
    run_rounds(benchmark, lambda: accept_sampled(tree, p, g))
