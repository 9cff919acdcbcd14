"""Greedy decoding steps written as pure tensor functions, so `--compile` makes each one graph.

`SpeculativeDecoder` (draft → verify → accept → commit) handles every draft shape and sampling
rule, with host-side bookkeeping between its forwards: masks cut to the longest row, a Python
acceptance walk, `.tolist()` between stages. Once the forwards are compiled, that glue costs as
much as a drafter forward. For the common case, greedy chains (and greedy plain decoding), a step
needs none of it:

* masks span every cache slot the step is given (slot s is visible to a query at slot t iff
  s ≤ t), so no shape depends on the lengths and nothing is read back to the host inside a step;
  the caller gives it `LatentCache.span`, the slots up to the longest row plus the step's writes
  (a dynamic dimension of the graph: no recompiles), not the whole pool, since attention costs
  every slot it spans;
* a chain's accepted drafts already sit in their final slots, so committing is a length update;
* rows that finished stay in the batch, parked: the caller sets their length to 0 and `live[b]`
  to 0, which keeps it there, so their writes land in the first slots of their own row, which
  nobody reads any more. Parked rows still cost compute, so once at most half the rows are live,
  the caller moves them into a pool of half as many rows (`shrunk_rows`): a batch runs at most
  log2(B) + 1 shapes, one graph each.

The module's forwards read top-down like `SpeculativeDecoder.generate`; the caller reads back
one small tensor per step (the emitted tokens) and does EOS/budget cuts on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from model.transformer import ForwardOutput, Transformer
from mtp.drafter import MTPDrafter
from specdec.tree import visible_slots


def shrunk_rows(n_live: int, n_rows: int) -> int:
    """The pool rows a batch with `n_live` live rows of `n_rows` moves to: halved while the live rows
    fit in half (8 rows, 3 live → 4; 1 live → 1); `n_rows` when nothing changes.

    Measured on the embedded model (2-core CPU, compiled, batch 8, 16 held-out prompts, 64 new
    tokens): a 3-chain batch ran 26.5 steps where its rows needed 21 on average, parked rows
    riding along in the last steps; see README "Measured"."""
    while n_rows > 1 and n_live <= n_rows // 2:
        n_rows //= 2
    return n_rows


class GreedyPlainStep(nn.Module):
    """One plain greedy decode step over a fixed batch: append `tokens` at slot `lengths`, return the argmax."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, kv_cache: torch.Tensor, pe_cache: torch.Tensor, lengths: torch.Tensor, live: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: the cache pools `[layers, B, S, ·]`; lengths `[B]` int64 committed tokens; live `[B]`
        int64 1 for rows still decoding, 0 for finished ones; tokens `[B]` the last emitted token per row.

        Returns (next tokens `[B]` int64, new lengths `[B]`: + live)."""
        slots = lengths.unsqueeze(1)
        mask = visible_slots(lengths, 1, kv_cache.shape[2])
        out = self.model(tokens.unsqueeze(1), slots, kv_cache, pe_cache, slots, mask)
        return out.logits[:, 0].argmax(dim=-1), lengths + live


class ChainStepOutput(NamedTuple):
    """What one greedy chain step returns (B rows, draft depth K).

    emitted: `[B, K+1]` the row's tokens this step: its first `n_accepted + 1` are the accepted
        drafts and then the verifier's token (later entries are unused drafts).
    n_accepted: `[B]` accepted drafts per row.
    lengths: `[B]` committed tokens after the step (finished rows unchanged).
    pending: `[B]` the verifier's token, the next step's root (not yet in the verifier cache).
    first_draft: `[B]` the MTP argmax for the token after `pending`: the next step's first draft.
    draft_hidden: `[B, dim]` the MTP state that seeds the next step's depth 2.
    """

    emitted: torch.Tensor
    n_accepted: torch.Tensor
    lengths: torch.Tensor
    pending: torch.Tensor
    first_draft: torch.Tensor
    draft_hidden: torch.Tensor


class GreedyChainStep(nn.Module):
    """One greedy MTP chain step over a fixed batch (the state of `specdec.speculative`, greedy).

    The draft settings are arguments of `forward`, not attributes: compiled graphs guard on
    arguments but not on module attributes (`specdec.compiled` skips those guards).
    """

    def __init__(self, model: Transformer, drafter: MTPDrafter) -> None:
        super().__init__()
        self.model, self.drafter = model, drafter

    def forward(self, kv_cache: torch.Tensor, pe_cache: torch.Tensor, lengths: torch.Tensor, live: torch.Tensor,
                pending: torch.Tensor, first_draft: torch.Tensor, draft_hidden: torch.Tensor, depth: int,
                verifier_hidden: str, draft_hidden_choice: str, draft_vocab: int | None) -> ChainStepOutput:
        """Args: the cache pools `[layers, B, S, ·]`; lengths `[B]` L (verifier and MTP caches hold
        positions < L); live `[B]` int64 1/0; pending `[B]` x_L; first_draft `[B]` d_1; draft_hidden
        `[B, dim]` the MTP state at position L-1; depth K; verifier_hidden, draft_hidden_choice and
        draft_vocab as in `SpecConfig` (`verifier_hidden`, `draft_hidden`, `draft_vocab`)."""
        n_slots, width = kv_cache.shape[2], depth + 1

        # 1. draft: d_k (k ≥ 2) from the MTP layer at position L+k-2 on d_{k-1} and its own state
        drafts, hidden = [first_draft], draft_hidden
        for k in range(2, depth + 1):
            pos = (lengths + k - 2).unsqueeze(1)
            out = self.drafter(drafts[-1].unsqueeze(1), hidden.unsqueeze(1), pos, kv_cache, pe_cache, pos,
                               visible_slots(pos[:, 0], 1, n_slots), draft_vocab=draft_vocab)
            drafts.append(out.logits[:, 0].argmax(dim=-1))
            hidden = out.hidden(draft_hidden_choice)[:, 0]
        drafts_t = torch.stack(drafts, dim=1)  # [B, K]

        # 2. verify: x_L, d_1..d_K at positions (= slots) L..L+K, causal over the pool
        tokens = torch.cat([pending.unsqueeze(1), drafts_t], dim=1)
        pos = lengths.unsqueeze(1) + torch.arange(width, device=lengths.device)
        mask = visible_slots(lengths, width, n_slots)
        verified: ForwardOutput = self.model(tokens, pos, kv_cache, pe_cache, pos, mask)

        # 3. accept: the longest prefix of drafts equal to the verifier's argmax, then its next argmax
        target = verified.logits.argmax(dim=-1)  # [B, K+1]
        n_accepted = (drafts_t == target[:, :-1]).long().cumprod(dim=1).sum(dim=1)
        next_token = target.gather(1, n_accepted.unsqueeze(1))
        emitted = torch.cat([drafts_t, next_token], dim=1).scatter(1, n_accepted.unsqueeze(1), next_token)

        # 4. commit: the accepted drafts are in place; the MTP layer reruns over the pairs
        # (h_{L+j}, x_{L+j+1}) from the verifier's states, and its output at j = a seeds the next step
        vh = verified.hidden if verifier_hidden == "normed" else verified.hidden_prenorm
        mtp = self.drafter(emitted, vh, pos, kv_cache, pe_cache, pos, mask, n_accepted.unsqueeze(1), draft_vocab)
        return ChainStepOutput(emitted, n_accepted, lengths + (n_accepted + 1) * live, next_token[:, 0],
                               mtp.logits[:, 0].argmax(dim=-1), mtp.hidden(draft_hidden_choice)[:, 0])
