"""The acceptance engine (`specdec.acceptance`) alone, on random logits over the default model's
vocabulary size (8192): greedy walk, one-hot draws, multi-candidate speculative sampling; a chain
of 4 and a 3x2x6-shaped tree, batch 8."""

from __future__ import annotations

import pytest
import torch

from specdec.bench.microbench import heap_tree
from specdec.bench.perf.conftest import run_rounds
from specdec.acceptance import accept_sampled, accept_targets, tree_children
from specdec.tree import chain_tree

VOCAB, BATCH = 8192, 8


def _tree(kind: str, sampled: bool):
    """(tree, its children table, its depth, topk, verifier logits `[B, N+1, V]`)."""
    g = torch.Generator().manual_seed(0)
    if kind == "chain4":
        tree, topk, depth = chain_tree(torch.randint(3, VOCAB, (BATCH, 4), generator=g)), 1, 4
    else:
        tree, topk, depth = heap_tree(BATCH, 6, VOCAB, "cpu"), 2, 2
    if sampled:
        tree.child_probs = torch.softmax(torch.randn(BATCH, tree.n_nodes + 1, VOCAB, generator=g), -1)
    logits = torch.randn(BATCH, tree.n_nodes + 1, VOCAB, generator=g) * 3
    return tree, tree_children(tree.parents, topk), depth, topk, logits


@pytest.mark.parametrize("kind", ["chain4", "tree6"])
def test_accept_greedy(benchmark, kind):
    """The walk against the verifier's argmax (argmax included)."""
    benchmark.group = f"acceptance, {kind}"
    tree, kids, depth, _, logits = _tree(kind, False)
    run_rounds(benchmark, lambda: accept_targets(tree, kids, logits.argmax(-1), depth))


@pytest.mark.parametrize("kind", ["chain4", "tree6"])
def test_accept_onehot(benchmark, kind):
    """The walk against one draw y ~ p per node (the draws included)."""
    benchmark.group = f"acceptance, {kind}"
    tree, kids, depth, _, logits = _tree(kind, False)
    p = torch.softmax(logits, -1).flatten(0, 1)
    g = torch.Generator().manual_seed(1)
    run_rounds(benchmark, lambda: accept_targets(
        tree, kids, torch.multinomial(p, 1, generator=g).view(BATCH, -1), depth))


@pytest.mark.parametrize("kind", ["chain4", "tree6"])
def test_accept_sampled(benchmark, kind):
    """Multi-candidate speculative sampling (its uniforms drawn in the call)."""
    benchmark.group = f"acceptance, {kind}"
    tree, kids, depth, topk, logits = _tree(kind, True)
    p = torch.softmax(logits, -1)
    g = torch.Generator().manual_seed(1)
    run_rounds(benchmark, lambda: accept_sampled(
        tree, kids, p, torch.rand(BATCH, topk * depth + 1, generator=g), depth))
