"""Tree drafting with the MTP layer (EAGLE-2-style dynamic trees), batched over rows.

Depth 1: the top-k children of the root come from the MTP output already computed at the last
commit. Depth d ≥ 2: the E most confident frontier nodes (highest cumulative draft log-probability)
are expanded in one batched MTP forward at position L + d - 2 (each attending to the committed MTP
rows plus the scratch rows of its own expanded ancestors); each yields k children. Finally the best
N nodes by cumulative log-probability are kept (ancestors always outrank descendants, so the kept
set is a tree); topk = 1 reproduces the chain exactly.

Sampled drafts (lossless multi-candidate sampling) draw each expanded node's k children *without
replacement* from the draft distribution q (Gumbel top-k, sampling order kept) and never prune a
sampled child: which children a node has must not depend on their values. Only which nodes get
expanded does, so the node budget is spent by expanding fewer nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp.drafter import MTPDrafter
from specdec.sampling import probabilities
from specdec.tree import DraftTree


@dataclass
class _Layer:
    """Candidates at one depth, per row: tokens/scores/parents `[B, m]`, the hidden that expands each
    `[B, m, D]`, its expanded ancestors' scratch offsets `[B, m, X]` bool, and (sampled) q for children."""

    tokens: torch.Tensor
    scores: torch.Tensor
    parents: torch.Tensor  # index into the previous layer (-1: the root)
    hidden: torch.Tensor
    ancestor_slots: torch.Tensor
    child_q: torch.Tensor | None = None  # [B, m, V] once expanded (sampled drafts)
    expanded: torch.Tensor | None = None  # [B, m] bool


