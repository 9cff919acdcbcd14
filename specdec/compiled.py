"""Decoding steps and forwards compiled with `torch.compile` (inductor, CPU, one process): `--compile`.

Every decoding step runs a few small forwards (plain decode: the verifier on one token per row;
speculative: drafter steps, one verify over the draft, one MTP commit). On the CPU an eager forward
of the embedded model is ~2,800 dispatched ops, more time than its GEMMs. Compiled, each forward
is one C++ function: fused elementwise kernels, GEMMs on weights prepacked at compile time.

Shapes. Inductor specialises a graph on the number of rows and tokens of a call; the cache length
(and the pool's slot count) stay dynamic. So that retiring finished rows does not compile a new
graph each time, a forward's per-row inputs are padded to every row of the cache pool: rows past
the batch are free (the engine keeps live rows in a prefix and sizes the pool to the call's
batch), padded rows attend to nothing and write only their own row's slot 0. Prefill-sized calls
(more than `max_tokens` tokens per row) run eagerly; the compiled forwards serve shorter prefills
and the MTP catch-up.

Inductor settings (measured on the embedded model, batch 1, one decode forward, 2-core CPU: eager
8.1 ms; compiled 6.1 ms with defaults, 4.4 ms with freezing and no module guards, 2.7–3.9 ms
adding max-autotune GEMMs and the C++ wrapper): `freezing` (weights become constants, prepacked),
`max_autotune` (inductor's C++ GEMM templates benchmarked against aten), `cpp_wrapper`, and no
guards on module attributes (weights never change after loading). First use of a shape compiles
for ~30–90 s on 2 cores; inductor's on-disk caches make later processes faster.

One module, its own graphs. Dynamo keeps compiled graphs per code object, for the whole process,
and without module guards nothing tells two modules of one class apart: a second compiled engine
ran the first one's graphs, constants included (measured: an engine whose checkpoint differed only
in `routed_scaling_factor` decoded the first engine's tokens). So each compiled module is wrapped
with a process-unique key that every call passes as an argument, which dynamo does guard on.

Whole steps. Decoding steps compile whole instead (`step`: `specdec.steps.decode_step`, the one
step function of every loop: forwards, masks, sampling, acceptance and commit in one graph per
row bucket and `StepShape`). This removes the host-side glue between the forwards, which cost
about as much as a drafter forward once those were compiled. Rows: a step runs over a bucket of
the pool's first rows (the live rows are a prefix): the pool's rows, halved while the live rows
fit in half (`row_bucket`), so a batch whose rows finish runs at most log2(B) + 1 shapes; the rows
past the live ones ride along as padding (length 0, greedy), writing only the first slots of their
own free rows, which a prefill overwrites before anyone reads them. The separate forwards above
serve the prefill (eagerly, beyond `max_tokens`) and the MTP catch-up.

Paged pools (the server's loop, `specdec.scheduler`) compile the same step (`_PagedStep`): rows
padded to a bucket of the pool's rows, whose padding rows get an all-zero block table (their
writes land on the null block), and the span handed over in whole blocks as a dynamic dimension.

Not covered: several ranks (collectives inside graphs), CUDA (there, `specdec.graphs` replays
the eager step from CUDA graphs), FP8 weights kept in FP8 — `check_compile_supported` refuses them.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from specdec.model.errors import ConfigError
from specdec.model.parallel import ParallelContext
from specdec.model.transformer import ForwardOutput, Transformer
from specdec.mtp.drafter import MTPDrafter, MTPOutput
from specdec.steps import StepCache, StepResult, StepRows, StepShape, decode_step

RECOMPILE_LIMIT = 256
"""Graphs before torch falls back to eager, for all compiled forwards of all engines together (they
share `_Keyed.forward`): each engine, forward and (rows, tokens) shape or step setting is one graph."""


def inductor_options() -> dict:
    """The `torch.compile(options=...)` used for both forwards (see the module docstring)."""
    return {
        "freezing": True,
        "max_autotune": True,
        "cpp_wrapper": True,
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    }


_MODULE_KEYS = itertools.count()
"""Process-unique keys of compiled modules (see "One module, its own graphs" above)."""


class _Keyed(nn.Module):
    """`module`'s forward behind a leading `key` int argument (its own `key`), so graphs are cached
    per module. Dynamo guards only on values the trace reads, hence the comparison."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.key = module, next(_MODULE_KEYS)

    def forward(self, key: int, *args):
        if key != self.key:
            raise RuntimeError(f"compiled module {self.key} called with key {key}")
        return self.module(*args)


def check_compile_supported(model: Transformer, ctx: ParallelContext, device: torch.device) -> None:
    """Raise ConfigError (naming the reason) when the compiled decode path cannot serve this engine."""
    if device.type != "cpu":
        raise ConfigError(f"--compile covers the CPU path only (this engine runs on {device})")
    if ctx.world_size > 1:
        raise ConfigError(f"--compile needs one process (world size is {ctx.world_size})")
    if model.fp8_block is not None:
        raise ConfigError("--compile needs unquantised weights (the checkpoint's FP8 weights were kept in FP8)")


