"""`--tree auto`: choose the draft shape (depth, topk, nodes) from measurements on this machine and model.

Two measurements, both on the caller's own prompts and batch size:

1. Acceptance by depth and sibling rank: a short calibration run with a wide tree records, at each
   depth d of every step, whether the verifier's token was the drafter's r-th ranked child of the
   last accepted node. From it, P_d(k) = share of steps reaching depth d whose token is among the
   top-k children, and the expected tokens per step of a (K, k) shape:
   τ(K, k) = 1 + Σ_{d ≤ K} Π_{j ≤ d} P_j(k).
2. Cost: the measured seconds of one verifier forward over N+1 tokens for each candidate N, of one
   MTP forward over E frontier nodes, and of the MTP refresh, plus the per-step work outside the
   forwards (acceptance, compaction, masks, bookkeeping), measured as what a real depth-1 step
   costs beyond its two forwards. The baseline is a real plain decode step (forward + loop).

The chosen shape maximises the predicted speedup τ / (step cost / plain step cost), with
nodes = topk × depth (the default tree budget); the report lists the best candidates and why.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from specdec.config import SpecConfig
from specdec.speculative import SpeculativeDecoder
from specdec.steps import StepResult
from specdec.tree import ancestor_matrix, tree_attention_mask, visible_slots

MAX_DEPTH = 5
MAX_TOPK = 4
CALIBRATION_TOKENS = 32


class _RankRecorder:
    """A decoder's step observer (`SpeculativeDecoder.observer`) that records, at each depth, how
    often it was reached and the sibling rank of the node accepted there."""

    def __init__(self, depth: int, topk: int) -> None:
        self.depth = depth
        self.reached = [0] * depth
        self.hits = [[0] * topk for _ in range(depth)]

    def __call__(self, result: StepResult) -> None:
        if result.tree is None:
            return
        children = result.tree.children()
        for b, (path, n) in enumerate(zip(result.path.tolist(), result.n_accepted.tolist())):
            node = 0
            for d in range(self.depth):
                if not children[b][node]:
                    break  # this node was not expanded: depth d+1 is not reached
                self.reached[d] += 1
                if d >= n:
                    break
                child = path[d]
                self.hits[d][children[b][node].index(child)] += 1
                node = child


@dataclass
class TreeChoice:
    """The chosen shape, its prediction, and a printable account of the candidates."""

    depth: int
    topk: int
    nodes: int
    predicted_tau: float
    predicted_speedup: float
    report: str


def _median_seconds(fn, repeats: int = 3) -> float:
    """Median wall seconds of `fn()`; a CUDA result is waited for (kernels launch asynchronously)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        finished(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def finished(result) -> None:
    """Wait until the device work behind `result` (a tensor, or a tuple holding tensors) is done."""
    tensors = [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize(tensors[0].device)


def _verify_seconds(engine, lengths: torch.Tensor, width: int) -> float:
    """Seconds of one verifier forward over `width` tokens per row (a chain-shaped tree; cost ≈ shape-independent)."""
    batch = lengths.shape[0]
    cache = engine.latent_cache
    tokens = torch.zeros(batch, width, dtype=torch.long, device=lengths.device)
    pos = lengths.unsqueeze(1) + torch.arange(width, device=lengths.device)
    parents = torch.arange(width - 1, device=lengths.device).expand(batch, -1)
    mask = tree_attention_mask(lengths, ancestor_matrix(parents), int(lengths.max()) + width)
    with torch.inference_mode():
        return _median_seconds(lambda: engine.model(tokens, pos, cache.kv[:, :batch], cache.pe[:, :batch], pos, mask))


def _mtp_seconds(engine, lengths: torch.Tensor, width: int) -> float:
    """Seconds of one MTP forward over `width` tokens per row."""
    batch = lengths.shape[0]
    cache = engine.latent_cache
    tokens = torch.zeros(batch, width, dtype=torch.long, device=lengths.device)
    hidden = torch.zeros(batch, width, engine.args.dim, dtype=engine.model.dtype, device=lengths.device)
    pos = lengths.unsqueeze(1) + torch.arange(width, device=lengths.device)
    mask = visible_slots(lengths, width, int(lengths.max()) + width)
    with torch.inference_mode():
        return _median_seconds(lambda: engine.drafter(tokens, hidden, pos, cache.kv[:, :batch], cache.pe[:, :batch],
                                                      pos, mask))


def _loop_costs(engine, ids: list[list[int]], depth1_forwards: float) -> tuple[float, float]:
    """(seconds of a real plain decode step, seconds a real depth-1 speculative step spends outside
    its verifier and MTP forwards `depth1_forwards`), from short generate calls on `ids`."""

    def per_step(spec) -> float:
        engine.generate(ids, max_new_tokens=4, spec=spec)  # warm-up
        runs = [engine.generate(ids, max_new_tokens=CALIBRATION_TOKENS // 2, spec=spec).stats for _ in range(3)]
        return statistics.median(r.decode_s / max(r.verify_steps, 1) for r in runs)

    return per_step(None), max(per_step(SpecConfig(depth=1, adaptive=False)) - depth1_forwards, 0.0)


def choose_tree(engine, ids: list[list[int]], temperature: float, top_p: float, seed: int,
                draft_mode: str = "onehot") -> TreeChoice:
    """Calibrate on `ids` and return the shape with the best predicted speedup."""

    wide = SpecConfig(depth=MAX_DEPTH, topk=MAX_TOPK, nodes=MAX_TOPK * MAX_DEPTH, draft_mode=draft_mode)
    recorder = _RankRecorder(wide.depth, wide.topk)
    decoder = SpeculativeDecoder(engine, wide, temperature, top_p, seed)
    decoder.observer = recorder
    engine.schedule(decoder, ids, CALIBRATION_TOKENS)
    lengths = torch.tensor([len(p) for p in ids], device=engine.device)
    engine.cache_for(len(ids), int(lengths.max()) + MAX_TOPK * MAX_DEPTH + 2)

    verify = {n: _verify_seconds(engine, lengths, n + 1) for n in
              sorted({k * d for k in range(1, MAX_TOPK + 1) for d in range(1, MAX_DEPTH + 1)} | {0})}
    mtp = {w: _mtp_seconds(engine, lengths, w) for w in sorted({1, *range(1, MAX_TOPK + 1), *range(2, MAX_DEPTH + 2)})}
    plain_step, bookkeeping = _loop_costs(engine, ids, verify[1] + mtp[2])

    candidates = []
    for k in range(1, MAX_TOPK + 1):
        p = [sum(engine_hits[:k]) / max(reached, 1) for engine_hits, reached in zip(recorder.hits, recorder.reached)]
        for depth in range(1, MAX_DEPTH + 1):
            tau, run = 1.0, 1.0
            for d in range(depth):
                run *= p[d]
                tau += run
            nodes = k * depth
            cost = verify[nodes] + (depth - 1) * mtp[k] + mtp[depth + 1] + bookkeeping  # + expansions, refresh
            candidates.append((tau * plain_step / cost, tau, depth, k, nodes, cost))
    candidates.sort(reverse=True)
    best = candidates[0]
    lines = [f"tree auto: calibrated on {len(ids)} prompt(s), {sum(recorder.reached[:1])} steps; "
             f"plain step {plain_step * 1e3:.1f} ms; per-step work outside the forwards {bookkeeping * 1e3:.1f} ms",
             "  P(depth d accepted | reached, top-k children), k = 1..4: " + "; ".join(
                 f"d{d + 1}: " + " ".join(f"{sum(h[:k]) / max(r, 1):.2f}" for k in range(1, MAX_TOPK + 1))
                 for d, (h, r) in enumerate(zip(recorder.hits, recorder.reached))),
             "  best shapes (depth, topk, nodes): predicted tau, step ms, predicted speedup:"]
    lines += [f"    ({d}, {k}, {n}): tau {t:.2f}, step {c * 1e3:.1f} ms, speedup {s:.2f}x"
              for s, t, d, k, n, c in candidates[:5]]
    lines.append(f"  chosen: depth {best[2]}, topk {best[3]}, nodes {best[4]} (highest predicted speedup)")
    if best[0] < 1.0:
        lines.append(f"  note: no draft shape is predicted to beat plain decoding here (best {best[0]:.2f}x); "
                     "the drafter rarely agrees with the verifier on these prompts")
    choice = TreeChoice(best[2], best[3], best[4], best[1], best[0], "\n".join(lines))
    if engine.ctx.world_size > 1:  # timings differ per rank: rank 0 decides for everyone
        import torch.distributed as dist

        box = [choice]
        dist.broadcast_object_list(box, src=0, group=engine.ctx.group)
        choice = box[0]
    return choice
