"""Adaptive speculation: each step, how many tokens to draft (0 = a plain step), from measurements.

The policy maximises expected tokens per second of the next step,

    depth* = argmax_d  τ(d) / cost(d, rows),     τ(d) = 1 + Σ_{i ≤ d} Π_{j ≤ i} a_j,

over d = 0 (plain decoding: one verifier forward over the pending token, no drafter) … K, where
`a_j` is the running conditional acceptance of the j-th draft (accepted given drafts 1..j-1 were;
decayed counts, so it follows the text) and `cost(d, rows)` is the measured wall time of a real
step of depth d with that many rows on this machine, by row bucket (`StepCosts`, saved on disk
between runs): depths are compared by the ratio of their steps timed back to back, since the
machine's own speed drifts more than they differ. Every step, whatever its depth, is lossless on
its own, and the depth is a function of the past only, so switching depth never changes what is
decoded: greedy output stays token-identical to plain decoding and sampled output follows the
verifier's distribution (tests force the switching).

No margin is a constant tuned on one machine. Drafting after plain steps first pays the MTP
catch-up (and, in a call whose prompts the drafter has not seen, its prefill over them), both
timed on this machine, spread over the tokens the live rows still have to decode. And the policy
leaves plain decoding (held before any choice) for a drafting depth only when that is predicted
faster by `CONFIDENCE` standard errors of the prediction: the spread of the cost ratios measured
here (a quiet machine's ratios agree, a shared one's wander) and of the acceptance counts (few
drafts seen, wide). Going back to plain decoding needs no such proof: speculation must show that
it pays. Between drafting depths the faster by prediction runs: moving from one to another costs
nothing (measured on a 2-core VM, 16 rows: a depth-3 step after a depth-2 step takes what it takes
after a depth-3 step), while a margin there held a depth priced 3% slower than the other by a few
noisy ratios, truly 9% slower (16 rows: depth 2 held, chain 3 ran at 1.13x plain, adaptive at 1.05x).

No step drafts more tokens than any row can still keep (`choose`'s `deepest`: a call's last steps).

Exploration: a row bucket with no cost for some depth runs that depth (two samples each, the
deepest first so that every position's acceptance is seen); while too few drafts have been
verified to estimate acceptance, steps draft as deep as they may. The engine keeps the cost
table (also on disk) and the policy (acceptance, settled choice, revisit clock) across calls, so
short calls do not each start from scratch. In each row bucket one depth not chosen is run again
now and then (the least recently run; `FIRST_REVISIT` steps after the choice settled, then twice
as many each time, and spaced further when a revisit would cost much: `REVISIT_BUDGET`), which
refreshes its cost, the back-to-back ratios and, for speculative depths, the acceptance that plain
steps cannot measure. A depth that is likely faster than plain decoding held, but not yet proven
so, is probed instead: run on alternate steps until its measurements decide (`PROBE_CONFIDENCE`);
so is a drafting depth that may be faster than the drafting depth chosen (within one standard
error): tied depths alternate, which costs nothing, and a stale estimate is measured again.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from specdec.kernels.machine_cache import cache_dir, read_json, write_json

SAMPLES_KEPT = 9
"""Step timings kept per (depth, row bucket); the cost is their lower quartile (`step_cost`)."""
MIN_SAMPLES = 2
"""Timings a (depth, bucket) needs before it is exploited rather than explored."""
ACCEPTANCE_DECAY = 0.97
"""Per-step decay of the acceptance counts (a memory of roughly 30 drafting steps). A position a
step does not draft keeps its estimate and only loses weight (its error grows, and the policy probes
the depth that drafts it: `_best`): decayed like the others, the counts of position 3 faded toward
the prior (0.6) while depth 2 ran, which priced depth 3 out and held depth 2 (measured on a 2-core
VM, batch 1, T = 0.7: a whole round of 16 prompts at depth 2, tau 2.50, where depth 3 gives 3.0)."""
MIN_REACHED = 4.0
"""Decayed row-steps at draft position 1 below which the acceptance counts as unknown: the policy
then drafts as deep as it may, which measures every position at once."""
FIRST_REVISIT = 32
MAX_REVISIT = 512
"""In each row bucket, one depth other than the settled one runs again `FIRST_REVISIT` steps after
the choice settled, then after twice as many steps each time (at most `MAX_REVISIT`), the least
recently run depth first; a new choice restarts the clock."""
PRIOR_ACCEPTANCE = 0.6
"""Conditional acceptance assumed for a position before any draft there was verified (weight 1)."""
REVISIT_BUDGET = 0.01
"""Revisits are spaced so that their cost stays within this share of the time: a revisit of depth d
loses cost(d)/cost(best) × (1 − rate(d)/rate(best)) of a best step, plus, leaving plain decoding,
the MTP catch-up it first runs (its measured time over a best step's; when it comes due while the
call's prompts still wait for the drafter, their dearer catch-up, and the revisit waits longer),
so a revisit that would lose little comes `FIRST_REVISIT` steps after the last and one that costs
much more (deep drafts at a large batch, the MTP prefill over a batch of prompts) only every few
hundred."""
CATCH_UP = -1
"""The pseudo-depth `StepCosts` files the MTP catch-up's timings under (after plain steps)."""
PROMPT_CATCH_UP = -2
"""The pseudo-depth of the MTP layer's deferred prefill over a call's prompts (with any catch-up
after it), run before a call's first drafting step."""
CONFIDENCE = 2.0
"""Standard errors by which a drafting depth's predicted rate must exceed that of the depth held
before the policy switches to it (about 98% one-sided confidence that it is faster)."""
PROBE_CONFIDENCE = 1.0
PROBE_GAP = 2
"""A depth predicted faster than the one held by `PROBE_CONFIDENCE` standard errors (about 84%
one-sided) but not by `CONFIDENCE` is probed: it runs every `PROBE_GAP`-th step of its bucket,
alternating with the depth held, each pair of steps a back-to-back ratio, until its measurements
prove it faster (the policy switches) or not (the probing stops). Without probes a depth priced
out by timings from a slow spell (kept on disk) waited for its rare revisits to be priced again:
measured on a 2-core VM, one row's chain steps kept ratios of 4.8, 1.2 and 2.1 plain steps (true:
1.9), and the last steps of every call decoded plainly at 1 row."""


def row_bucket(rows: int) -> int:
    """Rows are timed in buckets 1, 2, 4, 8, …: the bucket is the largest power of two ≤ rows."""
    return 1 << (max(rows, 1).bit_length() - 1)


class StepCosts:
    """Measured seconds per decoding step, by (depth, row bucket), and the ratios of adjacent steps
    of two depths; optionally kept on disk.

    Absolute timings taken minutes apart on a shared machine differ by more than the depths do (a
    2-core VM ran the same plain step in 13 to 19 ms within one benchmark), so depths are compared
    by `relative`: the median ratio of two steps run back to back with the same rows (the policy's
    revisits make such pairs), falling back to the absolute costs while there are too few.

    `path`/`key`: the JSON file and the key (machine, model, settings) its samples are filed under;
    None: in memory only. `fixed` (tests): {(depth, bucket): seconds} that replace measurement —
    `add` and `add_pair` then record nothing.
    """

    def __init__(self, path: Path | None = None, key: str = "", fixed: dict[tuple[int, int], float] | None = None):
        self.path, self.key, self.fixed = path, key, fixed
        self.samples: dict[tuple[int, int], deque[float]] = {}
        self.pairs: dict[tuple[int, int, int], deque[float]] = {}  # (lower, higher depth, bucket) -> t_hi / t_lo
        if path is not None and fixed is None:
            for name, values in read_json(path).get(key, {}).items():
                kept = deque(values[-SAMPLES_KEPT:], maxlen=SAMPLES_KEPT)
                depths, bucket = name.split("/")
                if ":" in depths:
                    low, high = (int(x) for x in depths.split(":"))
                    self.pairs[(low, high, int(bucket))] = kept
                else:
                    self.samples[(int(depths), int(bucket))] = kept

    def add(self, depth: int, rows: int, seconds: float) -> None:
        if self.fixed is None:
            self.samples.setdefault((depth, row_bucket(rows)), deque(maxlen=SAMPLES_KEPT)).append(seconds)

    def add_pair(self, depth_a: int, seconds_a: float, depth_b: int, seconds_b: float, rows: int) -> None:
        """Two steps of different depths run back to back over the same `rows` rows."""
        if self.fixed is not None or depth_a == depth_b or min(seconds_a, seconds_b) <= 0:
            return
        (low, t_low), (high, t_high) = sorted([(depth_a, seconds_a), (depth_b, seconds_b)])
        self.pairs.setdefault((low, high, row_bucket(rows)), deque(maxlen=SAMPLES_KEPT)).append(t_high / t_low)

    def relative(self, depth: int, reference: int, rows: int) -> float | None:
        """cost(depth) / cost(reference) at this many rows: the median of their back-to-back ratios
        (at least `MIN_SAMPLES`), else the ratio of their costs (None: either never measured)."""
        if depth == reference:
            return 1.0
        low, high = sorted((depth, reference))
        ratios = self.pairs.get((low, high, row_bucket(rows)), ())
        if len(ratios) >= MIN_SAMPLES:
            ratio = statistics.median(ratios)
            return ratio if depth == high else 1.0 / ratio
        cost, ref = self.cost(depth, rows), self.cost(reference, rows)
        return cost / ref if cost and ref else None

    def relative_error(self, depth: int, reference: int, rows: int) -> float:
        """The relative standard error of `relative(depth, reference, rows)`: that of the median of
        the back-to-back ratios when it is taken from them, else that of the two costs combined
        (`median_error`); 0 for a fixed table or the reference itself."""
        if self.fixed is not None or depth == reference:
            return 0.0
        low, high = sorted((depth, reference))
        ratios = self.pairs.get((low, high, row_bucket(rows)), ())
        if len(ratios) >= MIN_SAMPLES:
            return median_error(ratios)
        errors = [median_error(self.samples.get((d, row_bucket(rows)), ())) for d in (depth, reference)]
        return math.hypot(*errors)

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
        data[self.key].update({f"{lo}:{hi}/{b}": list(s) for (lo, hi, b), s in sorted(self.pairs.items())})
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


def median_error(values) -> float:
    """The relative standard error of the median of `values` (≥ 2 of them; else 0): 1.2533 σ / √n
    over the median, σ estimated robustly as 1.4826 × the median absolute deviation."""
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    spread = 1.4826 * statistics.median(abs(v - middle) for v in values)
    return 1.2533 * spread / math.sqrt(len(values)) / middle if middle > 0 else 0.0


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
        """One step of depth `depth` ≥ 1: each row accepted `n_accepted[r]` of its drafts. Every
        position's counts decay (`ACCEPTANCE_DECAY`); those deeper than `depth` keep their estimate."""
        for j in range(self.max_depth):
            kept = self.conditional(j)
            self.reached[j] *= ACCEPTANCE_DECAY
            self.accepted[j] *= ACCEPTANCE_DECAY
            if j >= depth:  # not drafted: the same estimate (`conditional`), on less weight
                self.accepted[j] = max(0.0, kept * (self.reached[j] + 1.0) - PRIOR_ACCEPTANCE)
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


    def tau_error(self, depth: int) -> float:
        """The relative standard error of `expected_tokens(depth)`: each position's binomial error
        √(a(1−a)/(n+1)) (n: its decayed reached count, plus the prior's weight) carried through
        τ's product terms (∂τ/∂a_j = Σ_{i ≥ j} Π_{k ≤ i} a_k / a_j)."""
        if depth == 0:
            return 0.0
        a = [self.conditional(j) for j in range(depth)]
        products, run = [], 1.0
        for j in range(depth):
            run *= a[j]
            products.append(run)
        variance = 0.0
        for j in range(depth):
            slope = sum(products[j:]) / a[j] if a[j] > 0 else 0.0
            variance += slope ** 2 * a[j] * (1 - a[j]) / (self.reached[j] + 1.0)
        return math.sqrt(variance) / self.expected_tokens(depth)


class SpeculationPolicy:
    """Chooses each step's draft depth in `min_depth`..`max_depth`, or among `depths` when given
    (see the module docstring).

    The engine keeps one policy per setting for its whole life, so the acceptance, the choice it
    settled on and the revisit clock carry over from call to call. `min_depth` 1 keeps speculation
    on; `depths` (which must hold `max_depth`) limits the choice to a few depths (compiled steps:
    plain or `max_depth`, each depth compiling graphs of its own); `depths_run[d]` counts the
    steps run at depth d.
    """

    def __init__(self, max_depth: int, costs: StepCosts, min_depth: int = 0,
                 acceptance: AcceptanceEstimate | None = None, depths: tuple[int, ...] | None = None) -> None:
        """`acceptance`: an estimate to continue from; None: a new one (the prior)."""
        self.depths = tuple(sorted(set(depths))) if depths is not None else tuple(range(min_depth, max_depth + 1))
        if self.depths[-1] != max_depth or self.depths[0] < 0:
            raise ValueError(f"policy depths {self.depths} must lie in 0..{max_depth} and hold {max_depth}")
        self.max_depth, self.min_depth, self.costs = max_depth, self.depths[0], costs
        if acceptance is None or acceptance.max_depth < max_depth:
            acceptance = AcceptanceEstimate(max_depth)
        self.acceptance = acceptance
        self.depths_run = [0] * (max_depth + 1)
        self.settled: dict[int, int] = {}  # row bucket -> the depth exploited there last
        self.clock: dict[int, int] = {}  # row bucket -> steps chosen for it
        self.last_run: dict[tuple[int, int], int] = {}  # (bucket, depth) -> its clock when that depth last ran
        self.revisit_at: dict[int, int] = {}  # bucket -> its clock at the next revisit
        self.revisit_gap: dict[int, float] = {}  # bucket -> steps from the last revisit to the next
        self.revisit_from: dict[int, int] = {}  # bucket -> its clock when the next revisit was planned
        self.previous: tuple[int, int, float] | None = None  # the last step's (depth, rows, seconds)

    def choose(self, rows: int, horizon: float = math.inf, catch_up: int | None = None,
               deepest: int | None = None) -> int:
        """The depth of the next step for a batch of `rows` rows that still have `horizon` tokens
        each to decode (their mean budget left), drafting after plain steps first running the
        pseudo-depth `catch_up` (`CATCH_UP` or `PROMPT_CATCH_UP`; None: the drafter is level).

        `deepest`: the most drafts any row can still keep (a row keeps at most depth + 1 tokens, so
        with n tokens left at most n - 1): the choice is cut to the shallowest allowed depth that
        drafts that many."""
        depth = self._choose(rows, horizon, catch_up)
        return depth if deepest is None or depth <= deepest else min(d for d in self.depths if d >= deepest)

    def _choose(self, rows: int, horizon: float, catch_up: int | None) -> int:
        bucket = row_bucket(rows)
        clock = self.clock[bucket] = self.clock.get(bucket, 0) + 1
        unexplored = [d for d in self.depths if self.costs.count(d, rows) < MIN_SAMPLES]
        if unexplored:
            return max(unexplored)  # deepest first: its steps measure every position's acceptance
        if self.acceptance.reached[0] < MIN_REACHED and self.max_depth > 0:
            return self.max_depth  # acceptance unknown (a new engine)
        rates = self.rates(rows)
        held = self.settled.get(bucket)
        best, probe = self._best(rows, rates, horizon, catch_up)
        if len(self.depths) == 1:
            return best
        if (best == 0) != (held == 0) or bucket not in self.revisit_at:  # into or out of plain decoding:
            # the revisit clock starts anew (moves between drafting depths leave it running)
            self.revisit_gap[bucket] = FIRST_REVISIT / 2
            self._schedule_revisit(bucket, best, rows, rates)
        if probe is not None and clock - self.last_run.get((bucket, probe), -PROBE_GAP) >= PROBE_GAP:
            self.last_run[(bucket, probe)] = clock
            return probe
        if clock < self.revisit_at[bucket]:
            return best
        depth = self._next_revisit(bucket, best)  # its cost, or the acceptance, may have moved
        spacing = min(self._revisit_loss(depth, best, rows, rates, catch_up) / REVISIT_BUDGET, MAX_REVISIT)
        if clock - self.revisit_from[bucket] < spacing:  # dearer now than planned (the prompts' catch-up is due)
            self.revisit_at[bucket] = self.revisit_from[bucket] + spacing
            return best
        self.last_run[(bucket, depth)] = clock
        self._schedule_revisit(bucket, best, rows, rates)
        return depth

    @property
    def steps(self) -> int:
        """Steps chosen so far, in every row bucket."""
        return sum(self.clock.values())

    def _next_revisit(self, bucket: int, best: int) -> int:
        """The depth other than `best` run least recently in this bucket."""
        return min((d for d in self.depths if d != best), key=lambda d: self.last_run.get((bucket, d), -1))

    def _schedule_revisit(self, bucket: int, best: int, rows: int, rates: dict[int, float]) -> None:
        """Set the bucket's next revisit: twice the last gap, or more when it would cost more than
        `REVISIT_BUDGET` of the steps between (at most `MAX_REVISIT`)."""
        lost = self._revisit_loss(self._next_revisit(bucket, best), best, rows, rates, CATCH_UP)
        self.revisit_gap[bucket] = min(max(2 * self.revisit_gap[bucket], lost / REVISIT_BUDGET), MAX_REVISIT)
        self.revisit_from[bucket] = self.clock[bucket]
        self.revisit_at[bucket] = self.clock[bucket] + self.revisit_gap[bucket]

    def rates(self, rows: int) -> dict[int, float]:
        """Predicted tokens per row of each depth per unit of time, the unit being one step of the
        depth settled on in this row bucket (the shallowest allowed before any): τ(d) over the cost
        of a depth-d step relative to it (`StepCosts.relative`; 0: never measured)."""
        reference = self.settled.get(row_bucket(rows), self.min_depth)
        rates = {}
        for d in self.depths:
            relative = self.costs.relative(d, reference, rows)
            rates[d] = self.acceptance.expected_tokens(d) / relative if relative else 0.0
        return rates

    def _revisit_loss(self, depth: int, best: int, rows: int, rates: dict[int, float], catch_up: int | None) -> float:
        """What one step of `depth` in place of `best` is predicted to lose, in best steps, with the
        catch-up `catch_up` it first needs when `best` is plain decoding (None: a plain-stretch one)."""
        relative = self.costs.relative(depth, best, rows)
        if not (rates[best] and relative):
            return 0.0
        lost = relative * max(0.0, 1.0 - rates[depth] / rates[best])
        if best == 0 and depth > 0:
            lost += self._catch_up_cost(catch_up or CATCH_UP, 0, rows)
        return lost

    def _catch_up_cost(self, catch_up: int, reference: int, rows: int) -> float:
        """The catch-up `catch_up` (`CATCH_UP`, `PROMPT_CATCH_UP`) in steps of depth `reference`: an
        unmeasured prompt catch-up is priced as a plain-stretch one, an unmeasured catch-up as one step."""
        cost = self.costs.relative(catch_up, reference, rows)
        if cost is None and catch_up == PROMPT_CATCH_UP:
            cost = self.costs.relative(CATCH_UP, reference, rows)
        return cost if cost is not None else 1.0

    def _best(self, rows: int, rates: dict[int, float], horizon: float,
              catch_up: int | None) -> tuple[int, int | None]:
        """The fastest depth by prediction (`_scores`), except that the policy leaves plain decoding
        when it holds it in this bucket (as it does before any choice) for a drafting depth only
        when that is predicted faster by `CONFIDENCE` standard errors (`_error`); plain decoding,
        and one drafting depth from another, need only be predicted faster. Also the depth to probe
        (None: none): leaving plain decoding, the fastest by prediction when it was not chosen for
        want of proof, yet is likely faster (`PROBE_CONFIDENCE` standard errors) by more than the
        catch-up a probe from plain steps first pays; between drafting depths, the fastest other
        drafting depth that may be faster than the chosen one (within `PROBE_CONFIDENCE` standard
        errors of it), so that neither a stale cost ratio nor a stale acceptance holds a depth
        (measured on a 2-core VM, batch 1, greedy: depth 2 held for 4 rounds on back-to-back ratios
        pricing depth 3 1.25x depth 2, truly 1.1x; 1.34x plain against chain 3's 1.48x)."""
        bucket = row_bucket(rows)
        held = self.settled.get(bucket, self.min_depth)  # also the unit of `rates`
        score = self._scores(rows, rates, held, horizon, catch_up)
        best = top = max(self.depths, key=lambda d: (score[d], -d))
        probe = None
        if held == 0 and best != 0:
            error = self._error(best, rows)
            if score[best] <= score[held] * (1 + CONFIDENCE * error):
                best = held
                if score[top] > score[held] * (1 + PROBE_CONFIDENCE * error) and self._probe_pays(top, rows, rates):
                    probe = top
        elif best != 0:  # another drafting depth within PROBE_CONFIDENCE errors of it: probed
            rivals = [d for d in self.depths if d not in (0, best)
                      and score[d] * (1 + PROBE_CONFIDENCE * self._error(d, rows, best)) > score[best]]
            probe = max(rivals, key=lambda d: (score[d], -d)) if rivals else None
        self.settled[bucket] = best
        return best, probe

    def _probe_pays(self, depth: int, rows: int, rates: dict[int, float]) -> bool:
        """Whether one step of `depth` in place of a plain step (probes leave plain decoding only) is
        predicted to gain more than the catch-up it first runs (when measured): in plain steps,
        the gain is the depth's cost × (its rate over plain's − 1)."""
        relative = self.costs.relative(depth, 0, rows)
        if not (relative and rates[0]):
            return False
        gain = relative * (rates[depth] / rates[0] - 1.0)
        catch_up = self.costs.relative(CATCH_UP, 0, rows)
        return gain > (catch_up or 0.0)  # a catch-up never timed in this bucket: the probe times it

    def _scores(self, rows: int, rates: dict[int, float], reference: int, horizon: float,
                catch_up: int | None) -> dict[int, float]:
        """`rates` (in steps of depth `reference`), with the catch-up that drafting must first run
        (None: none) spread over the `horizon` tokens per row left: R tokens at rate r after a
        catch-up of C units take R/r + C, so the depth's rate over them is r / (1 + C r / R)
        (C: `_catch_up_cost`)."""
        if catch_up is None or not math.isfinite(horizon):
            return dict(rates)
        units = self._catch_up_cost(catch_up, reference, rows) / max(horizon, 1.0)
        return {d: r / (1 + units * r) if d > 0 else r for d, r in rates.items()}

    def _error(self, depth: int, rows: int, reference: int = 0) -> float:
        """The relative standard error of rate(depth) / rate(reference): the cost ratio's
        (`StepCosts.relative_error`) and τ's of the deeper of the two (`AcceptanceEstimate.tau_error`)."""
        return math.hypot(self.costs.relative_error(depth, reference, rows),
                          self.acceptance.tau_error(max(depth, reference)))

    def observe(self, depth: int, rows: int, seconds: float | None, n_accepted: list[int]) -> None:
        """A step ran: its depth, rows, wall seconds (None: not a timing of the step, e.g. it
        compiled) and (depth ≥ 1) each row's accepted drafts."""
        self.depths_run[depth] += 1
        bucket = row_bucket(rows)
        self.last_run[(bucket, depth)] = self.clock.get(bucket, 0)
        if seconds is None:
            self.previous = None
        else:
            self.costs.add(depth, rows, seconds)
            if self.previous is not None and self.previous[1] == rows:  # back to back with the same rows
                self.costs.add_pair(self.previous[0], self.previous[2], depth, seconds, rows)
            self.previous = (depth, rows, seconds)
        if depth > 0:
            self.acceptance.add(n_accepted, depth)

    def observe_catch_up(self, rows: int, seconds: float, kind: int = CATCH_UP) -> None:
        """The MTP layer caught up before a drafting step (`rows` rows): over a plain stretch
        (`CATCH_UP`) or over the call's prompts (`PROMPT_CATCH_UP`)."""
        self.costs.add(kind, rows, seconds)