def row_bucket(n_live: int, n_rows: int) -> int:
    """The pool rows a step over `n_live` live rows runs on: `n_rows` halved while the live rows fit
    in half (8 rows, 3 live → 4; 1 live → 1).

    Measured on the embedded model (2-core CPU, compiled, batch 8, 16 held-out prompts, 64 new
    tokens): a 3-chain batch ran 26.5 steps where its rows needed 21 on average, finished rows
    riding along in the last steps."""
    while n_rows > 1 and n_live <= n_rows // 2:
        n_rows //= 2
    return n_rows


class _WholeStep(nn.Module):
    """`decode_step` over a dense pool view, as one module to compile (its shape argument static)."""

    def __init__(self, model: Transformer, drafter: MTPDrafter | None) -> None:
        super().__init__()
        self.model, self.drafter = model, drafter

    def forward(self, kv: torch.Tensor, pe: torch.Tensor, rows: StepRows, shape: StepShape) -> StepResult:
        return decode_step(self.model, self.drafter, StepCache(kv, pe, None, kv.shape[2]), rows, shape)


class _PagedStep(nn.Module):
    """`decode_step` over a paged pool, as one module to compile. The span is whole blocks: their
    number arrives as the length of `span_blocks` `[n]`, a dimension the graph keeps dynamic (an
    int argument would be specialised, one graph per span; a span in slots would be specialised on
    its remainder modulo the block size)."""

    def __init__(self, model: Transformer, drafter: MTPDrafter | None) -> None:
        super().__init__()
        self.model, self.drafter = model, drafter

    def forward(self, kv: torch.Tensor, pe: torch.Tensor, block_table: torch.Tensor, span_blocks: torch.Tensor,
                rows: StepRows, shape: StepShape) -> StepResult:
        cache = StepCache(kv, pe, block_table, span_blocks.shape[0] * kv.shape[2])
        return decode_step(self.model, self.drafter, cache, rows, shape)


