"""Turning verifier logits into tokens: greedy, temperature, top-p; exact categorical draws.

Every rank holds identical logits and the same seeds, so all ranks draw the same tokens in
lockstep without a broadcast.

Output token i of prompt r is drawn by an exponential race (the Gumbel-max trick): the token t
of largest p(t) / E_t, with E_t ~ Exp(1) a pure function of (seed, r, i, t) (`position_exponentials`,
built on `position_uniforms`' counter-based hash, not on a sequential generator). So a prompt's
sampled tokens do not depend on how many steps produced them, on the draft depth of each step,
or on the other prompts in the batch: a seed reproduces its output under adaptive speculation.

The race couples drafts to the verifier (`specdec.mtp.tree_draft`): a sampling row's draft for
position i is the winner of the same race run on the drafter's distribution q, E_t unchanged, and
it is accepted when the verifier's race, on p, picks the same token. Speculative decoding then
emits plain sampling's tokens (up to float rounding of p at a near-tie), and a draft wins that race
with probability close to the most any coupling of p and q allows, Σ_t min(p(t), q(t)), where the
drafter's argmax wins only with probability p(argmax q) (measured on the embedded model at T 0.7:
first-draft acceptance 0.85 against 0.52).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def row_probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                      nucleus: bool = True) -> torch.Tensor:
    """Row b's sampling distribution `[B, ..., V]` float32 from logits `[B, ..., V]`, with its own
    temperature[b] and top_p[b] (`[B]` each): `probabilities` per row; a greedy row (temperature
    0) gets its argmax as a point mass, which is what greedy decoding draws from. `nucleus` False:
    no row has top_p < 1 (skips the sort)."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    t, p = temperature.view(shape), top_p.view(shape)
    greedy = t == 0
    probs = (logits.float() / torch.where(greedy, 1.0, t)).softmax(dim=-1)
    if nucleus:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(mass_before >= p, 0.0))
        probs = torch.where(p < 1.0, kept / kept.sum(dim=-1, keepdim=True), probs)
    point = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, point, probs)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  exponentials: torch.Tensor | None, sampled: bool, nucleus: bool) -> torch.Tensor:
    """`[B, W]` tokens from logits `[B, W, V]`: row b's argmax when greedy, else the winner of its
    distribution's (`row_probabilities`) race with `exponentials` `[B, W, ≥V]` (`race`). `sampled`
    False: no row samples (argmax everywhere; `exponentials` unused); `nucleus`: as `row_probabilities`."""
    if not sampled:
        return logits.argmax(dim=-1)
    return race(row_probabilities(logits, temperature, top_p, nucleus), exponentials)  # greedy rows: their argmax


