"""Pure functions over `GenerationStats`: pooling several calls, conditional acceptance, percentiles,
output comparison. No model, no timing: unit-tested directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def conditional_acceptance(unconditional: Sequence[float]) -> list[float | None]:
    """cond[i] = P(draft i+1 accepted | drafts 1..i accepted) = uncond[i] / uncond[i-1]; cond[0] = uncond[0].

    `unconditional[i]` is the share of row-steps whose first i+1 drafts were all accepted. Where the
    previous position was never reached (uncond[i-1] == 0) the conditional rate is undefined: None.
    """
    out: list[float | None] = []
    for i, u in enumerate(unconditional):
        if i == 0:
            out.append(float(u))
        else:
            prev = unconditional[i - 1]
            out.append(float(u) / prev if prev > 0 else None)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation between order statistics); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _get(stats: Any, name: str):
    return stats[name] if isinstance(stats, dict) else getattr(stats, name)


def _has(stats: Any, name: str) -> bool:
    return name in stats if isinstance(stats, dict) else hasattr(stats, name)


def pool(stats_list: Sequence[Any]) -> dict:
    """Several generate calls' statistics as one.

    Sums: tokens, wall/prefill/decode seconds, row-steps, verify steps; tokens/s over the wall and
    over the decode seconds. Rates per row-step (tau, acceptance per position, draft acceptance
    rate) are averaged weighting each call by its row_steps, i.e. pooled over all row-steps of all
    prompts. Latency samples are concatenated
    (tpot_s) or listed per call (ttft_s). Plain calls (no acceptance) get tau 1. depth_steps: steps
    per draft depth summed over calls (adaptive runs; [] for plain); rows_steps: steps per draft
    depth and live rows, [d][r], summed over calls.
    """
    if not stats_list:
        raise ValueError("pool() needs at least one GenerationStats")
    steps = sum(_get(s, "row_steps") for s in stats_list)
    depth = max(len(_get(s, "acceptance_per_position")) for s in stats_list)
    tokens = sum(_get(s, "tokens") for s in stats_list)
    wall = sum(_get(s, "wall_s") for s in stats_list)
    decode = sum(_get(s, "decode_s") for s in stats_list)

    def weighted(value) -> float:
        return sum(value(s) * _get(s, "row_steps") for s in stats_list) / steps if steps else 0.0

    if depth == 0:
        tau, unconditional, rate = 1.0, [], None
    else:
        tau = weighted(lambda s: _get(s, "tau"))
        unconditional = [weighted(lambda s, i=i: (_get(s, "acceptance_per_position") + [0.0] * depth)[i])
                         for i in range(depth)]
        rate = weighted(lambda s: _get(s, "draft_acceptance_rate"))
    tpot = [t for s in stats_list for t in _get(s, "tpot_s")]
    ttft = [_get(s, "ttft_s") for s in stats_list]
    depth_lists = [list(_get(s, "depth_steps")) if _has(s, "depth_steps") else [] for s in stats_list]
    depth_steps = [sum(d[i] for d in depth_lists if i < len(d)) for i in range(max(map(len, depth_lists)))]
    rows_steps: list[list[int]] = []
    for s in stats_list:
        for d, by_rows in enumerate(_get(s, "rows_steps") if _has(s, "rows_steps") else []):
            rows_steps += [[] for _ in range(d + 1 - len(rows_steps))]
            rows_steps[d] += [0] * (len(by_rows) - len(rows_steps[d]))
            for r, n in enumerate(by_rows):
                rows_steps[d][r] += n
    return {
        "calls": len(stats_list),
        "tokens": tokens,
        "wall_s": wall,
        "prefill_s": sum(_get(s, "prefill_s") for s in stats_list),
        "decode_s": decode,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "decode_tokens_per_s": tokens / decode if decode > 0 else 0.0,
        "verify_steps": sum(_get(s, "verify_steps") for s in stats_list),
        "row_steps": steps,
        "tau": tau,
        "acceptance_unconditional": unconditional,
        "acceptance_conditional": conditional_acceptance(unconditional),
        "draft_acceptance_rate": rate,
        "ttft_mean_ms": 1e3 * sum(ttft) / len(ttft),
        "tpot_p50_ms": None if not tpot else 1e3 * percentile(tpot, 50),
        "tpot_p90_ms": None if not tpot else 1e3 * percentile(tpot, 90),
        "tpot_samples": len(tpot),
        "depth_steps": depth_steps,
        "rows_steps": rows_steps,
    }


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_outputs(got: Sequence[Sequence[int]], want: Sequence[Sequence[int]]) -> dict:
    """How close `got` is to the reference `want`, row by row.

    identical_rows: rows equal token for token; identical_token_share: tokens before each row's
    first divergence over the reference's tokens (what survives once outputs part ways);
    first_mismatch: (row, token index) of the first difference, or None.
    """
    if len(got) != len(want):
        raise ValueError(f"{len(got)} rows against {len(want)} reference rows")
    same = sum(list(g) == list(w) for g, w in zip(got, want))
    ref_tokens = sum(len(w) for w in want)
    prefix = sum(common_prefix(g, w) if list(g) != list(w) else len(w) for g, w in zip(got, want))
    first = next(((r, common_prefix(g, w)) for r, (g, w) in enumerate(zip(got, want)) if list(g) != list(w)), None)
    return {
        "equal": same == len(want),
        "identical_rows": same,
        "rows": len(want),
        "identical_token_share": prefix / ref_tokens if ref_tokens else 1.0,
        "first_mismatch": first,
    }
