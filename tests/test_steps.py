"""Every decoding step (`specdec.steps`) is one graph: `torch.compile(fullgraph=True)` traces each
mode (plain, chain, tree; greedy, one-hot sampled rows, sampled drafts; dense and paged pools)
without a graph break, so no step reads anything back to the host, and the traced step computes
exactly what the eager one does (tokens, acceptance, state and cache writes)."""

from __future__ import annotations

import pytest
import torch

from specdec import SpecConfig
from specdec.scheduler import Scheduler
from specdec.sequence import Sequence
from specdec.speculative import SpeculativeDecoder
from specdec.steps import StepCache, StepShape, catch_up, decode_step
from tests.test_speculative import eng, random_prompts  # noqa: F401  (the engine fixture)

MODES = {  # name: (spec, temperature, top_p)
    "plain greedy": (None, 0.0, 1.0),
    "plain sampled": (None, 0.8, 0.9),
    "chain greedy": (SpecConfig(depth=3, adaptive=False), 0.0, 1.0),
    "chain one-hot": (SpecConfig(depth=3, adaptive=False), 0.8, 0.9),
    "chain sampled drafts": (SpecConfig(depth=3, adaptive=False, draft_mode="sample"), 0.8, 1.0),
    "tree greedy": (SpecConfig(depth=3, topk=2, nodes=6), 0.0, 1.0),
    "tree one-hot": (SpecConfig(depth=3, topk=2, nodes=6), 1.0, 0.9),
    "tree sampled drafts": (SpecConfig(depth=2, topk=3, nodes=12, draft_mode="sample"), 1.0, 1.0),
}


def clone_cache(cache: StepCache) -> StepCache:
    return StepCache(cache.kv.clone(), cache.pe.clone(),
                     None if cache.block_table is None else cache.block_table.clone(), cache.n_slots)


def first_step(monkeypatch, eng, run) -> tuple[StepCache, object, StepShape]:
    """The inputs of the first step `run()` takes (copies: the step writes the cache and the lengths)."""
    seen = []
    original = eng.run_step

    def spy(cache, rows, shape):
        if not seen:
            seen.append((clone_cache(cache), rows._replace(lengths=rows.lengths.clone()), shape))
        return original(cache, rows, shape)

    monkeypatch.setattr(eng, "run_step", spy)
    run()
    monkeypatch.undo()
    return seen[0]


def assert_same(x, y, name: str) -> None:
    """Integer tensors (tokens, counts, lengths) exactly; float ones to rounding: traced forwards run
    the model's compiled formulations (`kernels.experts.gathered`), which sum in another order."""
    if x is None or y is None:
        assert x is None and y is None, name
    elif x.is_floating_point():
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=name)
    else:
        assert torch.equal(x, y), name


def assert_same_results(a, b) -> None:
    for name, x, y in zip(a._fields, a, b):
        if name == "tree":
            for field in ("tokens", "parents", "depths", "child_probs"):
                assert_same(getattr(x, field) if x else None, getattr(y, field) if y else None, f"tree.{field}")
        else:
            assert_same(x, y, name)


@pytest.mark.parametrize("mode, paged", [(mode, paged) for mode in MODES for paged in (False, True)
                                         if not (paged and "sampled drafts" in mode)])  # the scheduler drafts one-hot
def test_each_step_mode_traces_into_one_graph_and_equals_eager(eng, monkeypatch, mode, paged):
    spec, temperature, top_p = MODES[mode]
    prompts = random_prompts(eng.args.vocab_size, [5, 9, 7], seed=4)
    if paged:
        sched = Scheduler(eng, spec, max_rows=4, cache_tokens=128, block_size=8)
        seqs = [Sequence(p, 6, temperature, top_p, 3 + i) for i, p in enumerate(prompts)]
        cache, rows, shape = first_step(monkeypatch, eng, lambda: sched.generate_all(seqs, timeout_s=300))
        assert cache.block_table is not None
    else:
        dec = SpeculativeDecoder(eng, spec, temperature, top_p, 3)
        cache, rows, shape = first_step(monkeypatch, eng, lambda: eng.schedule(dec, prompts, 6))
    assert shape.depth == (0 if spec is None else spec.depth) and shape.any_sampled == (temperature > 0)
    if shape.any_sampled and not shape.sampled_drafts:  # a greedy row among sampling ones
        rows = rows._replace(temperature=rows.temperature.clone().index_fill_(0, torch.tensor([0]), 0.0))
    model, drafter = eng.model, eng.drafter
    torch._dynamo.reset()
    traced = torch.compile(lambda c, r: decode_step(model, drafter, c, r, shape), fullgraph=True, backend="eager")
    with torch.inference_mode():
        eager_cache, traced_cache = clone_cache(cache), clone_cache(cache)
        expected = decode_step(model, drafter, eager_cache, rows._replace(lengths=rows.lengths.clone()), shape)
        got = traced(traced_cache, rows._replace(lengths=rows.lengths.clone()))
    assert_same_results(expected, got)
    assert_same(eager_cache.kv, traced_cache.kv, "kv")
    assert_same(eager_cache.pe, traced_cache.pe, "pe")
    assert expected.n_accepted.shape == (len(prompts),)


def test_mtp_catch_up_traces_into_one_graph(eng):
    """The MTP layer's catch-up over lagging pairs (after plain steps) is one graph too."""
    shape = StepShape(1)
    with torch.inference_mode():
        cache = eng.cache_for(2, 32)
        view = cache.step_view(12)
        lengths = torch.tensor([9, 12])
        tokens = torch.randint(0, eng.args.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
        hidden = torch.randn(2, 3, eng.args.dim, generator=torch.Generator().manual_seed(1)).to(eng.model.dtype)
        expected = catch_up(eng.drafter, clone_cache(view), lengths, tokens, hidden, shape)
        torch._dynamo.reset()
        traced = torch.compile(lambda c: catch_up(eng.drafter, c, lengths, tokens, hidden, shape), fullgraph=True,
                               backend="eager")
        got = traced(clone_cache(view))
    for x, y in zip(expected, got):
        assert_same(x, y, "catch-up")
