"""Whole greedy steps (`specdec.greedy_step`), run eagerly through the engine's step hooks.

`--compile` runs these modules compiled (tests/test_compiled.py); here they run eagerly, so every
depth, draft vocabulary and retirement order is cheap to check. The greedy rules are
deterministic, so the step loops must emit the general loops' tokens and count the same
acceptances. The 8-token model accepts random drafts often: rows finish at different steps and
often accept more drafts than their remaining budget, which must not push a parked row's writes
past the cache pool (equal prompt lengths make the pool tight for every row).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from specdec import SpecConfig
from specdec.greedy_step import GreedyChainStep, GreedyPlainStep
from specdec.tree import visible_slots


def random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@contextmanager
def step_hooks(engine):
    """The engine decodes greedily through eager `GreedyPlainStep` / `GreedyChainStep` modules."""
    engine.run_plain_step = GreedyPlainStep(engine.model)
    engine.run_chain_step = GreedyChainStep(engine.model, engine.drafter)
    try:
        yield engine
    finally:
        engine.run_plain_step = engine.run_chain_step = None


def test_visible_slots_is_causal_from_each_rows_length():
    mask = visible_slots(torch.tensor([2, 0]), 2, 5)
    assert mask.shape == (2, 2, 5)
    assert mask[0].tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
    assert mask[1].tolist() == [[True, False, False, False, False], [True, True, False, False, False]]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("draft_vocab", [None, 5])
def test_chain_step_emits_the_general_loops_tokens_and_counts(tiny_engine, depth, draft_vocab):
    prompts = random_prompts(8, [7, 7, 7], seed=1)
    spec = SpecConfig(depth=depth, draft_vocab=draft_vocab, adaptive=False)
    general = tiny_engine.generate(prompts, max_new_tokens=17, spec=spec)
    tiny_engine._cache = None  # a fresh pool, as tight as the call allows
    with step_hooks(tiny_engine):
        stepped = tiny_engine.generate(prompts, max_new_tokens=17, spec=spec)
    assert (tiny_engine._cache.lengths == 0).all()  # every finished row was parked
    assert stepped.token_ids == general.token_ids
    assert all(len(t) == 17 for t in stepped.token_ids)
    for name in ("tau", "acceptance_per_position", "row_steps", "draft_acceptance_rate", "verify_steps"):
        assert getattr(stepped.stats, name) == getattr(general.stats, name), name
    assert stepped.stats.acceptance_per_position[0] > 0.2  # drafts are accepted: budgets are overrun
    assert len(stepped.stats.tpot_s) == sum(len(t) - 1 for t in stepped.token_ids)


def test_chain_step_retires_rows_at_eos(f32_engine):
    """Rows that end by EOS at different steps are parked; the others decode on unchanged."""
    prompts = random_prompts(f32_engine.args.vocab_size, [6, 9, 4], seed=11)
    free = f32_engine.generate(prompts, max_new_tokens=14).token_ids
    stop = next(t for t in free[2][1:] if t not in free[0] and t not in free[2][:1])
    saved = f32_engine.eos_ids
    f32_engine.eos_ids = frozenset({stop})
    try:
        want = f32_engine.generate(prompts, max_new_tokens=14).token_ids
        f32_engine._cache = None  # step modules span every pool row: a pool of exactly this batch
        with step_hooks(f32_engine):
            got = f32_engine.generate(prompts, max_new_tokens=14, spec=SpecConfig(depth=2, adaptive=False))
            got_plain = f32_engine.generate(prompts, max_new_tokens=14).token_ids
    finally:
        f32_engine.eos_ids = saved
    assert want[2][-1] == stop and len(want[2]) < 14 and len(want[0]) == 14
    assert got.token_ids == want
    assert got_plain == want


def test_plain_step_equals_the_general_loop(tiny_engine):
    prompts = random_prompts(8, [5, 9, 3, 9], seed=4)
    want = tiny_engine.generate(prompts, max_new_tokens=12)
    with step_hooks(tiny_engine):
        got = tiny_engine.generate(prompts, max_new_tokens=12)
    assert got.token_ids == want.token_ids
    assert got.stats.verify_steps == want.stats.verify_steps and got.stats.row_steps == want.stats.row_steps
