"""Decoding steps captured as CUDA graphs and replayed (`--cuda-graphs`).

A decoding step of the 671B verifier launches thousands of kernels (61 layers of attention, MoE
routing and grouped expert GEMMs, sampling, acceptance, commit); at small batch their launch cost
exceeds their work. `specdec.steps.decode_step` reads nothing back to the host and takes every
random number as an input (its tests compile each mode with `fullgraph=True`), so one step can be
captured once and replayed: one launch per step.

What a captured step is. A graph replays fixed kernels on fixed memory, so each capture is keyed by
everything that sets its shapes and pointers: the row bucket (`specdec.compiled.row_bucket` of the
pool's rows: a batch whose rows finish replays at most log2(B) + 1 buckets), the span (the slots
attention covers: the decoder asks for `span_bucket` of what it needs, a power of two, so a long
generation crosses few spans), the `StepShape` (depth, chain/tree, sampling mix) and the pool
(its tensors' addresses: a pool reallocated by `Engine.cache_for` drops every capture over the old
one). The per-row inputs (`StepRows`) and, for a paged pool, the block table are copied into the
capture's static buffers before each replay (padding rows: length 0, greedy, a zero block table,
so their writes land on their own free rows' first slots or on the paged pool's null block); the
outputs are cloned out of the capture's static outputs, since a later replay overwrites them
while the decoder still holds, for instance, the verifier states of past plain steps.

Capturing. `capture_cuda_graph` runs the step once on a side stream (kernels compile and
allocate there; the run's cache writes are the very ones the replay makes next: a step writes only
slots at or past each row's committed length and computes from slots below it and what it wrote),
then captures it into a graph that shares one memory pool with the others. Under torchrun each
rank captures its own graphs; the collectives inside (NCCL all-reduce) are captured with them.

What the CPU proves. `GraphedSteps` takes the capture function as an argument: the tests give it
`capture_by_rerun`, whose replay reruns the step over the same static buffers and copies into
the same static outputs, so the buffer discipline (copy in, pad, replay, clone out, recapture
on a new pool) is checked token for token against eager decoding. Whether every kernel of a step
is capturable (no host sync, no host tensor made mid-step) only a GPU shows: `bench/gpu_check.sh`
decodes with `--cuda-graphs` against eager decoding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from specdec.compiled import bucket_table, cut_result, pad_step_rows, row_bucket
from specdec.steps import StepCache, StepResult, StepRows, StepShape, decode_step

SPAN_MIN = 64
"""The smallest span (slots) a captured step covers; larger ones are powers of two."""

Capture = Callable[[Callable[[], StepResult]], tuple[Callable[[], None], StepResult]]
"""Takes a step closure over static buffers; returns (replay, the static outputs replay refreshes)."""


def span_bucket(n_slots: int) -> int:
    """The span a captured step covers for `n_slots` needed slots: the next power of two, at least
    `SPAN_MIN` (the pool's own size caps it: `step_view`)."""
    return max(SPAN_MIN, 1 << max(n_slots - 1, 0).bit_length())


def capture_cuda_graph(step: Callable[[], StepResult], pool=None) -> tuple[Callable[[], None], StepResult]:
    """Warm `step` up on a side stream, then capture it into a `torch.cuda.CUDAGraph` (memory from
    `pool`, a `torch.cuda.graph_pool_handle()` shared by all captures). Returns (graph.replay, the
    outputs the graph writes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = step()
    return graph.replay, outputs


def capture_by_rerun(step: Callable[[], StepResult]) -> tuple[Callable[[], None], StepResult]:
    """The CPU's stand-in for `capture_cuda_graph` (tests): outputs from one run, and a replay that
    reruns `step` over the same static inputs and copies its results into those outputs, as a graph
    rewrites its outputs in place (outputs of its own: a step may return broadcast views)."""
    outputs = cut_result(step(), None, copy=True)

    def replay() -> None:
        for old, new in zip(_tensors(outputs), _tensors(step())):
            old.copy_(new)

    return replay, outputs


def _tensors(result: StepResult) -> list[torch.Tensor]:
    """A step result's tensors in a fixed order (a draft tree's included; Nones skipped)."""
    out = []
    for x in result:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif x is not None:
            out += x.tensors()
    return out


class _Captured(NamedTuple):
    rows: StepRows  # static per-row inputs, padded to the bucket
    table: torch.Tensor | None  # static block table (paged pools)
    replay: Callable[[], None]
    outputs: StepResult


class GraphedSteps:
    """`decode_step` captured per (row bucket, span, `StepShape`, pool) and replayed.

    Args:
        model / drafter: the loaded verifier and MTP drafter (or None).
        capture: `capture_cuda_graph` (the default, on CUDA) or `capture_by_rerun` (tests).
    """

    def __init__(self, model, drafter, capture: Capture | None = None) -> None:
        self.model, self.drafter = model, drafter
        self._pool = torch.cuda.graph_pool_handle() if capture is None else None
        self.capture = capture or (lambda step: capture_cuda_graph(step, self._pool))
        self._graphs: dict[tuple, _Captured] = {}
        self._pool_key: tuple | None = None
        self.captures = 0  # graphs captured so far (every pool)

    @property
    def held(self) -> int:
        """Captures held now (those over the current pool)."""
        return len(self._graphs)

    @staticmethod
    def span(n_slots: int) -> int:
        """The span a step that needs `n_slots` slots is given (`span_bucket`)."""
        return span_bucket(n_slots)

    def step(self, cache: StepCache, rows: StepRows, shape: StepShape) -> StepResult:
        """One step over `cache` (a dense pool's view or a paged pool) and `rows`: replayed from
        the capture for its bucket, span and shape (captured on first use)."""
        batch = rows.lengths.shape[0]
        paged = cache.block_table is not None
        bucket = row_bucket(batch, cache.block_table.shape[0] if paged else cache.kv.shape[1])
        pool_key = (cache.kv.data_ptr(), cache.pe.data_ptr(), tuple(cache.kv.shape) if paged else cache.kv.shape[1])
        if pool_key != self._pool_key:  # a new pool: captures over the old one point at freed memory
            self._graphs.clear()
            self._pool_key = pool_key
            if self._pool is not None:  # their private memory pool died with them: captures need a new one
                self._pool = torch.cuda.graph_pool_handle()  # (reusing its handle failed an allocator assert)
        key = (bucket, cache.n_slots, shape)
        captured = self._graphs.get(key)
        padded = pad_step_rows(rows, bucket)
        table = bucket_table(cache.block_table, batch, bucket) if paged else None
        if captured is None:
            captured = self._graphs[key] = self._capture(cache, padded, table, bucket, shape)
        for static, x in zip(captured.rows, padded):
            if static is not None:
                static.copy_(x)
        if table is not None:
            captured.table.copy_(table)
        captured.replay()
        return cut_result(captured.outputs, batch, copy=True)

    def _capture(self, cache: StepCache, rows: StepRows, table: torch.Tensor | None, bucket: int,
                 shape: StepShape) -> _Captured:
        """Capture the step over static copies of `rows` and `table` (the pool's tensors as they are)."""
        static_rows = StepRows(*(None if t is None else t.clone() for t in rows))
        static_table = None if table is None else table.clone()
        if table is None:
            view = StepCache(cache.kv[:, :bucket], cache.pe[:, :bucket], None, cache.n_slots)
        else:
            view = StepCache(cache.kv, cache.pe, static_table, cache.n_slots)
        replay, outputs = self.capture(lambda: decode_step(self.model, self.drafter, view, static_rows, shape))
        self.captures += 1
        return _Captured(static_rows, static_table, replay, outputs)
