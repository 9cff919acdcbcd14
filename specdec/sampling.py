"""Turning verifier logits into tokens: greedy, temperature, top-p; exact categorical draws.

Every rank holds identical logits and the same seeded generator, so all ranks draw the same
tokens in lockstep without a broadcast.
"""

from __future__ import annotations

import torch


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution `[..., V]` float32 from logits at temperature > 0, restricted to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p` (ties broken
    by token id); its mass is renormalised to 1.
    """
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    nucleus = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return nucleus / nucleus.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row of `[..., V]` probabilities → `[...]` int64, by inverting the CDF.

    Token i is drawn iff cdf[i-1] ≤ u·cdf[V-1] < cdf[i] for one uniform u per row, so a token of
    probability 0 (an empty interval) is never drawn; at the float edge u·total = total the last
    token of nonzero probability is taken. One uniform per row from `generator`, in row order.
    (`torch.multinomial` is exact too, but on the CPU it costs 6.5 ms for 32 rows of 8,192, this 0.2 ms.)
    """
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(dim=-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    last_nonzero = flat.shape[-1] - 1 - (flat.flip(-1) > 0).to(torch.int8).argmax(dim=-1, keepdim=True)
    return torch.minimum(index, last_nonzero).view(probs.shape[:-1])


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens `[B]` from logits `[B, V]`: argmax at temperature 0, else an exact categorical draw."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, temperature, top_p), generator)
