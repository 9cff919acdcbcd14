"""Adaptive speculation: each step, how many tokens to draft (0 = a plain step), from measurements.

The policy maximises expected tokens per second of the next step,

    depth* = argmax_d  τ(d) / cost(d, rows),     τ(d) = 1 + Σ_{i ≤ d} Π_{j ≤ i} a_j,

over d = 0 (plain decoding: one verifier forward over the pending token, no drafter) … K, where
`a_j` is the running conditional acceptance of the j-th draft (accepted given drafts 1..j-1 were;
decayed counts, so it follows the text) and `cost(d, rows)` is the measured wall time of a real
step of depth d with that many rows on this machine (the lower quartile of the last few, by row bucket;
`StepCosts`, saved on disk between runs). Every step, whatever its depth, is lossless on its own,
and the depth is a function of the past only, so switching depth never changes what is decoded:
greedy output stays token-identical to plain decoding and sampled output follows the verifier's
distribution (tests force the switching).

Exploration: a row bucket with no cost for some depth runs that depth (two samples each, the
deepest first so that every position's acceptance is seen); while too few drafts have been
verified to estimate acceptance, steps draft as deep as they may. The engine keeps the cost
table (also on disk) and the policy (acceptance, settled choice, revisit clock) across calls, so short calls do not each start
from scratch. Between depths whose predicted rates lie within `SWITCH_MARGIN` the policy keeps
the one it runs. A depth that is not chosen is run
again now and then (`FIRST_REVISIT` steps, doubling each time it is still not the best, and spaced
further when a revisit would cost much: `REVISIT_BUDGET`), which refreshes its cost and, for
speculative depths, the acceptance that plain steps cannot measure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from kernels.machine_cache import cache_dir, read_json, write_json

SAMPLES_KEPT = 9
"""Step timings kept per (depth, row bucket); the cost is their lower quartile (`step_cost`)."""
MIN_SAMPLES = 2
"""Timings a (depth, bucket) needs before it is exploited rather than explored."""
ACCEPTANCE_DECAY = 0.97
"""Per-step decay of the acceptance counts (a memory of roughly 30 steps)."""
MIN_REACHED = 4.0
"""Decayed row-steps at draft position 1 below which the acceptance counts as unknown: the policy
then drafts as deep as it may, which measures every position at once."""
FIRST_REVISIT = 32
MAX_REVISIT = 512
"""A depth not chosen runs again after `FIRST_REVISIT` steps, then after twice as many each time it
is still not the best (so a settled choice loses at most a few percent to revisits)."""
PRIOR_ACCEPTANCE = 0.6
"""Conditional acceptance assumed for a position before any draft there was verified (weight 1)."""
REVISIT_BUDGET = 0.01
"""A depth not chosen is revisited no more often than keeps its revisits' cost within this share of
the time: a revisit of depth d loses cost(d)/cost(best) × (1 − rate(d)/rate(best)) of a best step,
so a depth that would lose little comes back after `FIRST_REVISIT` steps and one that costs much
more (deep drafts at a large batch) only every few hundred."""
SWITCH_MARGIN = 0.03
"""The policy leaves the depth it settled on only for one predicted ≥ 3% faster: step timings on a
shared CPU wander by about that much, and flipping between two near-equal depths costs more than
either (going from plain steps back to drafting runs the MTP catch-up)."""


def row_bucket(rows: int) -> int:
    """Rows are timed in buckets 1, 2, 4, 8, …: the bucket is the largest power of two ≤ rows."""
    return 1 << (max(rows, 1).bit_length() - 1)


class StepCosts:
    """Measured seconds per decoding step, by (depth, row bucket); optionally kept on disk.

    `path`/`key`: the JSON file and the key (machine, model, settings) its samples are filed under;
    None: in memory only. `fixed` (tests): {(depth, bucket): seconds} that replace measurement —
    `add` then records nothing.
    """

    def __init__(self, path: Path | None = None, key: str = "", fixed: dict[tuple[int, int], float] | None = None):
        self.path, self.key, self.fixed = path, key, fixed
        self.samples: dict[tuple[int, int], deque[float]] = {}
        if path is not None and fixed is None:
            for name, values in read_json(path).get(key, {}).items():
                depth, bucket = (int(x) for x in name.split("/"))
                self.samples[(depth, bucket)] = deque(values[-SAMPLES_KEPT:], maxlen=SAMPLES_KEPT)

    def add(self, depth: int, rows: int, seconds: float) -> None:
        if self.fixed is None:
            self.samples.setdefault((depth, row_bucket(rows)), deque(maxlen=SAMPLES_KEPT)).append(seconds)

    def count(self, depth: int, rows: int) -> int:
        if self.fixed is not None:
            return MIN_SAMPLES if (depth, row_bucket(rows)) in self.fixed else 0
        return len(self.samples.get((depth, row_bucket(rows)), ()))

    def cost(self, depth: int, rows: int) -> float | None:
        """Seconds of a depth-`depth` step at this many rows (None: never measured): `step_cost` of
        its recent timings."""
        if self.fixed is not None:
            return self.fixed.get((depth, row_bucket(rows)))
        s = self.samples.get((depth, row_bucket(rows)))
        return step_cost(s) if s else None

    def table(self) -> dict[str, float]:
        """{"depth/bucket": seconds} of everything measured."""
        keys = self.fixed.keys() if self.fixed is not None else self.samples.keys()
        return {f"{d}/{b}": self.cost(d, b) for d, b in sorted(keys)}

    def save(self) -> None:
        """Merge this table into the file (atomically); an unwritable cache is not an error."""
        if self.path is None or self.fixed is not None or not self.samples:
            return
        data = read_json(self.path)
        data[self.key] = {f"{d}/{b}": list(s) for (d, b), s in sorted(self.samples.items())}
        write_json(self.path, data)


def step_cost(seconds) -> float:
    """The cost of a step from its recent timings: their lower quartile.

    Noise on a shared machine is one-sided: other work only ever adds time. A median keeps a burst
    of slow samples (timed while something else ran) for as long as they are the majority of the
    few kept, and a depth that is rarely revisited keeps them for hundreds of steps, even across
    runs (the table is on disk): measured on a 2-core VM, depth 3 at batch 1 kept a median of
    78 ms against 28 ms when timed alone, after a distillation job had shared the CPU, and adaptive decoding
    ran at 1.44x plain where chain 3 ran at 1.87x. The lower quartile stays at the machine's own
    speed until most samples are slow, and every depth is judged by the same statistic."""
    ordered = sorted(seconds)
    return ordered[(len(ordered) - 1) // 4]


def default_cost_path() -> Path:
    return cache_dir() / "step_costs.json"


@dataclass
class AcceptanceEstimate:
    """Decayed counts of draft position j being reached (drafts 1..j-1 accepted) and accepted."""

    max_depth: int
    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reached = [0.0] * self.max_depth
        self.accepted = [0.0] * self.max_depth

    def add(self, n_accepted: list[int], depth: int) -> None:
        """One step of depth `depth` ≥ 1: each row accepted `n_accepted[r]` of its drafts."""
        for j in range(self.max_depth):
            self.reached[j] *= ACCEPTANCE_DECAY
            self.accepted[j] *= ACCEPTANCE_DECAY
        for a in n_accepted:
            for j in range(min(a + 1, depth)):  # positions 0..a were tried; 0..a-1 were accepted
                self.reached[j] += 1
                if j < a:
                    self.accepted[j] += 1

    def conditional(self, j: int) -> float:
        """Estimated P(draft j+1 accepted | drafts 1..j accepted), with a weight-1 prior."""
        return (self.accepted[j] + PRIOR_ACCEPTANCE) / (self.reached[j] + 1.0)

    def expected_tokens(self, depth: int) -> float:
        """τ(depth): expected tokens a row emits in one step of this depth (1 for a plain step)."""
        tau, run = 1.0, 1.0
        for j in range(depth):
            run *= self.conditional(j)
            tau += run
        return tau


class SpeculationPolicy:
    """Chooses each step's draft depth in `min_depth`..`max_depth` (see the module docstring).

    The engine keeps one policy per setting for its whole life, so the acceptance, the choice it
    settled on and the revisit clock carry over from call to call. `min_depth` 1 keeps speculation
    on; `depths_run[d]` counts the steps run at depth d.
    """

    def __init__(self, max_depth: int, costs: StepCosts, min_depth: int = 0,
                 acceptance: AcceptanceEstimate | None = None) -> None:
        """`acceptance`: an estimate to continue from; None: a new one (the prior)."""
        self.max_depth, self.min_depth, self.costs = max_depth, min_depth, costs
        self.depths = range(min_depth, max_depth + 1)
        if acceptance is None or acceptance.max_depth < max_depth:
            acceptance = AcceptanceEstimate(max_depth)
        self.acceptance = acceptance
        self.depths_run = [0] * (max_depth + 1)
        self.steps = 0
        self.last_run = {d: 0 for d in self.depths}
        self.interval = {d: FIRST_REVISIT for d in self.depths}
        self.settled: dict[int, int] = {}  # row bucket -> the depth exploited there last

    def choose(self, rows: int) -> int:
        """The depth of the next step for a batch of `rows` rows."""
        self.steps += 1
        unexplored = [d for d in self.depths if self.costs.count(d, rows) < MIN_SAMPLES]
        if unexplored:
            return max(unexplored)  # deepest first: its steps measure every position's acceptance
        if self.acceptance.reached[0] < MIN_REACHED and self.max_depth > 0:
            return self.max_depth  # acceptance unknown (a new engine, or long plain stretches)
        best = self._best(rows)
        self.interval[best] = FIRST_REVISIT
        due = [d for d in self.depths
               if d != best and self.steps - self.last_run[d] >= max(self.interval[d], self._spacing(d, best, rows))]
        if due:  # revisit a depth not chosen for a while (its cost or the acceptance may have moved)
            d = min(due, key=lambda d: self.last_run[d])
            self.interval[d] = min(2 * self.interval[d], MAX_REVISIT)
            return d
        return best

    def _spacing(self, depth: int, best: int, rows: int) -> float:
        """Fewest steps between revisits of `depth` that keeps their loss against `best` within
        `REVISIT_BUDGET` (at most `MAX_REVISIT`)."""
        rate, best_rate = self.rate(depth, rows), self.rate(best, rows)
        cost, best_cost = self.costs.cost(depth, rows), self.costs.cost(best, rows)
        if not (best_rate and cost and best_cost):
            return 0.0
        lost = cost / best_cost * max(0.0, 1.0 - rate / best_rate)  # best steps one revisit costs
        return min(lost / REVISIT_BUDGET, MAX_REVISIT)

    def _best(self, rows: int) -> int:
        """The fastest depth by prediction, keeping the one settled on in this bucket unless another
        beats it by more than `SWITCH_MARGIN`."""
        rates = {d: self.rate(d, rows) for d in self.depths}
        best = max(self.depths, key=lambda d: (rates[d], -d))
        held = self.settled.get(row_bucket(rows))
        if held in rates and rates[best] <= rates[held] * (1 + SWITCH_MARGIN):
            best = held
        self.settled[row_bucket(rows)] = best
        return best

    def rate(self, depth: int, rows: int) -> float:
        """Predicted tokens per second per row of a depth-`depth` step."""
        cost = self.costs.cost(depth, rows)
        return self.acceptance.expected_tokens(depth) / cost if cost else 0.0

    def observe(self, depth: int, rows: int, seconds: float, n_accepted: list[int]) -> None:
        """A step ran: its depth, rows, wall seconds and (depth ≥ 1) each row's accepted drafts."""
        self.depths_run[depth] += 1
        self.last_run[depth] = self.steps
        self.costs.add(depth, rows, seconds)
        if depth > 0:
            self.acceptance.add(n_accepted, depth)
