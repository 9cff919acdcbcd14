"""The acceptance engine for a chain of K drafted tokens per row: which drafts survive, and the next token.

Every rule returns, per row, how many drafts are accepted (`n_accepted` in 0..K) and the token
that follows them (the verifier's bonus token after a full accept, or its correction after a
rejection), so each step emits `n_accepted + 1` tokens. All rules are lossless:

* greedy: accept while the draft equals the verifier's argmax; next = argmax there.
* one-hot drafts (the draft is the MTP argmax, q is a point mass): draw y_j ~ p_j at every
  position and accept while y_j equals the draft; next = the first y_j that differs (or y_K).
  Each emitted token is a draw from p given the accepted prefix, so output ~ p exactly.
* sampled drafts (d_j ~ q_j): accept with probability min(1, p_j(d)/q_j(d)); on rejection draw
  from the residual (p_j − q_j)+ renormalised; after a full accept draw from p_K.

Random draws come from one seeded generator in a fixed order, identical on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Acceptance(NamedTuple):
    """n_accepted: `[B]` int64 drafts accepted (0..K); next_token: `[B]` int64 token emitted after them."""

    n_accepted: torch.Tensor
    next_token: torch.Tensor


def _accepted_prefix(matches: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True in each row of `[B, K]` bools."""
    return matches.long().cumprod(dim=1).sum(dim=1)


def accept_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> Acceptance:
    """drafts `[B, K]`, verifier logits `[B, K+1, V]` at the positions that predict each draft (and the bonus)."""
    target = target_logits.argmax(dim=-1)
    n = _accepted_prefix(drafts == target[:, :-1])
    return Acceptance(n, target.gather(1, n.unsqueeze(1)).squeeze(1))


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row of `[..., V]` probabilities → `[...]` int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def accept_onehot(drafts: torch.Tensor, target_probs: torch.Tensor, generator: torch.Generator | None) -> Acceptance:
    """drafts `[B, K]` (MTP argmax), verifier sampling distributions `[B, K+1, V]`."""
    y = _draw(target_probs, generator)  # [B, K+1]
    n = _accepted_prefix(drafts == y[:, :-1])
    return Acceptance(n, y.gather(1, n.unsqueeze(1)).squeeze(1))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm((p − q)+) over the last dim; falls back to p where p ≤ q everywhere (rejection then has probability 0)."""
    r = (p - q).clamp_min(0.0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


def accept_sampled(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> Acceptance:
    """drafts `[B, K]` drawn from draft_probs `[B, K, V]`; verifier distributions `[B, K+1, V]`."""
    k = drafts.shape[1]
    p_d = target_probs[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_d = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(drafts.shape, generator=generator, device=drafts.device)
    n = _accepted_prefix(u * q_d < p_d)
    fallback = torch.cat([residual_distribution(target_probs[:, :k], draft_probs), target_probs[:, k:]], dim=1)
    chosen = fallback.gather(1, n.view(-1, 1, 1).expand(-1, 1, fallback.shape[-1])).squeeze(1)
    return Acceptance(n, _draw(chosen, generator))


def cut_run(run: list[int], eos_ids: frozenset[int], budget: int) -> tuple[list[int], bool]:
    """The part of an accepted run a row keeps, and whether the row is finished.

    The run is cut after the first EOS (which is kept) and after `budget` tokens (what
    `max_new_tokens` still allows); either cut finishes the row.
    """
    for i, tok in enumerate(run[:budget]):
        if tok in eos_ids:
            return run[: i + 1], True
    return run[:budget], len(run) >= budget
