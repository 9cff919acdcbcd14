"""Latency and step statistics of `generate`, and the exact categorical draw behind every sampled token."""

from __future__ import annotations

import math

import pytest
import torch

from specdec import SpecConfig
from specdec.sampling import draw


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
