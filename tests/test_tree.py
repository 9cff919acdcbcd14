"""Draft trees: masks and positions against brute force, lossless tree decoding, compaction, chain equivalence."""

from __future__ import annotations

import pytest
import torch

import specdec.acceptance
import specdec.steps
from specdec.mtp.tree_draft import expand_tree
from specdec import SpecConfig
from specdec.speculative import SpeculativeDecoder
from specdec.tree import DraftTree, ancestor_matrix, tree_attention_mask
from tests.test_speculative import (  # noqa: F401  (eng, tiny: the same engine fixtures)
    assert_cache_equals_from_scratch, assert_same_or_tie, chi_square, eng, exact_joint, random_prompts, sample_joint,
    tiny)


def random_tree(n: int, gen: torch.Generator) -> list[int]:
    """Parents of nodes 1..n (each parent precedes its child)."""
    return [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n + 1)]


def test_masks_and_positions_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch, n = 3, int(torch.randint(1, 12, (1,), generator=gen))
        parents = torch.tensor([random_tree(n, gen) for _ in range(batch)])
        lengths = torch.randint(0, 9, (batch,), generator=gen)
        kv_len = int(lengths.max()) + n + 1 + 2
        depth = torch.zeros(batch, n + 1, dtype=torch.long)
        for b in range(batch):
            for i in range(1, n + 1):
                depth[b, i] = depth[b, parents[b, i - 1]] + 1
        tree = DraftTree(torch.zeros(batch, n, dtype=torch.long), parents, depth[:, 1:])
        mask = tree_attention_mask(lengths, ancestor_matrix(parents), kv_len)
        for b in range(batch):
            for i in range(n + 1):
                chain, node = {i}, i
                while node:
                    node = int(parents[b, node - 1])
                    chain.add(node)
                expected = [s < lengths[b] or (int(s - lengths[b]) in chain) for s in range(kv_len)]
                assert mask[b, i].tolist() == expected
        assert torch.equal(tree.all_depths(), depth)


SHAPES = [(2, 2, None), (3, 2, 6), (3, 3, 9), (4, 2, 8), (2, 4, 12)]


@pytest.mark.parametrize("depth, topk, nodes", SHAPES)
@pytest.mark.parametrize("batch", [1, 4])
def test_tree_greedy_equals_plain(eng, tiny, depth, topk, nodes, batch):
    for engine, vocab in ((eng, eng.args.vocab_size), (tiny, 8)):
        prompts = random_prompts(vocab, [7, 3, 11, 5][:batch], seed=depth + 10 * topk + batch)
        plain = engine.generate(prompts, max_new_tokens=20).token_ids
        out = engine.generate(prompts, max_new_tokens=20, spec=SpecConfig(depth=depth, topk=topk, nodes=nodes))
        assert assert_same_or_tie(engine, prompts, out.token_ids, plain) == 0


def test_trees_accept_more_than_chains(tiny):
    prompts = random_prompts(8, [4, 6, 9, 5], seed=2)
    chain = tiny.generate(prompts, max_new_tokens=40, spec=SpecConfig(depth=3, adaptive=False))
    tree = tiny.generate(prompts, max_new_tokens=40, spec=SpecConfig(depth=3, topk=3, nodes=9))
    assert tree.stats.tau > chain.stats.tau
    assert tree.stats.acceptance_per_position[0] > chain.stats.acceptance_per_position[0]


def draft_chains_as_trees(monkeypatch) -> None:
    """Steps draft their chains through the tree expansion code with topk 1."""
    monkeypatch.setattr(specdec.steps, "draft",
                        lambda drafter, cache, rows, shape, noise: expand_tree(drafter, cache, rows, shape, noise.take))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_topk1_tree_expansion_reproduces_the_chain(eng, tiny, temperature, monkeypatch):
    for engine, vocab in ((eng, eng.args.vocab_size), (tiny, 8)):
        prompts = random_prompts(vocab, [7, 3, 11, 5], seed=9)
        spec = SpecConfig(depth=3, adaptive=False, draft_mode="sample" if temperature else "onehot")
        chain = engine.schedule(SpeculativeDecoder(engine, spec, temperature, 1.0, 4), prompts, 24)
        with monkeypatch.context() as m:
            draft_chains_as_trees(m)
            tree = engine.schedule(SpeculativeDecoder(engine, spec, temperature, 1.0, 4), prompts, 24)
        assert tree[0] == chain[0]
        assert tree[1].tau == chain[1].tau and tree[1].acceptance_per_position == chain[1].acceptance_per_position


