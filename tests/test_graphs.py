"""Steps replayed from captures (`specdec.graphs`, `--cuda-graphs`), proven on the CPU as far as a CPU
can: the capture is `capture_by_rerun` (a replay reruns the step over the capture's static buffers
and rewrites its static outputs in place, as a CUDA graph does), so what is checked is the buffer
discipline: inputs copied in and padded to the row bucket, outputs cloned out, spans bucketed,
captures reused, dropped with their pool. Capturing real CUDA graphs is `bench/gpu_check.sh`'s."""

from __future__ import annotations

import pytest
import torch

from specdec import Engine, SpecConfig
from specdec.graphs import SPAN_MIN, capture_by_rerun, span_bucket
from specdec.model.errors import ConfigError
from specdec.scheduler import Scheduler
from specdec.sequence import Sequence
from specdec.speculative import SpeculativeDecoder
from tests.test_adaptive import SCRIPT, ScriptedPolicy
from tests.test_speculative import assert_same_or_tie, random_prompts


@pytest.fixture(scope="module")
def engines(f32_ckpt):
    """(eager engine, engine whose steps replay captures by rerun), same weights."""
    eager = Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=160)
    graphed = Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=160)
    graphed.use_cuda_graphs(capture=capture_by_rerun)
    return eager, graphed


def test_span_buckets_are_few():
    assert [span_bucket(n) for n in (1, 2, 64, 65, 128, 129, 1000)] == [SPAN_MIN, SPAN_MIN, 64, 128, 128, 256, 1024]
    assert len({span_bucket(n) for n in range(1, 4097)}) == 7  # 64 … 4096


@pytest.mark.parametrize("spec", [None, SpecConfig(depth=3, adaptive=False), SpecConfig(depth=2, topk=2, nodes=4)],
                         ids=["plain", "chain3", "tree"])
def test_replayed_steps_equal_eager_greedy_as_rows_finish(engines, spec):
    """Rows of different lengths and budgets: finished rows retire and the batch shrinks through
    row buckets; each output equals eager decoding, and the captures are reused across steps."""
    eager, graphed = engines
    prompts = random_prompts(eager.args.vocab_size, [7, 3, 11, 5], seed=8)
    want = eager.generate(prompts, max_new_tokens=24, spec=spec).token_ids
    before = graphed.graphs.captures
    got = graphed.generate(prompts, max_new_tokens=24, spec=spec)
    assert got.token_ids == want
    captured = graphed.graphs.captures - before
    assert 0 < captured < got.stats.verify_steps  # replays reuse captures


def test_outputs_are_copied_out_while_depth_switches(engines):
    """Plain steps between drafting ones keep the verifier states of each plain step for the MTP
    catch-up: a later replay of the same capture must not overwrite what an earlier one returned."""
    eager, graphed = engines
    prompts = random_prompts(eager.args.vocab_size, [7, 3, 11, 5], seed=41)
    plain = eager.generate(prompts, max_new_tokens=30).token_ids
    runs = []
    for engine in (eager, graphed):
        policy = ScriptedPolicy(SCRIPT)
        runs.append(engine.schedule(SpeculativeDecoder(engine, SpecConfig(depth=3), 0.0, 1.0, 0, policy), prompts, 30))
        assert set(policy.ran) == {0, 1, 2, 3}
    (_, want), (out, got) = runs
    assert assert_same_or_tie(eager, prompts, out, plain) == 0
    # drafts from overwritten states would still decode plain's tokens (lossless), accepting fewer
    assert (got.tau, got.depth_steps, got.verify_steps) == (want.tau, want.depth_steps, want.verify_steps)


def test_a_new_pool_drops_the_captures_over_the_old_one(engines):
    eager, graphed = engines
    graphed.release_cache()
    small = random_prompts(eager.args.vocab_size, [4, 6], seed=3)
    graphed.generate(small, max_new_tokens=4, spec=SpecConfig(depth=2, adaptive=False))
    big = random_prompts(eager.args.vocab_size, [5, 9, 7, 6, 8], seed=4)  # more rows: the pool is reallocated
    want = eager.generate(big, max_new_tokens=12, spec=SpecConfig(depth=2, adaptive=False)).token_ids
    assert graphed.generate(big, max_new_tokens=12, spec=SpecConfig(depth=2, adaptive=False)).token_ids == want
    assert graphed.graphs.held <= 3  # only captures over the new 5-row pool: buckets 5/2/1, one span


def test_replayed_steps_over_a_paged_pool_equal_eager_through_joins_leaves_and_chunks(engines):
    """The server's loop over a paged pool: sequences join and leave, long prompts are prefilled in
    chunks in the pool's last row (which a padded bucket covers); each output equals eager greedy
    decoding of its prompt alone."""
    eager, graphed = engines
    prompts = random_prompts(eager.args.vocab_size, [5, 23, 6, 31, 4, 9], seed=17)
    budgets = [14, 10, 12, 8, 16, 6]
    want = [eager.generate([p], max_new_tokens=n).token_ids[0] for p, n in zip(prompts, budgets)]
    sched = Scheduler(graphed, SpecConfig(depth=2), max_rows=3, prefill_tokens=8, cache_tokens=192, block_size=8)
    seqs = [Sequence(p, n) for p, n in zip(prompts, budgets)]
    sched.generate_all(seqs, timeout_s=300)
    assert [s.output for s in seqs] == want
    assert sched.running == 0 and sched.cache.used_blocks == 0


def test_cuda_graphs_are_refused_off_cuda(f32_ckpt):
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device"):
        Engine.from_pretrained(f32_ckpt, device="cpu", max_seq_len=32, cuda_graphs=True)
    eng = Engine.from_pretrained(f32_ckpt, device="cpu", max_seq_len=32)
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device"):
        eng.use_cuda_graphs()


def test_a_replay_leaves_what_earlier_replays_returned(engines):
    """Two plain steps through one capture: the first step's outputs (the verifier state the MTP
    catch-up reads later) are the caller's copies, not the capture's outputs the second rewrites."""
    from specdec.steps import StepRows, StepShape

    _, graphed = engines
    graphed.release_cache()
    view = graphed.cache_for(2, 32).step_view(graphed.span_for(9))
    shape = StepShape(0)

    def rows(pending):
        return StepRows(torch.tensor([5, 7]), torch.tensor(pending), None, None, torch.zeros(2), torch.ones(2))

    with torch.inference_mode():
        first = graphed.run_step(view, rows([11, 12]), shape)
        kept = first.verifier_hidden.clone()
        second = graphed.run_step(view, rows([300, 301]), shape)
    assert not torch.equal(second.verifier_hidden, kept)
    assert torch.equal(first.verifier_hidden, kept)
