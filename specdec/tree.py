"""Draft trees: node layout, ancestor sets and the verifier's tree attention mask.

A tree per row holds the root (the pending token, node 0) and N drafted nodes 1..N in an order
where every parent precedes its children (sorted by depth). Verifying it is one verifier forward
over the N+1 nodes: node i sits at position L + depth(i), is written to cache slot L + i, and
attends to the committed prefix (slots < L) and to its own ancestors (and itself) among the
scratch slots L..L+N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class DraftTree:
    """The drafted nodes of each row (all rows have the same node count N).

    tokens: `[B, N]` token of node i+1. parents: `[B, N]` parent node index (0 = root) of node i+1,
    always < i+1. depths: `[B, N]` depth of node i+1 (children of the root have depth 1).
    child_probs: `[B, N+1, V]` the draft distribution each node's children were *sampled* from
    (sampled drafts only; None for top-k/greedy drafts). Siblings appear in sampling order.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    child_probs: torch.Tensor | None = None

    @property
    def n_nodes(self) -> int:
        return self.tokens.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Its tensors in field order (child_probs when present)."""
        return [t for t in (self.tokens, self.parents, self.depths, self.child_probs) if t is not None]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "DraftTree":
        """The tree with `fn` applied to each tensor (child_probs left None when absent)."""
        return DraftTree(fn(self.tokens), fn(self.parents), fn(self.depths),
                         None if self.child_probs is None else fn(self.child_probs))

    def all_tokens(self, root: torch.Tensor) -> torch.Tensor:
        """`[B, N+1]` tokens with the root (pending token `root` `[B]`) first."""
        return torch.cat([root.unsqueeze(1), self.tokens], dim=1)

    def all_depths(self) -> torch.Tensor:
        """`[B, N+1]` depths with the root's 0 first."""
        return torch.cat([torch.zeros_like(self.depths[:, :1]), self.depths], dim=1)

    def children(self) -> list[list[list[int]]]:
        """children[b][i]: node indices whose parent is node i, in index (= sampling) order."""
        batch, n = self.parents.shape
        out = [[[] for _ in range(n + 1)] for _ in range(batch)]
        for b, row in enumerate(self.parents.tolist()):
            for i, parent in enumerate(row):
                out[b][parent].append(i + 1)
        return out


def chain_tree(tokens: torch.Tensor, child_probs: torch.Tensor | None = None) -> DraftTree:
    """A chain d_1..d_K as a tree: node i's parent is node i-1."""
    batch, k = tokens.shape
    idx = torch.arange(k, device=tokens.device).expand(batch, k)
    return DraftTree(tokens, idx.clone(), idx + 1, child_probs)


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """`[B, N+1, N+1]` bool: [b, i, j] is True when node j is node i or one of its ancestors (root 0)."""
    batch, n = parents.shape
    anc = torch.eye(n + 1, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
    for i in range(1, n + 1):  # parents precede children, so each row is its parent's row plus itself
        parent_rows = anc[torch.arange(batch, device=parents.device), parents[:, i - 1]]
        anc[:, i] |= parent_rows
    return anc


def visible_slots(first_slot: torch.Tensor, width: int, n_slots: int) -> torch.Tensor:
    """`[B, width, n_slots]` bool: query j of row b (at slot `first_slot[b] + j`) sees slots ≤ its own."""
    last = first_slot.unsqueeze(1) + torch.arange(width, device=first_slot.device)
    return torch.arange(n_slots, device=first_slot.device).view(1, 1, -1) <= last.unsqueeze(-1)


def tree_attention_mask(lengths: torch.Tensor, ancestors: torch.Tensor, kv_len: int) -> torch.Tensor:
    """`[B, N+1, kv_len]` bool: node i of row b sees slots < L_b and slot L_b + j for its ancestors-or-self j."""
    batch, width, _ = ancestors.shape
    slots = torch.arange(kv_len, device=lengths.device)
    mask = (slots.view(1, 1, -1) < lengths.view(-1, 1, 1)).expand(batch, width, kv_len).clone()
    scratch = lengths.view(-1, 1) + torch.arange(width, device=lengths.device)  # [B, N+1] slot of node j
    rows = torch.arange(batch, device=lengths.device).view(-1, 1, 1)
    queries = torch.arange(width, device=lengths.device).view(1, -1, 1)
    mask[rows, queries, scratch.unsqueeze(1).expand(batch, width, width)] = ancestors
    return mask