def test_compacted_cache_equals_plain_decoding_cache(eng):
    """After tree steps with arbitrary accepted paths, verifier and MTP rows equal a from-scratch pass."""
    assert_cache_equals_from_scratch(eng, SpecConfig(depth=3, topk=3, nodes=9), 24)


def test_tree_draft_shape_and_budget(eng):
    """The drafted tree has exactly `nodes` nodes, depths ≤ K, parents before children."""
    prompts = random_prompts(eng.args.vocab_size, [5, 8], seed=1)
    dec = SpeculativeDecoder(eng, SpecConfig(depth=3, topk=3, nodes=10), 0.0, 1.0, 0)
    seen = []
    dec.observer = lambda result: seen.append(result.tree)
    eng.schedule(dec, prompts, 6)
    assert seen
    for tree in seen:
        assert tree.n_nodes == 10 and int(tree.depths.max()) <= 3
        idx = torch.arange(1, 11)
        assert torch.all(tree.parents < idx)
        parent_depth = torch.cat([torch.zeros_like(tree.depths[:, :1]), tree.depths], 1).gather(1, tree.parents)
        assert torch.equal(tree.depths, parent_depth + 1)


@pytest.mark.parametrize("mode, temperature, top_p, draft_vocab", [
    ("onehot", 1.0, 1.0, None), ("sample", 1.0, 1.0, None), ("sample", 0.9, 0.9, None), ("sample", 1.0, 1.0, 5)])
def test_tree_sampled_joint_distribution_matches_plain(tiny, mode, temperature, top_p, draft_vocab):
    prompt = [3, 5, 2, 7]
    spec = SpecConfig(depth=2, topk=3, nodes=12 if mode == "sample" else 8, draft_mode=mode, draft_vocab=draft_vocab)
    counts = sample_joint(tiny, prompt, 3, 6000, spec, temperature, top_p, seed=13)
    stat, crit = chi_square(counts, exact_joint(tiny, prompt, 3, temperature, top_p))
    assert stat < crit, (stat, crit)


def test_tree_wrong_residual_is_detected(tiny, monkeypatch):
    prompt = [3, 5, 2, 7]
    probs = exact_joint(tiny, prompt, 3, 1.0, 1.0)
    monkeypatch.setattr(specdec.acceptance, "residual_distribution", lambda p, q: p)
    spec = SpecConfig(depth=2, topk=3, nodes=12, draft_mode="sample")
    stat, crit = chi_square(sample_joint(tiny, prompt, 3, 6000, spec, 1.0, 1.0, seed=13), probs)
    assert stat > crit, (stat, crit)


def test_tree_auto_calibrates_and_explains(tiny):
    from specdec.auto_tree import MAX_DEPTH, MAX_TOPK, choose_tree

    prompts = random_prompts(8, [4, 6], seed=3)
    choice = choose_tree(tiny, prompts, 0.0, 1.0, 0)
    assert 1 <= choice.depth <= MAX_DEPTH and 1 <= choice.topk <= MAX_TOPK
    assert choice.nodes == choice.depth * choice.topk
    assert "chosen: depth" in choice.report and "P(depth d accepted" in choice.report
    spec = SpecConfig(depth=choice.depth, topk=choice.topk, nodes=choice.nodes)
    out = tiny.generate(prompts, max_new_tokens=12, spec=spec)
    assert out.token_ids == tiny.generate(prompts, max_new_tokens=12).token_ids
