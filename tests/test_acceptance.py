"""The acceptance engine on hand-built trees, logits and distributions."""

from __future__ import annotations

import torch

from specdec.acceptance import (accept_chain, accept_greedy, accept_onehot, accept_sampled, cut_run,
                                residual_distribution)
from specdec.sampling import draw
from specdec.tree import DraftTree, chain_tree

V = 6


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
    acc = accept_onehot(chain([2, 3, 4]), probs, torch.Generator().manual_seed(0))
    assert acc.n_accepted.tolist() == [2] and acc.next_token.tolist() == [1]


def test_sampled_accepts_when_p_dominates_q_and_uses_residual_on_reject():
    q = torch.full((1, 3, V), 1.0 / V)
    p_accept = torch.nn.functional.one_hot(torch.tensor([[2, 3, 4]]), V).float()
    tree = chain_tree(torch.tensor([[2, 3]]), q)
    acc = accept_sampled(tree, p_accept, torch.Generator().manual_seed(0))
    assert acc.n_accepted.tolist() == [2] and acc.next_token.tolist() == [4]  # bonus from p at the leaf
    p_reject = torch.nn.functional.one_hot(torch.tensor([[1, 3, 4]]), V).float()  # p(d_1 = 2) = 0
    acc = accept_sampled(tree, p_reject, torch.Generator().manual_seed(0))
    assert acc.n_accepted.tolist() == [0] and acc.next_token.tolist() == [1]  # residual = p here


def test_sampled_tries_siblings_in_order():
    # root has children 2 then 3 (drawn without replacement from q); p puts all mass on 3
    q = torch.zeros(1, 3, V)
    q[0, 0, 2], q[0, 0, 3] = 0.5, 0.5
    tree = DraftTree(torch.tensor([[2, 3]]), torch.tensor([[0, 0]]), torch.tensor([[1, 1]]), q)
    p = torch.nn.functional.one_hot(torch.tensor([[3, 0, 5]]), V).float()
    acc = accept_sampled(tree, p, torch.Generator().manual_seed(0))
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


def test_chain_fast_path_equals_the_walks():
    """`accept_chain` (tensor ops) gives the walk's accepted count and token, greedy and one-hot."""
    g = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, 2, (256, 4), generator=g)  # 2 tokens: every accepted length occurs
    logits = torch.randn(256, 5, 2, generator=g) * 3
    fast = accept_chain(drafts, logits.argmax(-1))
    walk = accept_greedy(chain_tree(drafts), logits)
    assert fast.n_accepted.tolist() == walk.n_accepted.tolist() and fast.next_token.tolist() == walk.next_token.tolist()
    assert sorted(set(fast.n_accepted.tolist())) == [0, 1, 2, 3, 4]
    probs = logits.softmax(-1)
    fast = accept_chain(drafts, draw(probs, torch.Generator().manual_seed(5)))
    walk = accept_onehot(chain_tree(drafts), probs, torch.Generator().manual_seed(5))
    assert fast.n_accepted.tolist() == walk.n_accepted.tolist() and fast.next_token.tolist() == walk.next_token.tolist()
