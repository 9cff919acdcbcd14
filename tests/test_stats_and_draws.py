"""Latency and step statistics of `generate`, and the exact categorical draws behind every sampled token:
the exponential race of output tokens (and of the one-hot drafts coupled to them), the CDF draw of sampled drafts."""

from __future__ import annotations

import math

import pytest
import torch

from specdec import SpecConfig
from specdec.mtp.tree_draft import draft_chain, expand_tree
from specdec.sampling import _mix64, draw, position_exponentials, position_uniforms, race, sample_tokens
from specdec.steps import StepCache, StepRows, StepShape


@pytest.mark.parametrize("spec", [None, SpecConfig(depth=3), SpecConfig(depth=2, topk=2)])
def test_latency_samples_cover_every_token_after_the_first(f32_engine, spec):
    prompts = [[5, 17, 300, 42], [8, 100, 3], [9, 9, 9, 9, 9]]
    out = f32_engine.generate(prompts, max_new_tokens=11, spec=spec)
    stats = out.stats
    assert len(stats.tpot_s) == stats.tokens - len(prompts)  # budget cuts are not counted
    assert all(t > 0 for t in stats.tpot_s)
    assert 0 < stats.ttft_s <= stats.wall_s
    assert stats.row_steps >= stats.verify_steps > 0


def test_no_verify_step_means_tau_one(f32_engine):
    out = f32_engine.generate([[5, 17, 300]], max_new_tokens=1, spec=SpecConfig(depth=2))
    assert out.stats.verify_steps == 0 and out.stats.tau == 1.0 and out.stats.tpot_s == []


def test_draw_follows_the_distribution_and_never_draws_zero_mass():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    n = 20000
    counts = torch.bincount(draw(p.expand(n, -1), g), minlength=6).double()
    assert counts[p == 0].sum() == 0
    expected = p.double() * n
    stat = ((counts - expected)[p > 0] ** 2 / expected[p > 0]).sum().item()
    assert stat < 13.8  # chi-square, 2 dof, p = 0.001
    assert draw(torch.tensor([[0.0, 1.0, 0.0]]), g).item() == 1


def test_draw_at_the_upper_float_edge_takes_the_last_token_with_mass(monkeypatch):
    """u·total rounding up to total must not select a trailing zero-probability token."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((1, 1), math.nextafter(1.0, 0.0)))
    assert draw(torch.tensor([[0.3, 0.7, 0.0, 0.0]]), None).item() == 1
    assert draw(torch.tensor([[0.3, 0.0, 0.7]]), None).item() == 2


def test_draw_is_deterministic_per_seed_and_shape_preserving():
    p = torch.softmax(torch.randn(2, 3, 50), -1)
    a = draw(p, torch.Generator().manual_seed(4))
    b = draw(p, torch.Generator().manual_seed(4))
    assert a.shape == (2, 3) and torch.equal(a, b)


def test_race_noise_is_splitmix64_per_token_and_exponential():
    """Entry t of a position's noise is -log of the top 23 bits (+ ½, over 2²³) of splitmix64's
    (t+1)-th output from the position's 53-bit key, whatever the vocabulary width; over many
    positions it is Exp(1); at the top of the range it stays positive."""
    u = position_uniforms(3, [0, 5], [[0, 9], [2, 4]])
    noise = position_exponentials(u, 16)
    key = int(u[1, 0].item() * 2 ** 53)
    mask = (1 << 64) - 1
    expected = [-math.log(((_mix64((key + t * 0x9E3779B97F4A7C15) & mask) >> 41) + 0.5) * 2.0 ** -23)
                for t in range(16)]
    assert noise[1, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(position_exponentials(u, 40)[..., :16], noise)
    many = position_exponentials(position_uniforms(0, list(range(100)), [list(range(10))] * 100), 1000).double()
    assert abs(many.mean().item() - 1.0) < 0.01 and abs(many.var().item() - 1.0) < 0.02  # 10^6 Exp(1) draws
    assert abs((many > 1.0).double().mean().item() - math.exp(-1.0)) < 0.003
    assert many.min() > 0
    assert (-torch.tensor((2 ** 23 - 1 + 0.5) * 2.0 ** -23, dtype=torch.float32).log()).item() > 0  # the largest h


def test_race_follows_the_distribution_and_never_draws_zero_mass():
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    n = 20000
    noise = position_exponentials(position_uniforms(1, [0] * n, [[i] for i in range(n)])[:, 0], 6)
    counts = torch.bincount(race(p.expand(n, -1), noise), minlength=6).double()
    assert counts[p == 0].sum() == 0
    expected = p.double() * n
    stat = ((counts - expected)[p > 0] ** 2 / expected[p > 0]).sum().item()
    assert stat < 13.8  # chi-square, 2 dof, p = 0.001
    assert race(torch.tensor([[0.0, 1.0, 0.0]]), noise[:1]).item() == 1  # a point mass (greedy row) wins


class _FixedDrafter:
    """An MTP stand-in whose output at draft depth k (k ≥ 2) is `logits[k-1]` `[B, V]`."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        self.logits, self.calls = logits, 0

    def __call__(self, tokens, hidden, *args, **kwargs):
        self.calls += 1
        out = self.logits[self.calls].unsqueeze(1).expand(-1, tokens.shape[1], -1)

        class Out:
            logits = out

            @staticmethod
            def hidden(kind):
                return hidden

        return Out()


@pytest.mark.parametrize("topk", [1, 2])
def test_one_hot_drafts_of_a_sampling_row_win_the_verifiers_race(topk):
    """A sampling row's one-hot draft at depth k is what the verifier draws at that depth from the
    drafter's distribution with its own noise (the coupled draft; with trees, the first child); a
    greedy row's is the argmax."""
    torch.manual_seed(0)
    depth, batch, vocab = 3, 2, 50
    logits = [torch.randn(batch, vocab) * 2 for _ in range(depth)]
    temperature, top_p = torch.tensor([0.8, 0.0]), torch.ones(batch)
    noise = position_exponentials(position_uniforms(7, [0, 1], [[4, 5, 6, 7], [0, 1, 2, 3]]), vocab)
    rows = StepRows(torch.tensor([3, 3]), torch.tensor([1, 1]), logits[0], torch.zeros(batch, 4),
                    temperature, top_p, noise)
    cache = StepCache(torch.zeros(1, batch, 16, 4), torch.zeros(1, batch, 16, 2), None, 16)
    shape = StepShape(depth, topk, depth * topk, any_sampled=True)
    draft = draft_chain if topk == 1 else expand_tree
    tree = draft(_FixedDrafter(logits), cache, rows, shape, lambda n: None)
    for k in range(1, depth + 1):
        want = sample_tokens(logits[k - 1].unsqueeze(1), temperature, top_p, noise[:, k - 1:k], True, False)[:, 0]
        at_depth = tree.depths == k
        first = at_depth.long().argmax(dim=1)  # the first node at depth k: the first child of the first expanded
        assert torch.equal(tree.tokens.gather(1, first.unsqueeze(1))[:, 0], want)
        assert tree.tokens[1, first[1]] == logits[k - 1][1].argmax()
