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

Every rule runs as tensor ops over all rows at once, a fixed number of them per tree shape (no
host reads, so a step traces into one graph). Random numbers are inputs: uniforms drawn by the
caller, identical on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from specdec.sampling import draw_at
from specdec.tree import DraftTree


class Acceptance(NamedTuple):
    """n_accepted: `[B]` accepted nodes per row; path: `[B, max_depth]` their node indices in depth
    order (0-padded); next_token: `[B]` the verifier token emitted after them."""

    n_accepted: torch.Tensor
    path: torch.Tensor
    next_token: torch.Tensor


def tree_children(parents: torch.Tensor, topk: int) -> torch.Tensor:
    """`[B, N+1, topk]` int64: entry (b, i, c) is the c-th child of node i (in index order, which is
    sampling order), or 0 where node i has fewer children. `parents` `[B, N]`: parent of node i+1."""
    n = parents.shape[1]
    is_child = parents.unsqueeze(1) == torch.arange(n + 1, device=parents.device).view(1, -1, 1)  # [B, N+1, N]
    rank = is_child.long().cumsum(dim=-1) - 1
    kids = []
    for c in range(topk):
        hit = is_child & (rank == c)
        kids.append(torch.where(hit.any(dim=-1), hit.long().argmax(dim=-1) + 1, 0))
    return torch.stack(kids, dim=-1)


def _node_rows(x: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """x `[B, N+1, ...]` at each row's node `[B]` → `[B, ...]`."""
    index = node.view(-1, *([1] * (x.dim() - 1))).expand(-1, 1, *x.shape[2:])
    return x.gather(1, index).squeeze(1)


def accept_targets(tree: DraftTree, kids: torch.Tensor, target: torch.Tensor, depth: int) -> Acceptance:
    """Greedy and one-hot acceptance of a tree: from the root, move to the child whose token is the
    verifier's token at the node (`target` `[B, N+1]`: its argmax, or a sampling row's draw y ~ p),
    and stop with that token when no child has it. `kids`: `tree_children`; depth: the tree's."""
    batch = target.shape[0]
    tokens = torch.cat([torch.zeros_like(tree.tokens[:, :1]), tree.tokens], dim=1)  # node i's token at i
    node = torch.zeros(batch, dtype=torch.long, device=target.device)
    alive = torch.ones(batch, dtype=torch.bool, device=target.device)
    n_accepted, path = torch.zeros_like(node), []
    for _ in range(depth):
        want = target.gather(1, node.unsqueeze(1))  # [B, 1]
        cand = _node_rows(kids, node)  # [B, k]
        match = (cand > 0) & (tokens.gather(1, cand) == want) & alive.unsqueeze(1)
        found = match.any(dim=1)
        child = cand.gather(1, match.long().argmax(dim=1, keepdim=True)).squeeze(1)
        node = torch.where(found, child, node)
        path.append(torch.where(found, child, 0))
        n_accepted = n_accepted + found.long()
        alive = alive & found
    return Acceptance(n_accepted, torch.stack(path, dim=1), target.gather(1, node.unsqueeze(1)).squeeze(1))


def accept_chain(drafts: torch.Tensor, target: torch.Tensor) -> Acceptance:
    """`accept_targets` for a chain, shorter: drafts `[B, K]`, target `[B, K+1]` the verifier's token
    at every node. The first a drafts equal to the target are accepted; the target at node a follows them."""
    batch, depth = drafts.shape
    n_accepted = (drafts == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    path = torch.arange(1, depth + 1, device=drafts.device).expand(batch, depth)
    return Acceptance(n_accepted, path, target.gather(1, n_accepted.unsqueeze(1))[:, 0])


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm((p − q)+) over the last dim; falls back to p where p ≤ q everywhere (rejection then has probability 0)."""
    r = (p - q).clamp_min(0.0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


def accept_sampled(tree: DraftTree, kids: torch.Tensor, target_probs: torch.Tensor, uniforms: torch.Tensor,
                   depth: int) -> Acceptance:
    """Multi-candidate speculative sampling. `tree.child_probs` `[B, N+1, V]` holds the q each node's
    children were drawn from; target_probs `[B, N+1, V]` the verifier's p at every node; `kids`:
    `tree_children`; uniforms `[B, topk·depth + 1]`: child c of the node at depth d is tried with
    column d·topk + c, the last draws the token after the path.

    At a node, children are tried in sampling order: child c (token t) is accepted with probability
    min(1, r(t)/q(t)); on rejection r ← norm((r − q)+) and t leaves q (renormalised); a child q could
    not have produced (q(t) = 0) is skipped. When none is accepted the token is drawn from r; r and
    q restart as the accepted child's p and q."""
    batch, topk = target_probs.shape[0], kids.shape[-1]
    tokens = torch.cat([torch.zeros_like(tree.tokens[:, :1]), tree.tokens], dim=1)
    node = torch.zeros(batch, dtype=torch.long, device=target_probs.device)
    alive = torch.ones(batch, dtype=torch.bool, device=target_probs.device)
    n_accepted, path = torch.zeros_like(node), []
    r, q = target_probs[:, 0], tree.child_probs[:, 0]
    for d in range(depth):
        cand = _node_rows(kids, node)  # [B, k]
        chosen = torch.zeros_like(node)
        for c in range(topk):
            kid = cand[:, c]
            token = tokens.gather(1, kid.unsqueeze(1))  # [B, 1]
            q_tok, r_tok = q.gather(1, token).squeeze(1), r.gather(1, token).squeeze(1)
            tried = alive & (kid > 0) & (chosen == 0) & (q_tok > 0)
            ok = tried & (uniforms[:, d * topk + c] * q_tok < r_tok)
            chosen = torch.where(ok, kid, chosen)
            rejected = (tried & ~ok).unsqueeze(1)
            r = torch.where(rejected, residual_distribution(r, q), r)
            q_left = q.scatter(1, token, 0.0)
            q = torch.where(rejected, q_left / q_left.sum(dim=-1, keepdim=True).clamp_min(1e-30), q)
        moved = chosen > 0
        node = torch.where(moved, chosen, node)
        path.append(torch.where(moved, chosen, 0))
        n_accepted = n_accepted + moved.long()
        alive = alive & moved
        r = torch.where(moved.unsqueeze(1), _node_rows(target_probs, node), r)
        q = torch.where(moved.unsqueeze(1), _node_rows(tree.child_probs, node), q)
    return Acceptance(n_accepted, torch.stack(path, dim=1), draw_at(r, uniforms[:, topk * depth]))


def cut_run(run: list[int], eos_ids: frozenset[int], budget: int) -> tuple[list[int], bool]:
    """The part of an accepted run a row keeps, and whether the row is finished.

    The run is cut after the first EOS (which is kept) and after `budget` tokens (what
    `max_new_tokens` still allows); either cut finishes the row.
    """
    for i, tok in enumerate(run[:budget]):
        if tok in eos_ids:
            return run[: i + 1], True
    return run[:budget], len(run) >= budget
