"""Plain generation through the Python API: batching, EOS, limits, sampling, logits."""

from __future__ import annotations

import pytest
import torch

from specdec.model.errors import ConfigError
from specdec import Engine, SpecConfig
from specdec.sampling import RowSampling, probabilities

PROMPTS = [[5, 17, 300, 42, 9, 77, 12], [8, 100, 3], [250, 251, 252, 253, 254]]


@pytest.fixture(scope="module")
def eng(f32_ckpt):
    return Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=96)


def test_ragged_batch_equals_one_prompt_at_a_time(eng):
    batched = eng.generate(PROMPTS, max_new_tokens=20)
    for p, out in zip(PROMPTS, batched.token_ids):
        assert eng.generate([p], max_new_tokens=20).token_ids[0] == out
    assert batched.stats.tokens == 60 and batched.stats.batch_size == 3


def test_eos_ends_a_row_and_is_included(eng):
    free = eng.generate(PROMPTS, max_new_tokens=12).token_ids
    stop = free[1][4]  # make the 5th token of row 1 an end-of-sequence token
    saved = eng.eos_ids
    try:
        eng.eos_ids = frozenset({stop})
        out = eng.generate(PROMPTS, max_new_tokens=12).token_ids
    finally:
        eng.eos_ids = saved
    for full, cut in zip(free, out):
        k = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:k]
    assert out[1][-1] == stop and len(out[1]) <= 5


def test_max_new_tokens_is_exact(eng):
    out = eng.generate(PROMPTS, max_new_tokens=3)
    assert all(len(t) == 3 for t in out.token_ids)


def test_sampling_seeded_and_seed_sensitive(eng):
    a = eng.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=1).token_ids
    b = eng.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=1).token_ids
    c = eng.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=2).token_ids
    assert a == b and a != c


def test_logits_api_matches_per_row(eng):
    full = eng.logits(PROMPTS)
    assert full.shape == (3, 7, eng.args.vocab_size)
    alone = eng.logits([PROMPTS[1]])
    torch.testing.assert_close(full[1, :3], alone[0], rtol=1e-4, atol=1e-4)
    assert torch.all(full[1, 3:] == 0)


def test_bad_api_input(eng):
    with pytest.raises(ConfigError, match="empty"):
        eng.generate([[]])
    with pytest.raises(ConfigError, match="outside"):
        eng.generate([[10**6]])
    with pytest.raises(ConfigError, match="maximum sequence length"):
        eng.generate([[1] * 90], max_new_tokens=10)
    with pytest.raises(ConfigError, match="draft slots"):  # drafts need cache room beyond the budget
        eng.generate([[1] * 84], max_new_tokens=10, spec=SpecConfig(depth=4))
    with pytest.raises(ConfigError, match="depth"):
        SpecConfig(depth=0)


def test_top_p_nucleus_is_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probabilities(logits, 1.0, top_p=0.8)
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = probabilities(logits, 1.0, top_p=0.81)
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_sampling_follows_the_distribution():
    """Chi-square goodness of fit of 20,000 seeded draws (temperature 0.7, top-p 0.9): 1,000 prompts
    (streams) × 20 output positions, each with its own counter-based uniform."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=gen) * 2
    target = probabilities(logits, 0.7, 0.9)[0]
    rows = RowSampling((0.7,) * 1000, (0.9,) * 1000, (3,) * 1000, tuple(range(1000)))
    draws = torch.stack([rows.tokens(logits.expand(1000, 1, -1), [[i]] * 1000)[:, 0] for i in range(20)]).flatten()
    counts = torch.bincount(draws, minlength=12).double()
    support = target > 0
    assert counts[~support].sum() == 0  # nothing outside the nucleus
    expected = target[support].double() * draws.numel()
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 4 * (2 * dof) ** 0.5  # ~ p > 0.001 for these dof


def test_position_uniforms_are_a_function_of_seed_stream_and_position():
    from specdec.sampling import position_uniforms

    u = position_uniforms(7, [0, 1, 0], [[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])  # same (seed, stream): same values
    assert torch.equal(u[0, 1:], position_uniforms(7, [0], [[1, 2]])[0])  # independent of what came before
    assert not torch.equal(u[0], position_uniforms(8, [0], [[0, 1, 2]])[0])
    many = position_uniforms(0, list(range(200)), [list(range(50))] * 200).flatten()
    assert ((many >= 0) & (many < 1)).all() and abs(float(many.mean()) - 0.5) < 0.01
    hist = torch.histc(many.float(), bins=10, min=0, max=1)
    assert ((hist - 1000).abs() < 150).all()  # 10,000 draws, flat over tenths
