"""The acceptance engine: which drafted nodes survive verification, and the token that follows them.

Drafts are trees (a chain is a tree whose nodes each have one child). Walking from the root, a
rule either moves to one child or stops and emits one verifier token (the bonus after the last
accepted node, or the correction at a rejection), so each step emits `len(path) + 1` tokens.
Every rule is lossless:

* greedy: move to the child whose token is the verifier's argmax; stop with the argmax.
* one-hot drafts (children are the draft's top-k, q is a point mass on each): draw y ~ p at the
  node and move to the child whose token is y; stop with y. Each emitted token is a draw from p
  given the accepted prefix, so the output follows p exactly, whatever the tree's shape.
* sampled drafts (children drawn from q without replacement, in order): multi-candidate
  speculative sampling: try the children in sampling order, accepting child c with probability
  min(1, r(c)/q(c)); on rejection r ← norm((r − q)+) and c is removed from q; when no child is
  accepted, draw from r (r starts as p).

Draws come from one seeded generator in a fixed order, identical on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from specdec.sampling import draw
from specdec.tree import DraftTree


class Acceptance(NamedTuple):
    """n_accepted: `[B]` accepted nodes per row; path: `[B, max_depth]` their node indices in depth
    order (0-padded); next_token: `[B]` the verifier token emitted after them."""

    n_accepted: torch.Tensor
    path: torch.Tensor
    next_token: torch.Tensor


def _walk(tree: DraftTree, choose) -> Acceptance:
    """Follow `choose(b, node, children) -> (child or None, token)` from each row's root."""
    children = tree.children()
    batch, depth = tree.tokens.shape[0], int(tree.depths.max())
    path = torch.zeros(batch, depth, dtype=torch.long)
    n_accepted, next_token = [], []
    for b in range(batch):
        node, steps = 0, 0
        while True:
            child, token = choose(b, node, children[b][node])
            if child is None:
                break
            path[b, steps] = child
            steps += 1
            node = child
        n_accepted.append(steps)
        next_token.append(token)
    device = tree.tokens.device
    return Acceptance(torch.tensor(n_accepted, device=device), path.to(device), torch.tensor(next_token, device=device))


def _child_with_token(tokens: list[int], kids: list[int], token: int) -> int | None:
    return next((c for c in kids if tokens[c - 1] == token), None)


def accept_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Acceptance:
    """target_logits `[B, N+1, V]`: the verifier's logits at every node (root first)."""
    best = target_logits.argmax(dim=-1).tolist()
    tokens = tree.tokens.tolist()
    return _walk(tree, lambda b, node, kids: (_child_with_token(tokens[b], kids, best[b][node]), best[b][node]))


def accept_onehot(tree: DraftTree, target_probs: torch.Tensor | None, generator: torch.Generator | None = None,
                  draws: torch.Tensor | None = None) -> Acceptance:
    """target_probs `[B, N+1, V]`: the verifier's sampling distribution at every node; `draws`
    `[B, N+1]`: y ~ p at every node, drawn by the caller (then `target_probs` is not read; else
    they are drawn from `generator`, in node order)."""
    y = (draws if draws is not None else draw(target_probs, generator)).tolist()
    tokens = tree.tokens.tolist()
    return _walk(tree, lambda b, node, kids: (_child_with_token(tokens[b], kids, y[b][node]), y[b][node]))


def accept_chain(drafts: torch.Tensor, target: torch.Tensor) -> Acceptance:
    """A chain's walk as tensor ops: drafts `[B, K]`, target `[B, K+1]` the verifier's token at every
    node (its argmax when greedy; for one-hot drafts the draws y ~ p of `accept_onehot`, same draws).
    The first a drafts equal to the target are accepted; the target at node a follows them. Same
    result as `accept_greedy`/`accept_onehot` on `chain_tree(drafts)`, without the Python walk."""
    batch, depth = drafts.shape
    n_accepted = (drafts == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    path = torch.arange(1, depth + 1, device=drafts.device).expand(batch, depth)
    return Acceptance(n_accepted, path, target.gather(1, n_accepted.unsqueeze(1))[:, 0])


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm((p − q)+) over the last dim; falls back to p where p ≤ q everywhere (rejection then has probability 0)."""
    r = (p - q).clamp_min(0.0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


def accept_sampled(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None) -> Acceptance:
    """Multi-candidate speculative sampling; `tree.child_probs` `[B, N+1, V]` holds each node's draft q."""
    tokens = tree.tokens.tolist()
    q_all = tree.child_probs

    def choose(b: int, node: int, kids: list[int]):
        r, q = target_probs[b, node], q_all[b, node]
        for c in kids:
            tok = tokens[b][c - 1]
            q_tok = q[tok]
            if q_tok <= 0:  # a child q could not have produced (fewer tokens than k in q's support)
                continue
            u = torch.rand((), generator=generator, device=q.device)
            if u * q_tok < r[tok]:
                return c, tok
            r = residual_distribution(r, q)
            q = q.clone()
            q[tok] = 0.0
            q = q / q.sum().clamp_min(1e-30)
        return None, int(draw(r, generator))

    return _walk(tree, choose)


def cut_run(run: list[int], eos_ids: frozenset[int], budget: int) -> tuple[list[int], bool]:
    """The part of an accepted run a row keeps, and whether the row is finished.

    The run is cut after the first EOS (which is kept) and after `budget` tokens (what
    `max_new_tokens` still allows); either cut finishes the row.
    """
    for i, tok in enumerate(run[:budget]):
        if tok in eos_ids:
            return run[: i + 1], True
    return run[:budget], len(run) >= budget
