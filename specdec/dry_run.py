"""A dry run at full size: each rank's modules on the meta device, and the biggest steps pushed through.

`python -m specdec.plan --config configs/config_671B.json --world-size 16 --dry-run` builds, for
each rank, the verifier and the MTP layer exactly as the loader does (its `ParallelContext`, FP8
projections with their scales, the work the loader does once after loading: absorbed `kv_b_proj`,
stacked FP8 experts), on the meta device, so no weight is read and no memory is taken. Then it runs
a chunked-prefill forward (the last chunk of the longest prompt, attending to every earlier slot)
and the largest verify step (every row, every draft node, at the end of the context) through the
verifier, and the MTP layer over both, and checks the output shapes. Every matrix product, cache
write, attention and expert dispatch of the real model meets its real shapes; a sharding or shape
error fails here in seconds instead of after loading 671B parameters. Collectives keep shapes only
(there is no process group): all-reduce returns its input, all-gather concatenates copies.
"""

from __future__ import annotations

import torch

from specdec.model.args import ModelArgs
from specdec.model.mtp_layer import MTPLayer
from specdec.model.prepare import prepare_loaded
from specdec.model.parallel import ParallelContext
from specdec.model.transformer import Transformer
from specdec.mtp.drafter import MTPDrafter
from specdec.cache import LatentCache


class ShapeOnlyContext(ParallelContext):
    """A rank's `ParallelContext` whose collectives keep shapes and move no data (meta tensors)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] * self.world_size, dim=-1)


def _step(main, drafter: MTPDrafter | None, cache: LatentCache, rows: int, start: int, width: int,
          what: str) -> str:
    """Push `width` new tokens per row at positions start.. through the verifier (and the MTP layer),
    attending to all slots before them; check the shapes; one line saying what ran."""
    args = main.args
    tokens = torch.zeros(rows, width, dtype=torch.long, device="meta")
    pos = torch.arange(start, start + width, device="meta").expand(rows, width)
    mask = torch.ones(rows, width, start + width, dtype=torch.bool, device="meta")
    out = main(tokens, pos, cache.kv, cache.pe, pos, mask)
    expected = (rows, width, args.vocab_size)
    if tuple(out.logits.shape) != expected or tuple(out.hidden.shape) != (rows, width, args.dim):
        raise AssertionError(f"{what}: verifier logits {tuple(out.logits.shape)} and hidden "
                             f"{tuple(out.hidden.shape)}, expected {expected} and {(rows, width, args.dim)}")
    line = f"{what} [{rows} x {width} tokens, {start + width} slots]: verifier ok"
    if drafter is not None:
        mtp = drafter(tokens, out.hidden, pos, cache.kv, cache.pe, pos, mask)
        if tuple(mtp.logits.shape) != expected:
            raise AssertionError(f"{what}: MTP logits {tuple(mtp.logits.shape)}, expected {expected}")
        line += ", MTP layer ok"
    return line


def rank_modules(args: ModelArgs, ctx: ParallelContext, dtype: torch.dtype, keep_fp8: bool, with_mtp: bool,
                 max_seq_len: int = 2):
    """The verifier and (optionally) MTP layer of this rank on the meta device, as the loader builds them."""
    fp8_block = args.fp8_block_size if keep_fp8 else None
    with torch.device("meta"):
        main = Transformer(args, ctx, dtype, fp8_block, max_seq_len)
        mtp = MTPLayer(args.n_layers, args, ctx, dtype, fp8_block) if with_mtp else None
    if mtp is not None:  # specdec reuses the verifier's embedding and head (identical copies in the release)
        mtp.embed_tokens = None
        mtp.shared_head.head = None
    return main, mtp


def dry_run(args: ModelArgs, world_size: int, max_batch: int, max_seq_len: int, spec_nodes: int | None,
            dtype: torch.dtype, prefill_chunk: int, kv_cache_dtype: str = "auto",
            ranks: list[int] | None = None) -> list[str]:
    """Build each of `ranks` (default: all) on the meta device and run a prefill chunk of
    `prefill_chunk` tokens and a verify step of `max_batch` rows × (spec_nodes + 1) tokens (1: plain)
    at the end of a `max_seq_len` context; returns one line per rank. Raises on any shape error."""
    width = spec_nodes + 1 if spec_nodes else 1
    slots = max_seq_len + (width if spec_nodes else 0)
    chunk = min(prefill_chunk, max_seq_len)
    lines = []
    for rank in ranks if ranks is not None else range(world_size):
        ctx = ShapeOnlyContext(world_size, rank)
        keep_fp8 = args.fp8_block_size is not None
        main, mtp = rank_modules(args, ctx, dtype, keep_fp8, spec_nodes is not None and args.n_mtp_layers > 0,
                                 max_seq_len=slots)
        for module in (main, mtp):
            if module is not None:
                prepare_loaded(module)
        main.init_rope(torch.device("meta"))
        drafter = MTPDrafter(mtp.eval(), main.eval(), cache_layer=args.n_layers) if mtp is not None else None
        n_cache = args.n_layers + (1 if drafter is not None else 0)
        with torch.inference_mode():
            prefill_cache = LatentCache(args, n_cache, 1, slots, dtype, "meta", kv_cache_dtype)
            done = [_step(main, drafter, prefill_cache, 1, max_seq_len - chunk, chunk, "prefill chunk")]
            cache = LatentCache(args, n_cache, max_batch, slots, dtype, "meta", kv_cache_dtype)
            done.append(_step(main, drafter, cache, max_batch, max_seq_len - width, width, "verify step"))
        lines.append(f"rank {rank}/{world_size}: " + "; ".join(done))
    return lines
