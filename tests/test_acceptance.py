"""The acceptance engine on hand-built trees, logits and distributions."""

from __future__ import annotations

import torch

from specdec.acceptance import (Acceptance, accept_chain, accept_sampled, accept_targets, cut_run,
                                residual_distribution, tree_children)
from specdec.sampling import draw, draw_at
from specdec.tree import DraftTree, chain_tree

V = 6


def topk_of(tree: DraftTree) -> int:
    return max(int(torch.bincount(row, minlength=1).max()) for row in tree.parents)


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> Acceptance:
    """Greedy acceptance of `tree` against the verifier's `logits` `[B, N+1, V]`."""
    return accept_targets(tree, tree_children(tree.parents, topk_of(tree)), logits.argmax(-1),
                          int(tree.depths.max()))


def sampled(tree: DraftTree, p: torch.Tensor, seed: int = 0) -> Acceptance:
    k, depth = topk_of(tree), int(tree.depths.max())
    u = torch.rand(p.shape[0], k * depth + 1, generator=torch.Generator().manual_seed(seed))
    return accept_sampled(tree, tree_children(tree.parents, k), p, u, depth)


def walk_reference(tree: DraftTree, target: torch.Tensor | None = None, p: torch.Tensor | None = None,
                   u: torch.Tensor | None = None) -> tuple[list[int], list[list[int]], list[int]]:
    """The acceptance rules as a plain Python walk, row by row (the definition the tensor ops must
    match): with `target` `[B, N+1]` greedy/one-hot, else speculative sampling with p and uniforms u."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    k, depth = topk_of(tree), int(tree.depths.max())
    n_out, path_out, next_out = [], [], []
    for b in range(tree.tokens.shape[0]):
        node, path = 0, []
        if target is not None:
            while True:
                want = int(target[b, node])
                child = next((c for c in children[b][node] if tokens[b][c - 1] == want), None)
                if child is None:
                    break
                path.append(child)
                node = child
            n_out.append(len(path)), path_out.append(path), next_out.append(int(target[b, node]))
            continue
        r, q = p[b, 0], tree.child_probs[b, 0]
        for d in range(depth):
            chosen = None
            for c, kid in enumerate(children[b][node]):
                tok = tokens[b][kid - 1]
                if q[tok] <= 0:
                    continue
                if u[b, d * k + c] * q[tok] < r[tok]:
                    chosen = kid
                    break
                r = residual_distribution(r, q)
                q = q.clone()
                q[tok] = 0.0
                q = q / q.sum().clamp_min(1e-30)
            if chosen is None:
                break
            path.append(chosen)
            node = chosen
            r, q = p[b, node], tree.child_probs[b, node]
        n_out.append(len(path)), path_out.append(path), next_out.append(int(draw_at(r, u[b, k * depth])))
    return n_out, path_out, next_out


def random_tree(batch: int, n: int, topk: int, vocab: int, g: torch.Generator) -> DraftTree:
    """Random trees of n nodes (each node's parent an earlier node with fewer than topk children),
    with distinct sibling tokens and random child distributions q (for sampled drafts)."""
    tokens, parents, depths = [], [], []
    for _ in range(batch):
        kids, depth_of, row_t, row_p, row_d = {0: []}, {0: 0}, [], [], []
        for i in range(1, n + 1):
            options = [j for j in range(i) if len(kids[j]) < topk]
            parent = options[int(torch.randint(len(options), (1,), generator=g))]
            used = {row_t[c - 1] for c in kids[parent]}
            token = [t for t in torch.randperm(vocab, generator=g).tolist() if t not in used][0]
            kids[parent].append(i)
            kids[i], depth_of[i] = [], depth_of[parent] + 1
            row_t.append(token), row_p.append(parent), row_d.append(depth_of[i])
        tokens.append(row_t), parents.append(row_p), depths.append(row_d)
    q = torch.rand(batch, n + 1, vocab, generator=g) ** 3
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), q / q.sum(-1, keepdim=True))


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    """`[1, len, V]` logits whose argmax at node j is tokens[j]."""
    out = torch.zeros(1, len(tokens), V)
    out[0, torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return out


def chain(tokens: list[int]) -> DraftTree:
    return chain_tree(torch.tensor([tokens]))


def test_greedy_all_accepted_plus_bonus():
    acc = accept_greedy(chain([2, 3, 4]), one_hot_logits([2, 3, 4, 5]))
    assert acc.n_accepted.tolist() == [3] and acc.next_token.tolist() == [5]
    assert acc.path.tolist() == [[1, 2, 3]]


def test_greedy_first_rejected_gives_the_correction():
    acc = accept_greedy(chain([2, 3, 4]), one_hot_logits([1, 3, 4, 5]))
    assert acc.n_accepted.tolist() == [0] and acc.next_token.tolist() == [1]


def test_greedy_rows_accept_different_lengths():
    tree = chain_tree(torch.tensor([[2, 3, 4], [2, 3, 4]]))
    logits = torch.cat([one_hot_logits([2, 3, 0, 5]), one_hot_logits([2, 1, 4, 5])])
    acc = accept_greedy(tree, logits)
    assert acc.n_accepted.tolist() == [2, 1] and acc.next_token.tolist() == [0, 1]


def test_greedy_follows_the_matching_branch_of_a_tree():
    #        root
    #       /    \
    #   1:(2)   2:(3)
    #    |       |  \
    #  3:(4)   4:(5) 5:(1)
    tree = DraftTree(torch.tensor([[2, 3, 4, 5, 1]]), torch.tensor([[0, 0, 1, 2, 2]]),
                     torch.tensor([[1, 1, 2, 2, 2]]))
    # verifier: root → 3, node 2 → 1, node 5 → 0 (bonus)
    logits = one_hot_logits([3, 0, 1, 0, 0, 0])
    acc = accept_greedy(tree, logits)
    assert acc.n_accepted.tolist() == [2] and acc.path.tolist() == [[2, 5]] and acc.next_token.tolist() == [0]


def test_onehot_walks_while_draws_match():
    probs = torch.nn.functional.one_hot(torch.tensor([[2, 3, 1, 5]]), V).float()  # point masses: fixed draws
    acc = accept_chain(torch.tensor([[2, 3, 4]]), draw(probs, torch.Generator().manual_seed(0)))
    assert acc.n_accepted.tolist() == [2] and acc.next_token.tolist() == [1]


def test_sampled_accepts_when_p_dominates_q_and_uses_residual_on_reject():
    q = torch.full((1, 3, V), 1.0 / V)
    p_accept = torch.nn.functional.one_hot(torch.tensor([[2, 3, 4]]), V).float()
    tree = chain_tree(torch.tensor([[2, 3]]), q)
    acc = sampled(tree, p_accept)
    assert acc.n_accepted.tolist() == [2] and acc.next_token.tolist() == [4]  # bonus from p at the leaf
    p_reject = torch.nn.functional.one_hot(torch.tensor([[1, 3, 4]]), V).float()  # p(d_1 = 2) = 0
    acc = sampled(tree, p_reject)
    assert acc.n_accepted.tolist() == [0] and acc.next_token.tolist() == [1]  # residual = p here


def test_sampled_tries_siblings_in_order():
    # root has children 2 then 3 (drawn without replacement from q); p puts all mass on 3
    q = torch.zeros(1, 3, V)
    q[0, 0, 2], q[0, 0, 3] = 0.5, 0.5
    tree = DraftTree(torch.tensor([[2, 3]]), torch.tensor([[0, 0]]), torch.tensor([[1, 1]]), q)
    p = torch.nn.functional.one_hot(torch.tensor([[3, 0, 5]]), V).float()
    acc = sampled(tree, p)
    assert acc.n_accepted.tolist() == [1] and acc.path.tolist() == [[2]] and acc.next_token.tolist() == [5]


def test_residual_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual_distribution(p, p), p)  # no mass left: fall back to p


def test_cut_run_at_eos_and_budget():
    assert cut_run([4, 1, 7], frozenset({1}), 10) == ([4, 1], True)  # EOS inside the run, kept
    assert cut_run([4, 5, 7], frozenset({1}), 2) == ([4, 5], True)  # max_new_tokens inside the run
    assert cut_run([4, 5], frozenset({1}), 2) == ([4, 5], True)  # budget reached exactly
    assert cut_run([4, 5], frozenset({1}), 3) == ([4, 5], False)
    assert cut_run([4, 1], frozenset({1}), 1) == ([4], True)  # budget before the EOS


def test_chain_fast_path_equals_the_tree_walk():
    """`accept_chain` (a chain's shortcut) gives `accept_targets`'s accepted count and token."""
    g = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, 2, (256, 4), generator=g)  # 2 tokens: every accepted length occurs
    target = (torch.randn(256, 5, 2, generator=g) * 3).argmax(-1)
    fast = accept_chain(drafts, target)
    tree = chain_tree(drafts)
    walk = accept_targets(tree, tree_children(tree.parents, 1), target, 4)
    assert torch.equal(fast.n_accepted, walk.n_accepted) and torch.equal(fast.next_token, walk.next_token)
    assert sorted(set(fast.n_accepted.tolist())) == [0, 1, 2, 3, 4]


def test_tensor_acceptance_equals_the_python_walk_on_random_trees():
    """The tensor rules (greedy/one-hot targets, speculative sampling) take the same path and token
    as a row-by-row Python walk of the same rules, on random trees with the same uniforms."""
    g = torch.Generator().manual_seed(3)
    for n, topk in ((6, 2), (9, 3), (5, 1), (8, 4)):
        tree = random_tree(64, n, topk, 4, g)
        depth = int(tree.depths.max())
        kids = tree_children(tree.parents, topk)
        target = torch.randint(0, 4, (64, n + 1), generator=g)
        acc = accept_targets(tree, kids, target, depth)
        ref = walk_reference(tree, target=target)
        assert acc.n_accepted.tolist() == ref[0] and acc.next_token.tolist() == ref[2]
        assert [row[:a] for row, a in zip(acc.path.tolist(), ref[0])] == ref[1]
        assert max(ref[0]) >= 2  # deep paths were exercised
        p = torch.rand(64, n + 1, 4, generator=g) ** 2
        p = p / p.sum(-1, keepdim=True)
        u = torch.rand(64, topk * depth + 1, generator=g)
        acc = accept_sampled(tree, kids, p, u, depth)
        ref = walk_reference(tree, p=p, u=u)
        assert acc.n_accepted.tolist() == ref[0] and acc.next_token.tolist() == ref[2]
        assert [row[:a] for row, a in zip(acc.path.tolist(), ref[0])] == ref[1]
