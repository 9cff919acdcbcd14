"""Tree drafting with the MTP layer (EAGLE-2-style dynamic trees), batched over rows.

Depth 1: the top-k children of the root come from the MTP output already computed at the last
commit. Depth d ≥ 2: the E most confident frontier nodes (highest cumulative draft log-probability)
are expanded in one batched MTP forward at position L + d - 2 (each attending to the committed MTP
rows plus the scratch rows of its own expanded ancestors); each yields k children. Finally the best
N nodes by cumulative log-probability are kept (ancestors always outrank descendants, so the kept
set is a tree); topk = 1 reproduces the chain exactly.

Sampled drafts (lossless multi-candidate sampling) draw each expanded node's k children *without
replacement* from the draft distribution q (k draws in order, each from what the earlier left) and never prune a
sampled child: which children a node has must not depend on their values. Only which nodes get
expanded does, so the node budget is spent by expanding fewer nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from specdec.sampling import draw_at, race, row_probabilities
from specdec.tree import DraftTree, chain_tree, visible_slots

if TYPE_CHECKING:
    from specdec.steps import StepCache, StepRows, StepShape

Noise = Callable[[int], torch.Tensor]
"""`take(n)`: the step's next n uniforms per row, `[B, n]` (`specdec.steps`)."""


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


