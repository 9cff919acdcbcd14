"""One decoding step as a function of tensors, read top-down: draft → verify → accept → commit.

`decode_step` is the step every loop runs (the scheduler's eager loop, and compiled); the MTP
catch-up after plain steps is `catch_up`. Neither reads anything back to the host: no `.tolist()`,
no `.item()`, no `.any()` deciding what runs. Every shape comes from the static `StepShape` and
from the cache view's slot count (`StepCache.n_slots`, which the caller knows from its own
bookkeeping), and every random number is an input (`StepRows.draws`, `StepRows.noise`), so a step
traces into one graph (tests compile each mode with `torch.compile(fullgraph=True)`) and could be
captured and replayed. The caller reads back the step's `StepResult.run` and `n_accepted` once.

A step of row b, committed length L (verifier and MTP caches hold positions < L), pending token
x_L (not yet in the verifier cache), MTP output at position L-1 (`draft_logits`, `draft_hidden`):

  1. draft: a chain d_1..d_K (d_1 from draft_logits; depth k ≥ 2 runs the MTP layer at position
     L+k-2 on its own previous hidden and d_{k-1}) or a tree (`mtp.tree_draft`), writing scratch
     MTP rows only;
  2. verify: one verifier forward over the root x_L and the N nodes (node i at position
     L + depth(i), cache slot L + i, attending to the committed prefix and its ancestors);
  3. accept: a path of a nodes and one verifier token after it (`specdec.acceptance`);
  4. commit: the path's verifier rows move to slots L+1..L+a (a chain's are in place) and the new
     length is L+a+1, which rolls back everything else; the MTP layer reruns over the committed
     pairs (h_{L+j}, x_{L+j+1}), j = 0..a, from the verifier's states; its output at j = a is the
     next step's first-draft distribution.

A plain step (depth 0) is the verifier over x_L alone.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from specdec.model.transformer import ForwardOutput
from specdec.mtp.tree_draft import draft_chain, expand_tree, tree_widths
from specdec.acceptance import Acceptance, accept_chain, accept_sampled, accept_targets, tree_children
from specdec.sampling import row_probabilities, sample_tokens
from specdec.tree import DraftTree, ancestor_matrix, tree_attention_mask, visible_slots


class StepShape(NamedTuple):
    """The static settings of a step (one traced graph each).

    depth: drafts per row along a path (0: a plain step). topk: children per expanded node (1: a
    chain). nodes: draft nodes per row (trees; a chain's is its depth). sampled_drafts: drafts are
    drawn from q and accepted by speculative sampling (else one-hot: a greedy row's argmax, a
    sampling row's coupled draw, accepted against the verifier's argmax or draw). any_sampled:
    some row samples.
    nucleus: some sampled row has top-p < 1. verifier_hidden_kind / draft_hidden_kind / draft_vocab: as in
    `SpecConfig`.
    """

    depth: int
    topk: int = 1
    nodes: int = 0
    sampled_drafts: bool = False
    any_sampled: bool = False
    nucleus: bool = False
    verifier_hidden_kind: str = "normed"
    draft_hidden_kind: str = "normed"
    draft_vocab: int | None = None

    @property
    def n_nodes(self) -> int:
        return self.depth if self.topk == 1 else self.nodes

    @property
    def noise_width(self) -> int:
        """Uniforms per row a sampled-draft step takes (`StepRows.noise`): k per expanded node while
        drafting, k per depth while accepting, one for the token after the path."""
        if not self.sampled_drafts or self.depth == 0:
            return 0
        expanded = 1 + sum(tree_widths(self.depth, self.topk, self.n_nodes, True))
        return self.topk * expanded + self.topk * self.depth + 1


class StepCache(NamedTuple):
    """The latent pools a step reads and writes, and the slots its masks span.

    kv / pe: a dense pool's views `[layers, rows, n_slots, ·]` (writes land in the pool), or a paged
    pool's `[layers, n_blocks, block_size, ·]` with `block_table` `[≥B, max_blocks]`. n_slots: the
    slots attention spans, at least the longest row's committed tokens plus what the step writes
    (a dense view's slot count)."""

    kv: torch.Tensor
    pe: torch.Tensor
    block_table: torch.Tensor | None
    n_slots: int


class StepRows(NamedTuple):
    """Per-row inputs of a step (B rows).

    lengths: `[B]` int64 committed length L. pending: `[B]` x_L. draft_logits `[B, V]` /
    draft_hidden `[B, dim]`: the MTP output at position L-1 (None for a plain step).
    temperature / top_p: `[B]` float32 (temperature 0: a greedy row).
    draws: `[B, depth+1, V]` float32 the race noise of output positions n..n+depth of each row (n:
        tokens it has emitted; `specdec.sampling.position_exponentials`), with which a sampling row
        draws the verifier's token at depth j and its one-hot draft for depth j+1; None when no row
        samples or drafts are sampled.
    noise: `[B, shape.noise_width]` float32 uniforms for sampled drafts and their acceptance (None otherwise).
    """

    lengths: torch.Tensor
    pending: torch.Tensor
    draft_logits: torch.Tensor | None
    draft_hidden: torch.Tensor | None
    temperature: torch.Tensor
    top_p: torch.Tensor
    draws: torch.Tensor | None = None
    noise: torch.Tensor | None = None


class StepResult(NamedTuple):
    """What one step returns (B rows, depth D).

    run: `[B, D+1]` the row's new tokens are its first `n_accepted + 1` (the accepted path, then the
        verifier's token). n_accepted: `[B]`. lengths: `[B]` committed length after the step.
    pending: `[B]` the next step's root. draft_logits / draft_hidden: the MTP output at the new
        position L'-1 (None after a plain step). verifier_hidden: `[B, 1, dim]` the verifier's state
        at x_L after a plain step (the pair (h_L, x_{L+1}) the MTP layer has not seen), else None.
    tree / path: the drafted tree and the accepted nodes `[B, D]` (0-padded), for observers.
    """

    run: torch.Tensor
    n_accepted: torch.Tensor
    lengths: torch.Tensor
    pending: torch.Tensor
    draft_logits: torch.Tensor | None
    draft_hidden: torch.Tensor | None
    verifier_hidden: torch.Tensor | None = None
    tree: DraftTree | None = None
    path: torch.Tensor | None = None


Forward = Callable[..., ForwardOutput]


def decode_step(verifier: Forward, drafter, cache: StepCache, rows: StepRows, shape: StepShape) -> StepResult:
    """One step over every row: plain when `shape.depth` is 0, else draft → verify → accept → commit.

    `verifier` / `drafter`: `Transformer.forward` / `MTPDrafter.forward` or stand-ins with their
    signatures (compiled forwards)."""
    if shape.depth == 0:
        return plain_step(verifier, cache, rows, shape)
    noise = StepNoise(rows.noise)
    tree = draft(drafter, cache, rows, shape, noise)                              # 1. draft
    verified = verify(verifier, cache, rows, tree, shape)                         # 2. verify
    acc = accept(tree, verified.logits, rows, shape, noise)                       # 3. accept
    return commit(drafter, cache, rows, shape, tree, verified, acc)               # 4. commit


def plain_step(verifier: Forward, cache: StepCache, rows: StepRows, shape: StepShape) -> StepResult:
    """The verifier over x_L alone, then x_{L+1} as plain decoding picks it; the MTP layer does not run."""
    slots = rows.lengths.unsqueeze(1)
    out = verifier(rows.pending.unsqueeze(1), slots, cache.kv, cache.pe, slots,
                   visible_slots(rows.lengths, 1, cache.n_slots), block_table=cache.block_table)
    token = target_tokens(out.logits, rows, shape, rows.draws[:, :1] if rows.draws is not None else None)
    return StepResult(token, torch.zeros_like(rows.lengths), rows.lengths + 1, token[:, 0], None, None,
                      verifier_state(out, shape.verifier_hidden_kind))


def draft(drafter, cache: StepCache, rows: StepRows, shape: StepShape, noise: "StepNoise") -> DraftTree:
    """A chain of `shape.depth` drafts per row, or an MTP-expanded tree (`mtp.tree_draft`)."""
    if shape.topk == 1:
        return draft_chain(drafter, cache, rows, shape, noise.take)
    return expand_tree(drafter, cache, rows, shape, noise.take)


def verify(verifier: Forward, cache: StepCache, rows: StepRows, tree: DraftTree, shape: StepShape) -> ForwardOutput:
    """One verifier forward over the root and the N nodes (positions L + depth, slots L..L+N, tree mask)."""
    lengths = rows.lengths
    tokens = tree.all_tokens(rows.pending)
    slots = lengths.unsqueeze(1) + torch.arange(tokens.shape[1], device=lengths.device)
    if shape.topk == 1:  # a chain: positions are the slots, the tree mask is causal
        mask = visible_slots(lengths, tokens.shape[1], cache.n_slots)
        return verifier(tokens, slots, cache.kv, cache.pe, slots, mask, block_table=cache.block_table)
    pos = lengths.unsqueeze(1) + tree.all_depths()
    mask = tree_attention_mask(lengths, ancestor_matrix(tree.parents), cache.n_slots)
    return verifier(tokens, pos, cache.kv, cache.pe, slots, mask, block_table=cache.block_table)


def accept(tree: DraftTree, target_logits: torch.Tensor, rows: StepRows, shape: StepShape,
           noise: "StepNoise") -> Acceptance:
    """The longest valid path and the token after it (`specdec.acceptance`), by the step's rule."""
    if shape.sampled_drafts:  # drafts drawn from q: speculative sampling
        p = row_probabilities(target_logits, rows.temperature, rows.top_p, shape.nucleus)
        return accept_sampled(tree, tree_children(tree.parents, shape.topk), p, noise.take(shape.topk * shape.depth + 1),
                              shape.depth)
    # greedy: the verifier's argmax at every node; one-hot drafts of a sampling row: the draw of
    # the output position node i would become (depth(i) after the row's emitted tokens)
    draws = rows.draws if shape.any_sampled else None
    if draws is not None and shape.topk > 1:
        draws = draws.gather(1, tree.all_depths().unsqueeze(-1).expand(-1, -1, draws.shape[-1]))
    target = target_tokens(target_logits, rows, shape, draws)
    if shape.topk == 1:
        return accept_chain(tree.tokens, target)
    return accept_targets(tree, tree_children(tree.parents, shape.topk), target, shape.depth)


def commit(drafter, cache: StepCache, rows: StepRows, shape: StepShape, tree: DraftTree, verified: ForwardOutput,
           acc: Acceptance) -> StepResult:
    """Compact the accepted path, set the new lengths, refresh the MTP rows from verifier states."""
    lengths, depth = rows.lengths, shape.depth
    if shape.topk > 1:  # node path[j-1] → slot L+j; rows that stopped before depth j copy a slot onto itself
        for j in range(1, depth + 1):
            src = torch.where(acc.n_accepted >= j, acc.path[:, j - 1], j)
            move_slots(cache, lengths + src, lengths + j)
    # pair j = (h at path node j, token of path node j+1), j = 0..a; the verifier's token at j = a
    nodes = torch.cat([torch.zeros_like(acc.path[:, :1]), acc.path], dim=1)  # [B, depth+1], root first
    hidden = verifier_state(verified, shape.verifier_hidden_kind)
    hidden = hidden.gather(1, nodes.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    path_tokens = tree.tokens.gather(1, (acc.path - 1).clamp_min(0))
    run = torch.cat([path_tokens, acc.next_token.unsqueeze(1)], 1).scatter(
        1, acc.n_accepted.unsqueeze(1), acc.next_token.unsqueeze(1))
    pos = lengths.unsqueeze(1) + torch.arange(depth + 1, device=lengths.device)
    mask = visible_slots(lengths, depth + 1, cache.n_slots)
    mtp = drafter(run, hidden, pos, cache.kv, cache.pe, pos, mask, acc.n_accepted.unsqueeze(1), shape.draft_vocab,
                  block_table=cache.block_table)
    return StepResult(run, acc.n_accepted, lengths + acc.n_accepted + 1, acc.next_token, mtp.logits[:, 0],
                      mtp.hidden(shape.draft_hidden_kind)[:, 0], None, tree, acc.path)


def catch_up(drafter, cache: StepCache, lengths: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor,
             shape: StepShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP layer over the w pairs (h_i, x_{i+1}), i = L-w..L-1, the last plain steps left it
    (`tokens` `[B, w]`, `hidden` `[B, w, dim]`): fills its cache rows and returns the first draft's
    logits `[B, V]` and the depth-2 seed `[B, dim]` (its output at position L-1)."""
    width = tokens.shape[1]
    first = lengths - width
    pos = first.unsqueeze(1) + torch.arange(width, device=lengths.device)
    mtp = drafter(tokens, hidden, pos, cache.kv, cache.pe, pos, visible_slots(first, width, cache.n_slots),
                  torch.full_like(lengths, width - 1).unsqueeze(1), shape.draft_vocab, block_table=cache.block_table)
    return mtp.logits[:, 0], mtp.hidden(shape.draft_hidden_kind)[:, 0]


def target_tokens(logits: torch.Tensor, rows: StepRows, shape: StepShape, draws: torch.Tensor | None) -> torch.Tensor:
    """`[B, W]` the verifier's token at each of W positions from logits `[B, W, V]`: the argmax of a
    greedy row; the winner of a sampling row's race with the noise `draws` `[B, W, V]` (`specdec.sampling`)."""
    return sample_tokens(logits, rows.temperature, rows.top_p, draws, shape.any_sampled, shape.nucleus)


def move_slots(cache: StepCache, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy slot src[b] of row b to its slot dst[b] (`[B]` each), in every layer of both pools."""
    rows = torch.arange(src.shape[0], device=src.device)
    if cache.block_table is None:
        for pool in (cache.kv, cache.pe):
            pool[:, rows, dst] = pool[:, rows, src]
        return
    size = cache.kv.shape[2]
    src_block, dst_block = cache.block_table[rows, src // size], cache.block_table[rows, dst // size]
    for pool in (cache.kv, cache.pe):
        pool[:, dst_block, dst % size] = pool[:, src_block, src % size]


def verifier_state(out: ForwardOutput, kind: str) -> torch.Tensor:
    """The verifier state `[B, T, dim]` that feeds the MTP layer: `kind` "normed" (after model.norm)
    or "prenorm" (`SpecConfig.verifier_hidden_kind`)."""
    return out.hidden if kind == "normed" else out.hidden_prenorm


class StepNoise:
    """Hands out consecutive columns of a step's `[B, R]` uniforms (`StepRows.noise`), in trace order."""

    def __init__(self, noise: torch.Tensor | None) -> None:
        self.noise, self.used = noise, 0

    def take(self, n: int) -> torch.Tensor:
        """The next `n` columns `[B, n]`."""
        if self.noise is None or self.used + n > self.noise.shape[1]:
            raise ValueError(f"step noise: {n} more uniforms needed, {0 if self.noise is None else self.noise.shape[1]}"
                             f" given, {self.used} used (StepShape.noise_width)")
        out = self.noise[:, self.used:self.used + n]
        self.used += n
        return out