def race(probs: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """One categorical draw per row of `[..., V]` probabilities: the token t of largest
    probs[t] / exponentials[t] (`exponentials` `[..., ≥V]`, i.i.d. Exp(1); columns past V unused).
    The minimum of independent Exp(rate p_t) variables E_t / p_t falls on t with probability p_t, so
    the winner follows `probs` exactly; a token of probability 0 never wins unless every token
    has probability 0 (a point mass wins outright: a greedy row's argmax)."""
    return (probs / exponentials[..., :probs.shape[-1]]).argmax(dim=-1)


MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a 64-bit integer to a well-mixed 64-bit integer (exact Python ints)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def position_uniforms(seed: int | list[int], streams: list[int], positions: list[list[int]]) -> torch.Tensor:
    """`[B, W]` float64 uniforms in [0, 1): entry (b, j) is u(seed, streams[b], positions[b][j]),
    a pure function of the three integers, the same on every machine and rank. `seed`: one for all
    rows or one per row."""
    seeds = seed if isinstance(seed, list) else [seed] * len(streams)
    out = [[(_mix64(_mix64(_mix64(s & MASK64) ^ (stream & MASK64)) ^ (pos & MASK64)) >> 11) * 2.0 ** -53
            for pos in row] for s, stream, row in zip(seeds, streams, positions)]
    return torch.tensor(out, dtype=torch.float64)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def position_exponentials(u: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[..., vocab]` float32 Exp(1) noise for the race of each position whose uniform is `u` `[...]`
    (float64 from `position_uniforms`: its 53 bits are the position's key k): entry t is
    -log((h + ½) / 2²³), h the top 23 bits of splitmix64's (t+1)-th output from state k (its last
    xor-shift, by 31 bits, leaves them as they are, so it is skipped), in int64 tensor ops
    (wrapping multiplication; in place: on a 2-core CPU, half the time of fresh tensors) on u's
    device, the same on every machine and rank. A pure function of (seed, stream, position,
    token). h + ½ is exact in float32 and below 2²³, so every entry is positive (at least 6e-8):
    no token's race score divides by 0."""
    x = (u * 2.0 ** 53).long().unsqueeze(-1) + torch.arange(1, vocab + 1, dtype=torch.long, device=u.device) * _GOLDEN
    shifted = torch.empty_like(x)
    for bits, multiplier in ((30, _MIX1), (27, _MIX2)):  # x ← (x ^ (x >>> bits)) · multiplier
        torch.bitwise_right_shift(x, bits, out=shifted)
        x.bitwise_xor_(shifted.bitwise_and_((1 << (64 - bits)) - 1)).mul_(multiplier)
    top = x.bitwise_right_shift_(41).bitwise_and_((1 << 23) - 1).float()
    return top.add_(0.5).mul_(2.0 ** -23).log_().neg_()


def draw_at(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One categorical draw per row of `[..., V]` probabilities with the given uniforms `u` `[...]`
    (see `draw`, which takes them from a generator)."""
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(dim=-1)
    index = torch.searchsorted(cdf, u.reshape(-1, 1).to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:], right=True)
    last_nonzero = flat.shape[-1] - 1 - (flat.flip(-1) > 0).to(torch.int8).argmax(dim=-1, keepdim=True)
    return torch.minimum(index, last_nonzero).view(probs.shape[:-1])


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row of `[..., V]` probabilities → `[...]` int64, by inverting the CDF.

    Token i is drawn iff cdf[i-1] ≤ u·cdf[V-1] < cdf[i] for one uniform u per row, so a token of
    probability 0 (an empty interval) is never drawn; at the float edge u·total = total the last
    token of nonzero probability is taken. One uniform per row from `generator`, in row order.
    (`torch.multinomial` is exact too, but on the CPU it costs 6.5 ms for 32 rows of 8,192, this 0.2 ms.)
    """
    u = torch.rand(probs.shape[:-1], generator=generator, device=probs.device, dtype=torch.float32)
    return draw_at(probs, u)


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling settings of a batch whose rows may differ (a server mixes requests).

    temperature[b] (0: greedy), top_p[b], seed[b] and stream[b] of row b: its output token i is
    drawn with u(seed[b], stream[b], i). `Engine.generate` gives prompt r the stream r; a server
    request has its own seed and stream 0.
    """

    temperature: tuple[float, ...]
    top_p: tuple[float, ...]
    seed: tuple[int, ...]
    stream: tuple[int, ...]

    @staticmethod
    def uniform(rows: int, temperature: float, top_p: float, seed: int) -> "RowSampling":
        """Rows 0..rows-1 of one call: the same settings, streams 0..rows-1."""
        return RowSampling((temperature,) * rows, (top_p,) * rows, (seed,) * rows, tuple(range(rows)))

    def __len__(self) -> int:
        return len(self.temperature)

    def select(self, rows: list[int]) -> "RowSampling":
        return RowSampling(*(tuple(field[r] for r in rows) for field in (self.temperature, self.top_p, self.seed,
                                                                           self.stream)))

    def __add__(self, other: "RowSampling") -> "RowSampling":
        return RowSampling(self.temperature + other.temperature, self.top_p + other.top_p, self.seed + other.seed,
                           self.stream + other.stream)

    @property
    def any_sampled(self) -> bool:
        return any(t > 0 for t in self.temperature)

    @property
    def nucleus(self) -> bool:
        """Whether some sampling row has top-p < 1."""
        return any(t > 0 and p < 1.0 for t, p in zip(self.temperature, self.top_p))

    def tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(temperature, top_p) `[B]` float32 each, on `device`."""
        return (torch.tensor(self.temperature, dtype=torch.float32, device=device),
                torch.tensor(self.top_p, dtype=torch.float32, device=device))

    def uniforms(self, positions: list[list[int]]) -> torch.Tensor:
        """`[B, W]` float64: u(seed[b], stream[b], positions[b][j]) (`position_uniforms`)."""
        return position_uniforms(list(self.seed), list(self.stream), positions)

    def exponentials(self, positions: list[list[int]], vocab: int, device: torch.device | str) -> torch.Tensor:
        """`[B, W, vocab]` float32: the race noise of output position positions[b][j] of row b
        (`position_exponentials` of its uniform)."""
        return position_exponentials(self.uniforms(positions).to(device), vocab)

    def tokens(self, logits: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
        """`[B, W]` tokens from logits `[B, W, V]`: row b's argmax when greedy, else the winner of
        output position positions[b][j]'s race (`race`)."""
        if not self.any_sampled:
            return logits.argmax(dim=-1)
        noise = self.exponentials(positions, logits.shape[-1], logits.device)
        return sample_tokens(logits, *self.tensors(logits.device), noise, True, self.nucleus)
