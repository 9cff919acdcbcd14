"""`python -m specdec.plan`: per-rank memory of a deployment, before launching it.

    python -m specdec.plan --config configs/config_671B.json --world-size 16 --max-batch-size 32 \\
        --max-seq-len 16384 --spec mtp --tree-nodes 8 --gpu-mem-gib 141

Weights are counted from the very modules the loader fills, built on the meta device with this
rank's `ParallelContext` (so the sharding rules are the loader's, exactly): FP8 projections and
their float32 scales, BF16 embeddings/head/norms, float32 router weights and bias, and the MTP
layer (without its embedding/head copies, which specdec shares with the verifier). The shared MLA
cache holds (kv_lora_rank + qk_rope_head_dim) values per token for every main layer and the MTP
layer (`--kv-cache-dtype fp8`: the latent as FP8 + a 4-byte scale), replicated on every rank, for
`max_seq_len` plus the draft's scratch slots. Activations are estimated for the larger of the two
forwards that run: the largest verify step (batch × (nodes+1) tokens over the whole context) and a
prefill chunk (`--prefill-chunk` tokens of one row, the last chunk of a full context attending over
all of it: the server's `--prefill-tokens`); they run one after the other, never at once.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from specdec.model.args import ModelArgs, load_model_args
from specdec.kernels.fp8_cache import KV_CACHE_DTYPES
from specdec.model.errors import SpecdecError
from specdec.model.parallel import ParallelContext
from specdec.cache import LatentCache
from specdec.dry_run import dry_run, rank_modules

GIB = 1 << 30


@dataclass
class MemoryPlan:
    """Bytes on one rank, by kind."""

    fp8_weights: int
    fp8_scales: int
    other_weights: int  # BF16 (or compute dtype) embeddings, head, norms, router; float32 router bias
    mtp_weights: int  # part of the three above that belongs to the MTP layer
    cache: int
    cache_bytes_per_token: int
    decode_activations: int  # the largest verify (or plain decode) step
    prefill_activations: int  # one prefill chunk

    @property
    def activations(self) -> int:
        """The forwards run one at a time: the larger of the two."""
        return max(self.decode_activations, self.prefill_activations)

    @property
    def total(self) -> int:
        return self.fp8_weights + self.fp8_scales + self.other_weights + self.cache + self.activations


def _weight_bytes(module: torch.nn.Module) -> tuple[int, int, int]:
    fp8 = scales = other = 0
    for name, p in module.named_parameters():
        nbytes = p.numel() * p.element_size()
        if p.dtype == torch.float8_e4m3fn:
            fp8 += nbytes
        elif name.endswith("weight_scale_inv"):
            scales += nbytes
        else:
            other += nbytes
    return fp8, scales, other


def plan(args: ModelArgs, world_size: int, max_batch: int, max_seq_len: int, spec_nodes: int | None,
         dtype: torch.dtype = torch.bfloat16, keep_fp8: bool = True, rank: int = 0,
         kv_cache_dtype: str = "auto", prefill_chunk: int = 512) -> MemoryPlan:
    """Per-rank memory for `max_batch` sequences of `max_seq_len` tokens (spec_nodes: draft nodes, None:
    plain), contexts prefilled in chunks of `prefill_chunk` tokens."""
    ctx = ParallelContext(world_size, rank)
    with_mtp = spec_nodes is not None and args.n_mtp_layers > 0
    main, mtp = rank_modules(args, ctx, dtype, keep_fp8 and args.fp8_block_size is not None, with_mtp)
    fp8, scales, other = _weight_bytes(main)
    mtp_bytes = 0
    if mtp is not None:
        m_fp8, m_scales, m_other = _weight_bytes(mtp)
        fp8, scales, other = fp8 + m_fp8, scales + m_scales, other + m_other
        mtp_bytes = m_fp8 + m_scales + m_other
    n_cache_layers = args.n_layers + (1 if with_mtp else 0)
    per_token = LatentCache.bytes_per_token(args, n_cache_layers, dtype, kv_cache_dtype)
    draft_slots = (spec_nodes + 1) if spec_nodes else 0
    cache = per_token * max_batch * (max_seq_len + draft_slots)
    kv_len = max_seq_len + draft_slots
    decode = forward_activations(args, world_size, dtype, max_batch, spec_nodes + 1 if spec_nodes else 1, kv_len,
                                 logits_per_row=spec_nodes + 1 if spec_nodes else 1)
    prefill = forward_activations(args, world_size, dtype, 1, min(prefill_chunk, max_seq_len), max_seq_len,
                                  logits_per_row=1)
    return MemoryPlan(fp8, scales, other, mtp_bytes, cache, per_token, decode, prefill)


def forward_activations(args: ModelArgs, world_size: int, dtype: torch.dtype, rows: int, tokens_per_row: int,
                        kv_len: int, logits_per_row: int) -> int:
    """Estimated bytes of one forward's largest temporaries on one rank: `rows` rows of
    `tokens_per_row` new tokens attending over `kv_len` cache slots, vocabulary logits for
    `logits_per_row` of each row's tokens (a prefill keeps only the last one's)."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = rows * tokens_per_row
    heads = args.n_heads // world_size
    return (
        tokens * heads * kv_len * 4 * 2  # attention logits and probabilities, float32
        + tokens * kv_len  # the boolean attention mask
        + tokens * heads * (args.kv_lora_rank + args.qk_rope_head_dim) * elem * 2  # latent queries and outputs
        + rows * logits_per_row * args.vocab_size * 4 * 2  # gathered float32 logits and sampling probabilities
        + tokens * max(args.inter_dim // world_size, args.moe_inter_dim * args.n_activated_experts) * elem * 3
        + tokens * args.dim * elem * 8  # residual stream and block temporaries
    )


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="HF config.json (or checkpoint dir) or a demo JSON config")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--spec", choices=["mtp", "none"], default="mtp")
    p.add_argument("--tree-nodes", type=int, default=3, help="draft nodes per step (chain: the draft depth)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="latent cache format (fp8: e4m3 latents + one scale per token)")
    p.add_argument("--dry-run", action="store_true",
                   help="also build every rank's modules on the meta device and push a prefill chunk and the "
                        "largest verify step through them (all shapes checked, no weights needed)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="context tokens prefilled per chunk (the server's --prefill-tokens; default 512): its "
                        "activations are counted, and the dry run pushes one through")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU")
    a = p.parse_args(argv)
    try:
        for flag, value in (("--world-size", a.world_size), ("--max-batch-size", a.max_batch_size),
                            ("--max-seq-len", a.max_seq_len), ("--tree-nodes", a.tree_nodes),
                            ("--prefill-chunk", a.prefill_chunk)):
            if value < 1:
                raise SpecdecError(f"{flag} must be >= 1, got {value}")
        args = load_model_args(a.config)
        nodes = a.tree_nodes if a.spec == "mtp" else None
        if nodes is not None and args.n_mtp_layers == 0:
            raise SpecdecError(f"{a.config}: config has no MTP layer (num_nextn_predict_layers = 0); use --spec none")
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        m = plan(args, a.world_size, a.max_batch_size, a.max_seq_len, nodes, dtype, kv_cache_dtype=a.kv_cache_dtype,
                 prefill_chunk=a.prefill_chunk)
    except SpecdecError as e:
        print(f"specdec.plan: error: {e}", file=sys.stderr)
        return 2
    budget = a.gpu_mem_gib * GIB
    print(f"per-rank memory, world size {a.world_size}, batch {a.max_batch_size} x {a.max_seq_len} tokens, "
          f"{'MTP ' + str(nodes) + ' draft nodes' if nodes else 'plain decoding'}:")
    print(f"  weights FP8          {_gib(m.fp8_weights)}")
    print(f"  weights FP8 scales   {_gib(m.fp8_scales)}")
    print(f"  weights BF16/FP32    {_gib(m.other_weights)}")
    print(f"    of which MTP layer {_gib(m.mtp_weights)}")
    print(f"  MLA latent cache     {_gib(m.cache)}  ({m.cache_bytes_per_token / 1024:.1f} KiB per token)")
    print(f"  activations (est.)   {_gib(m.activations)}  (the larger of: verify step {_gib(m.decode_activations).strip()}, "
          f"prefill chunk of {min(a.prefill_chunk, a.max_seq_len)} tokens {_gib(m.prefill_activations).strip()})")
    print(f"  total                {_gib(m.total)}  of {a.gpu_mem_gib:.0f} GiB: "
          f"{'fits' if m.total <= budget else 'DOES NOT FIT'} ({100 * m.total / budget:.0f}%)")
    if a.dry_run:
        print("dry run on the meta device (shapes only):")
        try:
            for line in dry_run(args, a.world_size, a.max_batch_size, a.max_seq_len, nodes, dtype, a.prefill_chunk,
                                a.kv_cache_dtype):
                print("  " + line, flush=True)
        except (SpecdecError, RuntimeError, ValueError, AssertionError) as e:
            print(f"specdec.plan: dry run failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    return 0 if m.total <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