def _pad_rows(x: torch.Tensor | None, rows: int, value: float = 0) -> torch.Tensor | None:
    """`x` `[B, ...]` padded with `value` (zeros: False for bool) to `[rows, ...]`; a copy even when
    B = rows, so that a compiled graph always sees tensors made alike (an inference-mode tensor
    and a view of one made outside it differ in their guards: a recompile)."""
    if x is None:
        return x
    if x.shape[0] == rows:
        return x.clone()
    pad = torch.full((rows - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def pad_step_rows(rows: StepRows, bucket: int) -> StepRows:
    """A step's per-row inputs padded to `bucket` rows (copies): padding rows have length 0, token
    0, temperature 0 (greedy), top-p 1 and race noise 1."""
    return StepRows(*(_pad_rows(t, bucket, 1.0 if name in ("top_p", "draws") else 0)
                      for name, t in zip(rows._fields, rows)))


def bucket_table(block_table: torch.Tensor, batch: int, bucket: int) -> torch.Tensor:
    """A paged pool's table for a step over `bucket` rows (a new tensor `[bucket, max_blocks]`):
    the first `batch` rows' entries, zeros (the null block) for the padding rows, whatever the
    pool's rows past the batch hold (one may be a long prompt being prefilled in chunks)."""
    table = block_table.new_zeros(bucket, block_table.shape[1])
    table[:batch] = block_table[:batch]
    return table


def cut_result(result: StepResult, batch: int | None, copy: bool = False) -> StepResult:
    """A padded step's result cut back to its first `batch` rows (None: all); `copy`: as new
    tensors (for outputs a later call overwrites)."""
    cut = (lambda t: t[:batch].clone()) if copy else (lambda t: t[:batch])
    return StepResult(*(None if x is None else cut(x) if isinstance(x, torch.Tensor) else x.map(cut)
                        for x in result))


class CompiledDecode:
    """Drop-in callables for the verifier's and the drafter's forward (same signatures), compiled
    for decode-sized calls.

    Args:
        model: the loaded verifier (CPU, one process, unquantised).
        drafter: its MTP drafter, or None.
        max_tokens: calls with more tokens per row than this (prefill) run eagerly.
    """

    def __init__(self, model: Transformer, drafter: MTPDrafter | None, max_tokens: int = 64) -> None:
        self.model, self.drafter, self.max_tokens = model, drafter, max_tokens
        self._model = _compile(model)
        self._drafter = _compile(drafter) if drafter else None
        self._step = _compile(_WholeStep(model, drafter))
        self._paged_step = _compile(_PagedStep(model, drafter))
        self._spans = torch.empty(0)  # paged spans in blocks are lengths of its prefixes (`step`)

    def step(self, cache: StepCache, rows: StepRows, shape: StepShape) -> StepResult:
        """`decode_step`, compiled, over a dense pool's view (`LatentCache.step_view`) or a paged
        pool (`PagedLatentCache.step_view`): the rows are padded to their bucket (`row_bucket` of the
        pool's rows) and the result cut back to them.

        Padding rows have length 0 and write their first slots: in a dense pool those of their own
        free rows, which a prefill overwrites before anyone reads them; in a paged pool the null
        block (`bucket_table`)."""
        batch = rows.lengths.shape[0]
        paged = cache.block_table is not None
        bucket = row_bucket(batch, cache.block_table.shape[0] if paged else cache.kv.shape[1])
        if not paged:
            kv, pe = cache.kv[:, :bucket], cache.pe[:, :bucket]
            out = self._call(self._step, None, kv, pe, kv, pe, pad_step_rows(rows, bucket), shape)
        else:
            max_blocks = cache.block_table.shape[1]
            table = bucket_table(cache.block_table, batch, bucket)
            # whole blocks, at least two (one would be specialised: a graph of its own)
            n_blocks = min(max(2, -(-cache.n_slots // cache.kv.shape[2])), max_blocks)
            if self._spans.shape[0] <= max_blocks:  # spans are strict prefixes of one buffer: one graph
                self._spans = torch.empty(max_blocks + 1)
            span_blocks = self._spans[:n_blocks]
            torch._dynamo.mark_dynamic(span_blocks, 0)
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                              accumulated_recompile_limit=RECOMPILE_LIMIT):
                out = self._paged_step(self._paged_step.key, cache.kv, cache.pe, table, span_blocks,
                                       pad_step_rows(rows, bucket), shape)
        return cut_result(out, batch)

    @property
    def compilations(self) -> int:
        """Graphs dynamo has compiled in this process (every engine, every reason: a new shape, a
        failed guard); a call during which it grew compiled."""
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def verifier(self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 pe_cache: torch.Tensor, write_slots: torch.Tensor, attn_mask: torch.Tensor,
                 logits_at: torch.Tensor | None = None, block_table: torch.Tensor | None = None) -> ForwardOutput:
        """`Transformer.forward`; `kv_cache`/`pe_cache` are the whole pool (its rows set the padding).
        Prefill-sized calls and paged pools (`block_table`) run eagerly."""
        if tokens.shape[1] > self.max_tokens or block_table is not None:
            return self.model(tokens, positions, kv_cache, pe_cache, write_slots, attn_mask, logits_at, block_table)
        batch, rows = tokens.shape[0], kv_cache.shape[1]
        padded = [_pad_rows(t, rows) for t in (tokens, positions, write_slots, attn_mask, logits_at)]
        tokens_p, positions_p, slots_p, mask_p, logits_at_p = padded
        out = self._call(self._model, mask_p, kv_cache, pe_cache,
                         tokens_p, positions_p, kv_cache, pe_cache, slots_p, mask_p, logits_at_p)
        return ForwardOutput(*(t[:batch] for t in out))

    def draft(self, next_tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
              kv_cache: torch.Tensor, pe_cache: torch.Tensor, write_slots: torch.Tensor, attn_mask: torch.Tensor,
              logits_at: torch.Tensor | None = None, draft_vocab: int | None = None,
              block_table: torch.Tensor | None = None) -> MTPOutput:
        """`MTPDrafter.forward`; `kv_cache`/`pe_cache` are the whole pool (its rows set the padding).
        Prefill-sized calls and paged pools (`block_table`) run eagerly."""
        if next_tokens.shape[1] > self.max_tokens or block_table is not None:
            return self.drafter(next_tokens, hidden, positions, kv_cache, pe_cache, write_slots, attn_mask,
                                logits_at, draft_vocab, block_table)
        batch, rows = next_tokens.shape[0], kv_cache.shape[1]
        padded = [_pad_rows(t, rows) for t in (next_tokens, hidden, positions, write_slots, attn_mask, logits_at)]
        tokens_p, hidden_p, positions_p, slots_p, mask_p, logits_at_p = padded
        out = self._call(self._drafter, mask_p, kv_cache, pe_cache,
                         tokens_p, hidden_p, positions_p, kv_cache, pe_cache, slots_p, mask_p, logits_at_p, draft_vocab)
        return MTPOutput(*(t[:batch] for t in out))

    @staticmethod
    def _call(compiled: nn.Module, mask: torch.Tensor | None, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
              *args):
        """`compiled(its key, *args)` with the cache length dynamic: the mask's `[rows, T, kv_len]` last
        dim (when given) and the pools' `[layers, rows, slots, ·]` slots."""
        if mask is not None:
            torch._dynamo.mark_dynamic(mask, 2)
        torch._dynamo.mark_dynamic(kv_cache, 2)
        torch._dynamo.mark_dynamic(pe_cache, 2)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                          accumulated_recompile_limit=RECOMPILE_LIMIT):
            return compiled(compiled.key, *args)


def _compile(module: nn.Module) -> nn.Module:
    """`module` compiled with `inductor_options`, called as `(key, *forward args)` (see `_Keyed`)."""
    return torch.compile(_Keyed(module), dynamic=False, options=inductor_options())
