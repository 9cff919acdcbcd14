"""The FP8 latent cache (`--kv-cache-dtype fp8`): its error bound, its bytes, and lossless decoding
over it (speculative greedy equals plain greedy with the same cache format, dense and paged)."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels import fp8_cache
from specdec.model.errors import ConfigError
from specdec import Engine
from specdec.cache import LatentCache
from specdec.config import SpecConfig
from specdec.scheduler import Scheduler
from specdec.sequence import Sequence
from tests.test_speculative import assert_same_or_tie, random_prompts


@pytest.fixture(scope="module")
def engines(f32_ckpt):
    """(fp8-cache engine, float-cache engine) over the same float32 checkpoint."""
    return tuple(Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=96,
                                        kv_cache_dtype=kind) for kind in ("fp8", "auto"))


def test_round_trip_error_is_within_e4m3_rounding():
    """Each token is scaled by its own amax: the error is at most half an e4m3 step (2^-4 of the
    value, or 2^-10 of amax for the smallest values), whatever the other tokens' magnitudes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-3, 3, 5).view(1, 5, 1)
    stored = fp8_cache.encode(x)
    assert stored.dtype == torch.uint8 and stored.shape == (3, 5, 68)
    back = fp8_cache.decode(stored, torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    assert ((back - x).abs() <= x.abs() * 2.0 ** -4 + amax * 2.0 ** -10).all()
    assert torch.equal(fp8_cache.decode(fp8_cache.encode(x[:, 2:3]), torch.float32), back[:, 2:3])  # per token
    assert torch.equal(fp8_cache.decode(fp8_cache.encode(torch.zeros(2, 8)), torch.float32), torch.zeros(2, 8))


def test_the_fp8_pool_stores_a_latent_in_a_quarter_of_float32s_bytes(engines):
    fp8, auto = engines
    args = fp8.args
    layers = args.n_layers + args.n_mtp_layers
    f32 = LatentCache.bytes_per_token(args, layers, torch.float32)
    small = LatentCache.bytes_per_token(args, layers, torch.float32, "fp8")
    assert small == layers * ((args.kv_lora_rank + 4) + args.qk_rope_head_dim * 4) < f32
    assert fp8.cache_for(2, 32).kv.dtype == torch.uint8 and auto.cache_for(2, 32).kv.dtype == torch.float32


def test_logits_stay_close_to_the_float_cache(engines):
    fp8, auto = engines
    ids = random_prompts(fp8.args.vocab_size, [12, 20], seed=5)
    a, b = fp8.logits(ids), auto.logits(ids)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert not torch.equal(a, b)  # the cache really is quantised


@pytest.mark.parametrize("spec", [SpecConfig(depth=3), SpecConfig(depth=2, adaptive=False),
                                  SpecConfig(depth=2, topk=2, nodes=4)])
def test_speculative_greedy_equals_plain_greedy_over_an_fp8_cache(engines, spec):
    fp8, _ = engines
    prompts = random_prompts(fp8.args.vocab_size, [9, 4, 15], seed=8)
    plain = fp8.generate(prompts, max_new_tokens=24).token_ids
    out = fp8.generate(prompts, max_new_tokens=24, spec=spec).token_ids
    assert assert_same_or_tie(fp8, prompts, out, plain) == 0


def test_paged_fp8_cache_through_the_scheduler_equals_plain(engines):
    fp8, _ = engines
    prompts = random_prompts(fp8.args.vocab_size, [7, 3, 11, 5], seed=9)
    sched = Scheduler(fp8, SpecConfig(depth=3), max_rows=2, cache_tokens=128, block_size=8)
    assert sched.cache.kv.dtype == torch.uint8
    seqs = [Sequence(p, 14) for p in prompts]
    sched.generate_all(seqs, timeout_s=600)
    for p, s in zip(prompts, seqs):
        assert assert_same_or_tie(fp8, [p], [s.output], fp8.generate([p], max_new_tokens=14).token_ids) == 0
    assert sched.cache.used_blocks == 0


def test_an_unknown_cache_dtype_is_refused(f32_ckpt):
    with pytest.raises(ConfigError, match="--kv-cache-dtype must be one of auto, fp8, got 'int4'"):
        Engine.from_pretrained(f32_ckpt, device="cpu", kv_cache_dtype="int4")