def _children(logits: torch.Tensor, k: int, sampled: bool, temperature: float, top_p: float,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """k children per row of logits `[..., V]`: (tokens `[..., k]`, log q `[..., k]`, q `[..., V]` if sampled)."""
    if not sampled:
        logq = logits.float().log_softmax(dim=-1)
        top = logq.topk(k, dim=-1)
        return top.indices, top.values, None
    q = probabilities(logits, temperature, top_p)
    logq = q.log()
    u = torch.rand(q.shape, generator=generator, device=q.device).clamp_(1e-20, 1.0)
    keys = logq - torch.log(-torch.log(u))  # Gumbel top-k = sampling without replacement, in order
    tokens = keys.topk(k, dim=-1).indices
    return tokens, logq.gather(-1, tokens), q


def _expansion_mask(lengths: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """`[B, E, kv_len]`: committed slots < L plus scratch slots L + x where `slots[b, e, x]`."""
    batch, width, n_scratch = slots.shape
    pos = torch.arange(kv_len, device=lengths.device)
    mask = (pos.view(1, 1, -1) < lengths.view(-1, 1, 1)).expand(batch, width, kv_len).clone()
    scratch = (lengths.view(-1, 1, 1) + torch.arange(n_scratch, device=lengths.device)).expand(batch, width, -1)
    mask.scatter_(2, scratch, slots)
    return mask


def expand_tree(drafter: MTPDrafter, kv: torch.Tensor, pe: torch.Tensor, lengths: torch.Tensor,
                root_logits: torch.Tensor, root_hidden: torch.Tensor, depth: int, topk: int, nodes: int,
                sampled: bool, temperature: float, top_p: float, draft_hidden: str,
                generator: torch.Generator | None, draft_vocab: int | None = None,
                block_table: torch.Tensor | None = None) -> DraftTree:
    """Draft a tree of `nodes` nodes per row (fewer only when the full tree is smaller).

    Args:
        drafter: the MTP layer (or a stand-in with its forward's signature, e.g. a compiled one).
        kv / pe: the whole pool `[n_pool_layers, ≥B, S, ·]`; rows 0..B-1 are these B sequences.
        lengths: `[B]` committed length L (the root, the pending token, sits at position L).
        root_logits / root_hidden: `[B, V]` / `[B, D]` MTP output at position L-1 (committed).
        depth / topk / nodes: tree shape. sampled: draw children from q (else top-k of the draft).
        draft_vocab: draft among token ids below this only (see `MTPDrafter.forward`).
        block_table: a paged pool's `[≥B, max_blocks]` table (None: a dense pool), as `MLA.forward` takes it.
    """
    batch, device = lengths.shape[0], lengths.device
    full = topk + (depth - 1) * topk * topk
    budget = min(nodes, full)
    n_scratch = max(depth - 1, 0) * topk
    tokens, logq, q_root = _children(root_logits, topk, sampled, temperature, top_p, generator)
    layers = [_Layer(tokens, logq, torch.full_like(tokens, -1),
                     root_hidden.unsqueeze(1).expand(-1, topk, -1),
                     torch.zeros(batch, topk, n_scratch, dtype=torch.bool, device=device))]
    total, used_slots = topk, 0
    for d in range(2, depth + 1):
        prev = layers[-1]
        width = min(topk, prev.tokens.shape[1])
        if sampled:  # every sampled child is kept, so expand only what the node budget can hold
            width = min(width, (budget - total) // topk)
        if width <= 0:
            break
        chosen = prev.scores.topk(width, dim=-1).indices  # [B, E] most confident frontier nodes
        own = torch.zeros(batch, width, n_scratch, dtype=torch.bool, device=device)
        own[:, torch.arange(width), used_slots + torch.arange(width)] = True
        slots = prev.ancestor_slots.gather(1, chosen.unsqueeze(-1).expand(-1, -1, n_scratch)) | own
        pos = (lengths + d - 2).unsqueeze(1).expand(-1, width)
        write = lengths.unsqueeze(1) + used_slots + torch.arange(width, device=device)
        mask = _expansion_mask(lengths, slots, int(lengths.max()) + n_scratch)
        hidden_in = prev.hidden.gather(1, chosen.unsqueeze(-1).expand(-1, -1, prev.hidden.shape[-1]))
        out = drafter(prev.tokens.gather(1, chosen), hidden_in, pos, kv, pe, write, mask, draft_vocab=draft_vocab,
                      block_table=block_table)
        child_tokens, child_logq, q = _children(out.logits, topk, sampled, temperature, top_p, generator)
        prev.expanded = torch.zeros_like(prev.tokens, dtype=torch.bool).scatter_(1, chosen, True)
        if sampled:
            prev.child_q = torch.zeros(*prev.tokens.shape, q.shape[-1], device=device)
            prev.child_q.scatter_(1, chosen.unsqueeze(-1).expand_as(q), q)
        parent_scores = prev.scores.gather(1, chosen)
        layers.append(_Layer(
            child_tokens.flatten(1), (parent_scores.unsqueeze(-1) + child_logq).flatten(1),
            chosen.repeat_interleave(topk, dim=1),
            out.hidden(draft_hidden).repeat_interleave(topk, dim=1),
            slots.repeat_interleave(topk, dim=1)))
        total += width * topk
        used_slots += width
    return _select(layers, budget if not sampled else total, q_root)


def _select(layers: list[_Layer], n: int, q_root: torch.Tensor | None) -> DraftTree:
    """Keep the best n candidates (ties: shallower first), order them by depth, and index their parents."""
    batch = layers[0].tokens.shape[0]
    device = layers[0].tokens.device
    sizes = [layer.tokens.shape[1] for layer in layers]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    scores = torch.cat([layer.scores for layer in layers], dim=1)
    depth_of = torch.cat([torch.full((s,), i + 1, device=device) for i, s in enumerate(sizes)])
    parent_global = torch.cat([layer.parents if i == 0 else layer.parents + offsets[i - 1]
                               for i, layer in enumerate(layers)], dim=1)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :n]  # candidates are depth-ordered already
    keep = torch.sort(order, dim=1).values  # back to (depth, candidate) order: parents before children
    node_of = torch.full((batch, scores.shape[1]), -1, dtype=torch.long, device=device)
    node_of.scatter_(1, keep, torch.arange(1, n + 1, device=device).expand(batch, n))
    parent = parent_global.gather(1, keep)
    parent_node = torch.where(parent < 0, torch.zeros_like(parent), node_of.gather(1, parent.clamp_min(0)))
    if (parent_node < 0).any():
        raise RuntimeError("tree selection lost an ancestor (non-monotone draft scores)")
    tokens = torch.cat([layer.tokens for layer in layers], dim=1).gather(1, keep)
    child_probs = None
    if q_root is not None:
        vocab = q_root.shape[-1]
        per_cand = torch.cat([layer.child_q if layer.child_q is not None else
                              torch.zeros(batch, layer.tokens.shape[1], vocab, device=device) for layer in layers], 1)
        child_probs = torch.cat([q_root.unsqueeze(1), per_cand.gather(1, keep.unsqueeze(-1).expand(-1, -1, vocab))], 1)
    return DraftTree(tokens, parent_node, depth_of[keep].long(), child_probs)