def tree_widths(depth: int, topk: int, nodes: int, sampled: bool) -> list[int]:
    """Frontier nodes expanded at depths 2..depth (one MTP forward each; fewer entries when the
    budget of `nodes` draft nodes runs out). Sampled children are never pruned, so then only what
    the budget can hold is expanded."""
    budget = min(nodes, topk + (depth - 1) * topk * topk)
    widths, total, frontier = [], topk, topk
    for _ in range(2, depth + 1):
        width = min(topk, frontier)
        if sampled:
            width = min(width, (budget - total) // topk)
        if width <= 0:
            break
        widths.append(width)
        total += width * topk
        frontier = width * topk
    return widths


def _children(logits: torch.Tensor, k: int, rows: StepRows, shape: StepShape, take: Noise,
              depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """k children at tree depth `depth` per row of logits `[B, m, V]`: (tokens `[B, m, k]`, log q
    `[B, m, k]`, q `[B, m, V]` if sampled). One-hot: a greedy row's top k; a sampling row's k best
    of the race its verifier runs at that depth (`_race_keys`: the first is its coupled draft).
    Sampled: k draws without replacement from q, in order (each from q with the tokens drawn before
    removed), k uniforms per node."""
    if not shape.sampled_drafts:
        logq = logits.float().log_softmax(dim=-1)
        keys = logq if rows.draws is None else _race_keys(logits, logq, rows, shape, depth)
        tokens = keys.topk(k, dim=-1).indices
        return tokens, logq.gather(-1, tokens), None
    q = row_probabilities(logits, rows.temperature, rows.top_p, shape.nucleus)
    u = take(k * logits.shape[1]).view(logits.shape[0], logits.shape[1], k)
    left, tokens = q, []
    for c in range(k):  # `draw_at` renormalises what is left
        token = draw_at(left, u[..., c])
        tokens.append(token)
        left = left.scatter(-1, token.unsqueeze(-1), 0.0)
    tokens_t = torch.stack(tokens, dim=-1)
    return tokens_t, q.log().gather(-1, tokens_t), q


def _race_keys(logits: torch.Tensor, logq: torch.Tensor, rows: StepRows, shape: StepShape,
               depth: int) -> torch.Tensor:
    """`[B, m, V]` what one-hot children at tree depth `depth` are ranked by: a greedy row's log q
    (its top k), a sampling row's race score q(t) / E_t on its sampling distribution, E the noise
    the verifier's token at that depth races with (`rows.draws[:, depth-1]`), so the best is the
    coupled draft (`specdec.sampling`) and the k best are k draws without replacement from q."""
    q = row_probabilities(logits, rows.temperature, rows.top_p, shape.nucleus)
    score = q / rows.draws[:, depth - 1, :q.shape[-1]].unsqueeze(1)
    greedy = (rows.temperature == 0).view(-1, *([1] * (logits.dim() - 1)))
    return torch.where(greedy, logq, score)


def draft_chain(drafter, cache: StepCache, rows: StepRows, shape: StepShape, take: Noise) -> DraftTree:
    """`shape.depth` drafts per row: d_1 from the committed MTP output, d_k (k ≥ 2) from the MTP
    layer at position L+k-2 on d_{k-1} and its own previous state; one-hot: the argmax (greedy
    rows), or for a sampling row the winner of q's race with the noise its verifier's token at
    depth k-1 races with (`rows.draws`, coupled drafts: `specdec.sampling`); sampled drafts: a
    draw from q (one uniform each)."""
    lengths, logits, hidden = rows.lengths, rows.draft_logits, rows.draft_hidden
    tokens, probs = [], []
    for k in range(1, shape.depth + 1):
        if k > 1:
            pos = (lengths + k - 2).unsqueeze(1)
            out = drafter(tokens[-1].unsqueeze(1), hidden.unsqueeze(1), pos, cache.kv, cache.pe, pos,
                          visible_slots(pos[:, 0], 1, cache.n_slots), draft_vocab=shape.draft_vocab,
                          block_table=cache.block_table)
            logits, hidden = out.logits[:, 0], out.hidden(shape.draft_hidden_kind)[:, 0]
        if shape.sampled_drafts:
            q = row_probabilities(logits, rows.temperature, rows.top_p, shape.nucleus)
            tokens.append(draw_at(q, take(1)[:, 0]))
            probs.append(q)
        elif rows.draws is not None:  # sampling rows (greedy rows: q is a point mass on the argmax)
            q = row_probabilities(logits, rows.temperature, rows.top_p, shape.nucleus)
            tokens.append(race(q, rows.draws[:, k - 1]))
        else:
            tokens.append(logits.argmax(dim=-1))
    child_probs = None
    if probs:  # node j's children were drawn from the q of depth j+1; leaves have none
        child_probs = torch.stack(probs + [torch.zeros_like(probs[0])], dim=1)
    return chain_tree(torch.stack(tokens, 1), child_probs)


def _expansion_mask(lengths: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """`[B, E, kv_len]`: committed slots < L plus scratch slots L + x where `slots[b, e, x]`."""
    batch, width, n_scratch = slots.shape
    pos = torch.arange(kv_len, device=lengths.device)
    mask = (pos.view(1, 1, -1) < lengths.view(-1, 1, 1)).expand(batch, width, kv_len).clone()
    scratch = (lengths.view(-1, 1, 1) + torch.arange(n_scratch, device=lengths.device)).expand(batch, width, -1)
    mask.scatter_(2, scratch, slots)
    return mask


def expand_tree(drafter, cache: StepCache, rows: StepRows, shape: StepShape, take: Noise) -> DraftTree:
    """Draft a tree of `shape.nodes` nodes per row (fewer only when the full tree is smaller).

    drafter: the MTP layer's forward (or a stand-in with its signature, e.g. a compiled one); the
    root's children come from rows.draft_logits / rows.draft_hidden `[B, V]` / `[B, D]`, the MTP
    output at position L-1 (committed); rows.lengths `[B]` is L (the root, the pending token, sits
    at position L); `take`: the step's uniforms (sampled drafts)."""
    depth, topk = shape.depth, shape.topk
    lengths = rows.lengths
    batch, device = lengths.shape[0], lengths.device
    budget = min(shape.nodes, topk + (depth - 1) * topk * topk)
    n_scratch = max(depth - 1, 0) * topk
    tokens, logq, q_root = _children(rows.draft_logits.unsqueeze(1), topk, rows, shape, take, 1)
    layers = [_Layer(tokens[:, 0], logq[:, 0], torch.full_like(tokens[:, 0], -1),
                     rows.draft_hidden.unsqueeze(1).expand(-1, topk, -1),
                     torch.zeros(batch, topk, n_scratch, dtype=torch.bool, device=device))]
    total, used_slots = topk, 0
    for width in tree_widths(depth, topk, shape.nodes, shape.sampled_drafts):
        d = len(layers) + 1
        prev = layers[-1]
        chosen = prev.scores.topk(width, dim=-1).indices  # [B, E] most confident frontier nodes
        own = torch.zeros(batch, width, n_scratch, dtype=torch.bool, device=device)
        nodes = torch.arange(width, device=device)  # on the step's device: a host index would copy mid-step
        own[:, nodes, used_slots + nodes] = True
        slots = prev.ancestor_slots.gather(1, chosen.unsqueeze(-1).expand(-1, -1, n_scratch)) | own
        pos = (lengths + d - 2).unsqueeze(1).expand(-1, width)
        write = lengths.unsqueeze(1) + used_slots + torch.arange(width, device=device)
        mask = _expansion_mask(lengths, slots, cache.n_slots)
        hidden_in = prev.hidden.gather(1, chosen.unsqueeze(-1).expand(-1, -1, prev.hidden.shape[-1]))
        out = drafter(prev.tokens.gather(1, chosen), hidden_in, pos, cache.kv, cache.pe, write, mask,
                      draft_vocab=shape.draft_vocab, block_table=cache.block_table)
        child_tokens, child_logq, q = _children(out.logits, topk, rows, shape, take, d)
        if shape.sampled_drafts:
            prev.child_q = torch.zeros(*prev.tokens.shape, q.shape[-1], device=device)
            prev.child_q.scatter_(1, chosen.unsqueeze(-1).expand_as(q), q)
        parent_scores = prev.scores.gather(1, chosen)
        layers.append(_Layer(
            child_tokens.flatten(1), (parent_scores.unsqueeze(-1) + child_logq).flatten(1),
            chosen.repeat_interleave(topk, dim=1),
            out.hidden(shape.draft_hidden_kind).repeat_interleave(topk, dim=1),
            slots.repeat_interleave(topk, dim=1)))
        total += width * topk
        used_slots += width
    return _select(layers, budget if not shape.sampled_drafts else total,
                   q_root[:, 0] if q_root is not None else None)


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
    # every kept node's parent is kept too (ancestors outrank descendants; `tests/test_tree.py` checks)
    parent_node = torch.where(parent < 0, torch.zeros_like(parent), node_of.gather(1, parent.clamp_min(0)))
    tokens = torch.cat([layer.tokens for layer in layers], dim=1).gather(1, keep)
    child_probs = None
    if q_root is not None:
        vocab = q_root.shape[-1]
        per_cand = torch.cat([layer.child_q if layer.child_q is not None else
                              torch.zeros(batch, layer.tokens.shape[1], vocab, device=device) for layer in layers], 1)
        child_probs = torch.cat([q_root.unsqueeze(1), per_cand.gather(1, keep.unsqueeze(-1).expand(-1, -1, vocab))], 1)
    return DraftTree(tokens, parent_node, depth_of[keep].long(), child_probs)
