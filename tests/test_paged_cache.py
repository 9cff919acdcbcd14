"""The paged latent cache: block bookkeeping, and forwards through a block table equal to the dense pool's."""

import torch

from specdec.cache import LatentCache
from specdec.paged_cache import PagedLatentCache
from specdec.tree import visible_slots
from tests.test_speculative import eng, random_prompts  # noqa: F401


def _paged(eng, rows: int, n_blocks: int, block_size: int) -> PagedLatentCache:
    args = eng.args
    return PagedLatentCache(args, args.n_layers + args.n_mtp_layers, rows, n_blocks, block_size, eng.max_seq_len,
                            eng.model.dtype, "cpu")


def test_blocks_are_reserved_released_and_moved(eng):
    cache = _paged(eng, rows=3, n_blocks=5, block_size=4)
    assert cache.reserve(0, 9) and cache.owned(0) == 3 and cache.free_blocks == 2
    assert cache.reserve(0, 12) and cache.owned(0) == 3  # already covered
    assert not cache.reserve(1, 13) and cache.owned(1) == 0 and cache.free_blocks == 2  # all or nothing
    assert cache.reserve(1, 5)
    assert 0 not in cache.block_table[0, :3].tolist() + cache.block_table[1, :2].tolist()  # block 0 is never lent
    assert len(set(cache.block_table[0, :3].tolist() + cache.block_table[1, :2].tolist())) == 5
    cache.lengths[1] = 5
    table = cache.block_table[1].clone()
    cache.release(0)
    cache.move_row(1, 0)
    assert torch.equal(cache.block_table[0], table) and int(cache.lengths[0]) == 5
    assert cache.owned(1) == 0 and int(cache.block_table[1].abs().sum()) == 0 and cache.free_blocks == 3
    cache.release(0)
    assert cache.used_blocks == 0


def test_forward_through_scattered_blocks_equals_the_dense_pool(eng):
    """Prefill then two decode steps, dense pool against a paged one whose rows own interleaved,
    out-of-order blocks: the same logits and hidden states, and the same latents in each slot."""
    prompts = random_prompts(eng.args.vocab_size, [9, 14], seed=8)
    tokens, lengths = eng.pad(prompts)
    batch, width = tokens.shape
    args = eng.args
    dense = LatentCache(args, args.n_layers + args.n_mtp_layers, batch, 32, eng.model.dtype, "cpu")
    paged = _paged(eng, rows=batch, n_blocks=12, block_size=4)
    paged._free.reverse()  # hand out the last blocks first
    for step in range(8):  # interleave the rows' blocks
        assert paged.reserve(step % 2, 4 * (step // 2 + 1))
    pos = torch.arange(width).expand(batch, width)
    mask = pos.unsqueeze(-1) >= pos.unsqueeze(1)
    outs = []
    for cache in (dense, paged):
        out = eng.model(tokens, pos, cache.kv, cache.pe, pos, mask, block_table=cache.block_table)
        step_outs = [out.logits]
        length = lengths.clone()
        for token in (5, 9):
            slots = length.unsqueeze(1)
            new = torch.full((batch, 1), token)
            step_outs.append(eng.model(new, slots, cache.kv, cache.pe, slots, visible_slots(length, 1, 16),
                                       block_table=cache.block_table).logits)
            length += 1
        outs.append(step_outs)
    for d, p in zip(*outs):
        assert torch.allclose(d, p, atol=1e-5)
    for b in range(batch):
        for s in range(int(lengths[b]) + 2):
            block = paged.block_table[b, s // 4]
            assert torch.equal(dense.kv[:, b, s], paged.kv[:, block, s % 4])
