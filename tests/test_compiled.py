"""The compiled decode path (`Engine.from_pretrained(compile=True)`, `--compile`).

The routing-independent MoE path is checked eagerly against the sorted dispatch; the compiled
forwards against the eager ones (rows padded to the pool, cache writes), and compiled decoding
(whole compiled steps) against eager decoding token for token, plain and speculative, with a row
retiring early; two compiled engines in one process keep their own graphs.
"""

from __future__ import annotations

import pytest
import torch

from specdec.model.errors import ConfigError
from specdec.kernels import experts
from specdec.model.moe import MoE
from specdec.model.prepare import StackedExperts
from specdec import Engine, SpecConfig
from specdec.cache import LatentCache
from specdec.compiled import CompiledDecode, check_compile_supported, row_bucket
from specdec.speculative import SpeculativeDecoder
from tests.test_adaptive import ScriptedPolicy

PROMPTS = [[5, 17, 300, 42, 9, 77, 12], [8, 100, 3]]


@pytest.fixture(scope="module")
def engines(f32_ckpt):
    eager = Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=96)
    compiled = Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=96, compile=True)
    return eager, compiled


@pytest.mark.parametrize("path", ["gathered experts", "all experts"])
@pytest.mark.parametrize("tokens", [1, 3, 4, 8, 9, 64])
def test_routed_static_equals_sorted_dispatch(engines, tokens, path, monkeypatch):
    moe = next(m for m in engines[0].model.modules() if isinstance(m, MoE))
    stacked = moe.routed_backend
    assert isinstance(stacked, StackedExperts)
    if path == "all experts":
        monkeypatch.setattr("specdec.kernels.experts.GATHER_MAX_BYTES", 0)
    x = torch.randn(tokens, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        weights, indices = moe.gate(x)
        static = experts.gathered(x, weights, indices, moe.local_experts.start, stacked.gate_up, stacked.down)
        torch.testing.assert_close(static + moe.shared_experts(x), moe(x), rtol=1e-5, atol=1e-5)


def test_stacked_experts_share_the_parameters(engines):
    moe = next(m for m in engines[0].model.modules() if isinstance(m, MoE))
    gate_up, down = moe.routed_backend.gate_up, moe.routed_backend.down
    first = moe.experts[str(moe.local_experts.start)]
    assert first.gate_proj.weight.data_ptr() == gate_up[0].data_ptr()
    assert first.down_proj.weight.data_ptr() == down[0].data_ptr()


def test_compiled_forward_pads_rows_and_writes_the_cache(engines):
    eager, compiled = engines
    args, dim = eager.args, eager.args.dim
    pools = []
    for eng in (eager, compiled):
        cache = eng.cache_for(2, 32)
        cache.kv.zero_(), cache.pe.zero_()
        pools.append(cache)
    tokens = torch.tensor([[5, 17, 300]])  # one row of a two-row pool: the compiled call pads row 1
    pos = torch.arange(3).unsqueeze(0)
    mask = pos.unsqueeze(-1) >= pos.unsqueeze(1)
    with torch.inference_mode():
        want = eager.model(tokens, pos, pools[0].kv, pools[0].pe, pos, mask)
        got = compiled.run_verifier(tokens, pos, pools[1].kv, pools[1].pe, pos, mask)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        assert got.logits.shape == (1, 3, args.vocab_size)
        torch.testing.assert_close(pools[1].kv[:, 0, :3], pools[0].kv[:, 0, :3], rtol=1e-5, atol=1e-5)
        hidden = torch.randn(1, 3, dim)
        want_d = eager.drafter(tokens, hidden, pos, pools[0].kv, pools[0].pe, pos, mask)
        got_d = compiled.run_drafter(tokens, hidden, pos, pools[1].kv, pools[1].pe, pos, mask)
        torch.testing.assert_close(got_d.logits, want_d.logits, rtol=1e-4, atol=1e-4)
        layer = eager.args.n_layers
        torch.testing.assert_close(pools[1].kv[layer, 0, :3], pools[0].kv[layer, 0, :3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("retiring", [1, 0])
@pytest.mark.parametrize("spec", [None, SpecConfig(depth=2), SpecConfig(depth=2, topk=2)],
                         ids=["plain", "chain2", "tree2x2"])
def test_compiled_greedy_equals_eager_with_a_row_retiring(engines, spec, retiring):
    """Every step runs compiled whole (`specdec.steps.decode_step`); when one row retires, the
    other moves to row 0 and steps run on a one-row bucket (`row_bucket`)."""
    eager, compiled = engines
    free = eager.generate(PROMPTS, max_new_tokens=12).token_ids
    # one row ends early at a token the other never emits: it retires, the other row moves to row
    # 0 (when row 0 retires), and the steps after run on one row
    other = 1 - retiring
    stop = next(t for t in free[retiring][2:] if t not in free[other] and t not in free[retiring][:2])
    saved = [eng.eos_ids for eng in engines]
    for eng in engines:
        eng.eos_ids = frozenset({stop})
    try:
        want = eager.generate(PROMPTS, max_new_tokens=12).token_ids
        got = compiled.generate(PROMPTS, max_new_tokens=12, spec=spec).token_ids
    finally:
        for eng, eos in zip(engines, saved):
            eng.eos_ids = eos
    assert len(want[retiring]) < len(want[other])
    assert got == want


class _TimedScript(ScriptedPolicy):
    """A scripted policy that keeps the seconds each step was timed at (None: not timed)."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(script)
        self.seconds: list[float | None] = []

    def observe(self, depth: int, rows: int, seconds: float | None, n_accepted: list[int]) -> None:
        super().observe(depth, rows, seconds, n_accepted)
        self.seconds.append(seconds)


class _CompileWatch:
    """Stands in for `CompiledDecode._step`: records, per call, whether dynamo compiled a graph
    during it, then returns its result."""

    def __init__(self, compiled: CompiledDecode) -> None:
        self.compiled, self.step, self.key = compiled, compiled._step, compiled._step.key
        self.compiled_during: list[bool] = []

    def __call__(self, *args):
        before = self.compiled.compilations
        out = self.step(*args)
        self.compiled_during.append(self.compiled.compilations != before)
        return out


def test_compiled_adaptive_steps_are_plain_or_full_depth_and_equal_eager(engines, monkeypatch):
    """Compiled, the policy chooses between plain steps and depth K only (each depth compiles graphs
    of its own). Switching between them decodes eager greedy's tokens (the MTP catch-up after plain
    steps runs eagerly; plain steps share plain decoding's graphs), and a step that compiled its
    graph is not taken for a timing."""
    eager, compiled = engines
    spec = SpecConfig(depth=2)
    assert compiled.adapts(spec) and compiled.policy_for(spec).depths == (0, 2)
    assert eager.policy_for(spec).depths == (0, 1, 2)
    want = eager.generate(PROMPTS, max_new_tokens=12).token_ids
    policy = _TimedScript([2, 0, 0, 2, 0])
    watch = _CompileWatch(compiled.compiled)
    monkeypatch.setattr(compiled.compiled, "_step", watch)
    got, _ = compiled.schedule(SpeculativeDecoder(compiled, spec, 0.0, 1.0, 0, policy), PROMPTS, 12)
    assert got == want
    assert set(policy.ran) == {0, 2}
    # exactly the steps during which a graph compiled went untimed
    assert [s is None for s in policy.seconds] == watch.compiled_during
    assert all(s is None or s > 0 for s in policy.seconds)
    assert compiled.cost_key(spec) != eager.cost_key(spec)  # compiled steps' costs are their own


def test_two_compiled_engines_keep_their_own_graphs(engines, tmp_path):
    """A second compiled engine of the same shapes but another routing scale decodes its own tokens,
    not the first engine's (dynamo's graph cache is per process and skips module guards)."""
    from specdec.model.synthetic import small_config, write_random_checkpoint

    eager, compiled = engines
    other_ckpt = write_random_checkpoint(tmp_path / "other", {**small_config(), "routed_scaling_factor": 0.25},
                                         fp8=False, shard_bytes=1_000_000)
    other = Engine.from_pretrained(other_ckpt, device="cpu", dtype=torch.float32, max_seq_len=96, compile=True)
    other_eager = Engine.from_pretrained(other_ckpt, device="cpu", dtype=torch.float32, max_seq_len=96)
    first = compiled.generate(PROMPTS, max_new_tokens=4).token_ids
    want = other_eager.generate(PROMPTS, max_new_tokens=4).token_ids
    assert want != eager.generate(PROMPTS, max_new_tokens=4).token_ids  # the engines really differ
    assert other.generate(PROMPTS, max_new_tokens=4).token_ids == want
    assert compiled.generate(PROMPTS, max_new_tokens=4).token_ids == first


def test_compile_refuses_fp8_weights(fp8_ckpt):
    eng = Engine.from_pretrained(fp8_ckpt, device="cpu", dtype=torch.float32, max_seq_len=32, keep_fp8=True)
    with pytest.raises(ConfigError, match="unquantised"):
        check_compile_supported(eng.model, eng.ctx, eng.device)
    with pytest.raises(ConfigError, match="CPU"):
        check_compile_supported(eng.model, eng.ctx, torch.device("cuda"))


def test_row_bucket_halves_while_the_live_rows_fit():
    assert [row_bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert row_bucket(1, 1) == 1 and row_bucket(2, 3) == 3 and row_bucket(1, 3) == 1


def test_step_view_spans_the_slots_asked_and_writes_reach_the_pool(engines):
    cache = LatentCache(engines[0].args, 2, 3, 70, torch.float32, "cpu")
    view = cache.step_view(24)
    assert view.n_slots == 24 and view.kv.shape == (2, 3, 24, cache.kv.shape[-1]) and view.block_table is None
    view.kv[1, 2, 23] = 7.0
    assert cache.kv[1, 2, 23].eq(7.0).all()  # a view: a step's writes land in the pool
    assert cache.step_view(90).n_slots == 70  # never past the pool


def test_compiled_pool_keeps_a_spare_block(engines):
    """A compiled engine's pool has SPAN_MULTIPLE slots more than a call needs, so that a step's
    span is always a view of fewer slots than the pool (one graph, not a second for the whole pool)."""
    from specdec.cache import SPAN_MULTIPLE

    eager, compiled = engines
    compiled.release_cache()  # the next call allocates afresh
    assert compiled.cache_for(2, 40).seq_len == 40 + SPAN_MULTIPLE


class _CountingStep:
    """Stands in for `CompiledDecode._paged_step`: records each call's rows and whether a padding
    row's place in the pool held blocks (a long prompt being prefilled), then runs it."""

    def __init__(self, compiled_step, pool) -> None:
        self.compiled_step, self.key, self.pool = compiled_step, compiled_step.key, pool
        self.rows, self.padding_over_blocks = [], []

    def __call__(self, key, kv, pe, table, span_blocks, rows, shape):
        live = int(rows.lengths.gt(0).sum())
        self.rows.append(table.shape[0])
        self.padding_over_blocks.append(bool(self.pool.block_table[live:table.shape[0]].any()))
        assert not table[live:].any()  # padding rows write only the null block
        return self.compiled_step(key, kv, pe, table, span_blocks, rows, shape)


def test_compiled_steps_over_a_paged_pool_equal_eager_through_joins_leaves_and_chunks(engines, monkeypatch):
    """The server's loop (`Scheduler`, paged pool) with a compiled engine: its steps run compiled
    over row buckets of the pool while sequences join and leave and two long prompts are prefilled
    in chunks in the pool's last row, which the 3-row bucket of 2 live rows pads over (the padding
    must not write its blocks); each output equals eager greedy decoding of its prompt alone."""
    from specdec.scheduler import Scheduler
    from specdec.sequence import Sequence
    from tests.test_speculative import random_prompts

    eager, compiled = engines
    prompts = random_prompts(eager.args.vocab_size, [5, 23, 6, 31, 4, 9], seed=17)
    budgets = [14, 10, 12, 8, 16, 6]
    want = [eager.generate([p], max_new_tokens=n).token_ids[0] for p, n in zip(prompts, budgets)]
    sched = Scheduler(compiled, SpecConfig(depth=2, adaptive=False), max_rows=3, prefill_tokens=8, cache_tokens=192,
                      block_size=8)
    assert sched.decoder.policy is None  # the depth is pinned
    counting = _CountingStep(compiled.compiled._paged_step, sched.cache)
    monkeypatch.setattr(compiled.compiled, "_paged_step", counting)
    seqs = [Sequence(p, n) for p, n in zip(prompts, budgets)]
    sched.generate_all(seqs, timeout_s=900)
    assert [s.output for s in seqs] == want
    assert 3 in counting.rows and any(counting.padding_over_blocks)
    assert sched.decoder.steps == len(counting.rows)  # every step ran compiled
    assert sched.running == 0 and sched.cache.used_blocks == 0
