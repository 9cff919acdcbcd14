"""CPU GEMM formulations for `y = x Wᵀ`, chosen per weight shape and row count by timing them.

Which formulation a CPU's BLAS runs fastest depends on the CPU, not on the maths: on one 2-core
AMD VM `W @ xᵀ` beat `x @ Wᵀ` 2–4× for 2–16 rows, on a 2-core Intel Xeon it lost 2–4× at the same
shapes. So nothing here is a constant: `GemmTuner` times the candidates on the machine that runs
them, once per (weight shape, row bucket), and caches the verdicts on disk keyed by CPU model,
torch version, thread count and dtype. Every formulation computes the same product; they differ
only in summation order (float rounding), never in shape or dtype.

Formulations (x2 `[rows, in]`, W `[out, in]`):
    "x_wt":    torch.mm(x2, W.t())                  (BLAS transposes W; what F.linear does)
    "w_xt":    torch.mm(W, x2.t()).t().contiguous()
    "x_wcopy": torch.mm(x2, Wt) with Wt a contiguous `[in, out]` copy (costs in × out more memory;
               only offered for the layers the caller allows, e.g. a vocabulary head)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.kernels.machine_cache import cache_dir, cpu_model, machine_key, read_json, write_json

__all__ = ["DEFAULT", "FORMULATIONS", "ROW_BUCKETS", "GemmTuner", "RowPlan", "cache_dir", "cpu_model", "gemm",
           "interleaved_seconds", "machine_key", "measure_enabled"]

FORMULATIONS = ("x_wt", "w_xt", "x_wcopy")
DEFAULT = "x_wt"
"""The safe default (F.linear's own formulation), used when measuring is off."""
ROW_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
"""Row counts measured; a call with r rows takes the verdict of the largest bucket ≤ r."""
MIN_GAIN = 0.05
"""Another formulation replaces the default only when it is this much faster (noise guard)."""
CACHE_VERSION = 1


def gemm(x2: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None, formulation: str) -> torch.Tensor:
    """x2 `[rows, in]` @ weight `[out, in]`ᵀ → `[rows, out]` (contiguous) by `formulation`;
    `weight_copy`: the `[in, out]` contiguous copy ("x_wcopy" only)."""
    if formulation == "w_xt":
        return torch.mm(weight, x2.t()).t().contiguous()
    if formulation == "x_wcopy" and weight_copy is not None:
        return torch.mm(x2, weight_copy)
    return torch.mm(x2, weight.t())


@dataclass(frozen=True)
class RowPlan:
    """A measured choice per row bucket (`by_bucket[i]` serves `ROW_BUCKETS[i]` rows and up to the
    next bucket): a GEMM formulation per weight shape, or an MoE layer's expert formulation per
    token count (`model.moe`). `needs_copy`: some bucket runs "x_wcopy"."""

    by_bucket: tuple[str, ...] = (DEFAULT,) * len(ROW_BUCKETS)

    def for_rows(self, rows: int) -> str:
        bucket = 0
        for i, first in enumerate(ROW_BUCKETS):  # a plain loop: torch.compile traces it (not bisect)
            if rows >= first:
                bucket = i
        return self.by_bucket[bucket]

    @property
    def needs_copy(self) -> bool:
        return "x_wcopy" in self.by_bucket


DEFAULT_PLAN = RowPlan()

Timer = Callable[[tuple[str, ...], int, int, int], dict[str, float]]
"""timer(formulations, rows, out, in) → {formulation: seconds per call} (injectable for tests)."""
ChoiceTimer = Callable[[tuple[str, ...], int], dict[str, float]]
"""timer(candidates, rows) → {candidate: seconds per call}: any per-row-count choice (`GemmTuner.choose`)."""


def measure_enabled() -> bool:
    """Measuring is on unless `SPECDEC_TUNE=0` (then every layer keeps the default formulation)."""
    return os.environ.get("SPECDEC_TUNE", "1") != "0"


def interleaved_seconds(calls: dict[str, Callable[[], object]], budget_s: float = 1e-3,
                        rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of each candidate: each is warmed up, then `rounds` rounds each time
    every candidate in turn over about `budget_s`, so a machine that slows down mid-measurement
    slows every candidate alike."""
    n_calls = {}
    for name, call in calls.items():
        call()
        t0 = time.perf_counter()
        call()
        n_calls[name] = max(1, min(200, int(budget_s / max(time.perf_counter() - t0, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(n_calls[name]):
                call()
            times[name].append((time.perf_counter() - t0) / n_calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def blas_timer(dtype: torch.dtype, budget_s: float = 1e-3, rounds: int = 3) -> Timer:
    """A timer that runs the formulations on random operands in interleaved rounds (each round
    times every candidate over about `budget_s`), so a machine that slows down mid-measurement
    slows every candidate alike; returns each one's median over the rounds."""
    operands: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def timer(formulations: tuple[str, ...], rows: int, out: int, inp: int) -> dict[str, float]:
        if (out, inp) not in operands:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(out, inp, generator=g).to(dtype)
            operands[(out, inp)] = (w, w.t().contiguous())
        w, w_copy = operands[(out, inp)]
        x = torch.randn(rows, inp).to(dtype)
        return interleaved_seconds({f: (lambda f=f: gemm(x, w, w_copy, f)) for f in formulations}, budget_s, rounds)

    return timer


class GemmTuner:
    """Chooses a `RowPlan` per weight shape by timing, and keeps the verdicts on disk.

    `measure=False` (or `SPECDEC_TUNE=0`): every plan is the default, nothing is timed or written.
    `timer` replaces the BLAS timer (tests control the timings through it). Verdicts live in
    `cache_path` under `machine_key(dtype)`; `refresh=True` re-times shapes already cached.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, measure: bool | None = None,
                 timer: Timer | None = None, cache_path: Path | None = None, refresh: bool = False) -> None:
        self.dtype = dtype
        self.measure = measure_enabled() if measure is None else measure
        self.timer = timer or blas_timer(dtype)
        self.cache_path = cache_path if cache_path is not None else cache_dir() / "gemm_plans.json"
        self.refresh = refresh
        self.key = machine_key(dtype)
        self.entries: dict[str, dict] = {} if refresh else self._load().get(self.key, {})
        self.dirty = False

    def plan(self, out: int, inp: int, allow_copy: bool = False) -> RowPlan:
        """The GEMM plan for an `[out, in]` weight (timed now unless cached)."""
        candidates = tuple(f for f in FORMULATIONS if allow_copy or f != "x_wcopy")
        return self.choose(f"{out}x{inp}" + ("+copy" if allow_copy else ""), candidates, DEFAULT,
                           lambda cands, rows: self.timer(cands, rows, out, inp))

    def choose(self, name: str, candidates: tuple[str, ...], default: str, timer: ChoiceTimer) -> RowPlan:
        """A plan for choice `name` (timed by `timer` per row bucket unless cached): per bucket the
        fastest candidate, or `default` unless another beats it by `MIN_GAIN`. Measuring off: all
        `default`."""
        if not self.measure:
            return RowPlan((default,) * len(ROW_BUCKETS))
        entry = self.entries.get(name)
        if entry is None or len(entry.get("plan", ())) != len(ROW_BUCKETS):
            plan, timings = [], {}
            for rows in ROW_BUCKETS:
                t = timer(candidates, rows)
                best = min(t, key=t.get)
                plan.append(best if t[best] < t[default] * (1 - MIN_GAIN) else default)
                timings[str(rows)] = {f: round(s * 1e6, 2) for f, s in t.items()}  # µs
            entry = self.entries[name] = {"plan": plan, "us": timings}
            self.dirty = True
        return RowPlan(tuple(entry["plan"]))

    def timings(self) -> dict[str, dict]:
        """{shape name: {"plan": [...], "us": {rows: {formulation: µs}}}} for what this tuner knows."""
        return dict(self.entries)

    def save(self) -> None:
        """Write new verdicts to the cache file (atomically); a read-only cache dir is not an error."""
        if not (self.measure and self.dirty):
            return
        data = self._load()
        data[self.key] = {**data.get(self.key, {}), **self.entries}
        data["version"] = CACHE_VERSION
        self.dirty = not write_json(self.cache_path, data)

    def _load(self) -> dict:
        data = read_json(self.cache_path)
        return data if data.get("version") == CACHE_VERSION else {}
