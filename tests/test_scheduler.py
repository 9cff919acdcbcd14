"""Continuous batching: sequences join and leave the one decoding loop between steps, each with its
own settings, and every output stays what plain decoding of that prompt alone gives."""

import pytest
import torch

from specdec.model.errors import ConfigError
from specdec import SpecConfig
from specdec.scheduler import NotAccepting, QueueFull, Scheduler
from specdec.sequence import Sequence
from tests.test_speculative import assert_same_or_tie, chi_square, eng, exact_joint, random_prompts, tiny  # noqa: F401


def assert_each_equals_decoding_alone(eng, prompts, settings, seqs, max_new_tokens: int) -> None:
    """Each sequence's output equals `Engine.generate` of its prompt alone with its (temperature, top_p,
    seed): greedy ones up to logit ties (none allowed here), sampled ones exactly."""
    for p, (t, tp, seed), seq in zip(prompts, settings, seqs):
        plain = eng.generate([p], max_new_tokens=max_new_tokens, temperature=t, top_p=tp, seed=seed).token_ids
        if t == 0:
            assert assert_same_or_tie(eng, [p], [seq.output], plain) == 0
        else:
            assert seq.output == plain[0]


@pytest.mark.parametrize("spec", [None, SpecConfig(depth=3), SpecConfig(depth=2, adaptive=False)])
def test_greedy_equals_plain_through_joins_and_leaves(eng, spec):
    """Eight prompts of different lengths and budgets through three rows: sequences join while
    others run and leave at different steps; each equals plain greedy decoding of it alone."""
    prompts = random_prompts(eng.args.vocab_size, [7, 3, 11, 5, 9, 4, 13, 6], seed=21)
    budgets = [5, 17, 9, 30, 2, 12, 21, 8]
    sched = Scheduler(eng, spec, max_rows=3, prefill_tokens=12)
    seqs = [Sequence(p, n) for p, n in zip(prompts, budgets)]
    joined_while_running = []
    original_admit = sched.decoder.admit

    def admit(joining):
        if joining:
            joined_while_running.append(len(sched.decoder.running))
        original_admit(joining)

    sched.decoder.admit = admit
    sched.generate_all(seqs, timeout_s=600)
    assert any(n > 0 for n in joined_while_running)  # some joined a batch already decoding
    ties = 0
    for p, n, s in zip(prompts, budgets, seqs):
        plain = eng.generate([p], max_new_tokens=n).token_ids
        ties += assert_same_or_tie(eng, [p], [s.output], plain)
        assert s.finish_reason in ("length", "stop")
    assert ties <= 1
    assert sched.running == 0 and sched.cache.used_blocks == 0


def test_sampled_and_greedy_rows_mix(eng):
    """Greedy and sampled sequences (own temperature, top-p, seed) in one batch: each equals plain
    decoding of its prompt alone with its settings (the draw of output i depends only on its seed
    and i)."""
    prompts = random_prompts(eng.args.vocab_size, [6, 8, 5, 10, 7], seed=33)
    settings = [(0.0, 1.0, 0), (0.9, 1.0, 11), (0.7, 0.8, 12), (0.0, 1.0, 0), (1.2, 0.95, 13)]
    sched = Scheduler(eng, SpecConfig(depth=3), max_rows=4)
    seqs = [Sequence(p, 16, t, tp, s) for p, (t, tp, s) in zip(prompts, settings)]
    sched.generate_all(seqs, timeout_s=600)
    assert_each_equals_decoding_alone(eng, prompts, settings, seqs, 16)


def test_sampled_distribution_holds_while_others_join_and_leave(tiny):
    """Samples of one prompt (each its own seed) decoded among greedy sequences that join and leave:
    their pooled first three tokens follow the verifier's distribution (chi-square)."""
    prompt, n = [3, 5, 2, 7], 3
    others = random_prompts(8, [4, 6, 5, 3], seed=2)
    seqs, samples = [], []
    for i in range(900):
        s = Sequence(prompt, n, 1.0, 1.0, 1000 + i)
        samples.append(s)
        seqs.append(s)
        if i % 7 == 0:  # a greedy sequence of another length now and then
            seqs.append(Sequence(others[i % 4], 1 + i % 5))
    sched = Scheduler(tiny, SpecConfig(depth=2), max_rows=16)
    sched.generate_all(seqs, timeout_s=600)
    counts = torch.zeros([8] * n)
    for s in samples:
        counts[tuple(s.output)] += 1
    stat, crit = chi_square(counts, exact_joint(tiny, prompt, n, 1.0, 1.0))
    assert stat < crit, (stat, crit)


def test_cancelled_sequences_free_their_rows(eng):
    """Sequences finished by their client (cancelled) leave at the next step; waiting ones that were
    cancelled never run; all rows are free afterwards."""
    prompts = random_prompts(eng.args.vocab_size, [5, 6, 7, 8], seed=4)
    sched = Scheduler(eng, SpecConfig(depth=2), max_rows=2)
    seqs = [Sequence(p, 40) for p in prompts]

    def cancel_after_three(seq, tokens):
        if len(seq.output) >= 3:
            seq.finish("cancelled")

    seqs[0].on_tokens = cancel_after_three
    seqs[3].finish("cancelled")  # gone before it was admitted
    sched.generate_all(seqs, timeout_s=600)
    assert seqs[0].finish_reason == "cancelled" and 3 <= len(seqs[0].output) < 40
    assert seqs[3].output == [] and seqs[3].first_token_s is None
    assert [s.finish_reason for s in seqs[1:3]] == ["length", "length"]
    assert sched.running == 0 and sched.cache.used_blocks == 0


@pytest.mark.parametrize("spec", [None, SpecConfig(depth=3), SpecConfig(depth=2, adaptive=False),
                                  SpecConfig(depth=2, topk=2, nodes=4)])
def test_preempted_sequences_resume_unchanged(eng, spec):
    """A pool too small for the batch: the newest sequences are preempted (blocks back to the pool),
    queued again and recomputed; every output, greedy or sampled, equals decoding its prompt alone,
    and no block stays allocated."""
    prompts = random_prompts(eng.args.vocab_size, [9, 6, 12, 7, 10, 8], seed=41)
    settings = [(0.0, 1.0, 0), (0.9, 1.0, 5), (0.0, 1.0, 0), (0.8, 0.9, 6), (0.0, 1.0, 0), (1.1, 1.0, 7)]
    sched = Scheduler(eng, spec, max_rows=4, cache_tokens=96, block_size=8)
    seqs = [Sequence(p, 30, t, tp, sd) for p, (t, tp, sd) in zip(prompts, settings)]
    dec, checked = sched.decoder, []
    n_slots = dec.step_span

    def checked_n_slots(shape):  # steps size attention from the sequences, never reading the lengths back
        checked.append([s.context_len for s in dec.running] == dec.cache.lengths[:len(dec.running)].tolist())
        return n_slots(shape)

    dec.step_span = checked_n_slots
    sched.generate_all(seqs, timeout_s=600)
    assert checked and all(checked)
    assert sched.preemptions > 0 and any(s.preemptions for s in seqs)
    assert_each_equals_decoding_alone(eng, prompts, settings, seqs, 30)
    assert sched.running == 0 and sched.cache.used_blocks == 0 and sched.cache.free_blocks == 12


@pytest.mark.parametrize("spec", [None, SpecConfig(depth=3), SpecConfig(depth=3, topk=2, nodes=5)])
def test_chunked_prefill_keeps_outputs_and_streams_flowing(eng, spec):
    """Contexts longer than the round's prefill budget are prefilled a chunk per round in a row of
    their own while the others keep stepping; every output (greedy and sampled) equals decoding that
    prompt alone, also when the pool is small enough to preempt."""
    prompts = random_prompts(eng.args.vocab_size, [5, 23, 6, 31, 4], seed=17)
    settings = [(0.0, 1.0, 0), (0.0, 1.0, 0), (0.9, 1.0, 3), (0.8, 0.9, 4), (0.0, 1.0, 0)]
    sched = Scheduler(eng, spec, max_rows=4, prefill_tokens=8, cache_tokens=128, block_size=8)
    seqs = [Sequence(p, 24, t, tp, sd) for p, (t, tp, sd) in zip(prompts, settings)]
    chunks, steps_during = [], []
    original = sched.decoder.prefill_chunk

    def prefill_chunk(budget):
        n = original(budget)
        if n:
            chunks.append(n)
            steps_during.append(len(sched.decoder.running))
        return n

    sched.decoder.prefill_chunk = prefill_chunk
    sched.generate_all(seqs, timeout_s=600)
    assert max(chunks) <= 8 and sum(chunks) >= 23 + 31  # the two long prompts went in chunks
    assert any(n > 0 for n in steps_during)  # others decoded meanwhile
    assert_each_equals_decoding_alone(eng, prompts, settings, seqs, 24)
    assert sched.running == 0 and sched.cache.used_blocks == 0 and sched.decoder.prefilling is None


def test_a_long_prompt_is_chunked_even_with_one_row(eng):
    """With a single row a context longer than the prefill budget still gets its row and is chunked."""
    prompt = random_prompts(eng.args.vocab_size, [20], seed=9)[0]
    sched = Scheduler(eng, SpecConfig(depth=2), max_rows=1, prefill_tokens=8)
    seq = Sequence(prompt, 6)
    sched.generate_all([seq], timeout_s=120)
    assert_each_equals_decoding_alone(eng, [prompt], [(0.0, 1.0, 0)], [seq], 6)
    assert sched.cache.used_blocks == 0


def test_admission_waits_for_blocks(eng):
    """A sequence joins only when the pool has blocks for its context and first step; one that could
    never fit the pool alone is refused at submission."""
    sched = Scheduler(eng, SpecConfig(depth=2), max_rows=4, cache_tokens=64, block_size=8)
    with pytest.raises(ConfigError, match="context of 64"):
        sched.submit(Sequence(list(range(3, 40)), 30))
    prompts = random_prompts(eng.args.vocab_size, [30, 30, 30], seed=5)
    for p in prompts:
        sched.submit(Sequence(p, 4))
    joining, chunked = sched.take_admissible()
    assert len(joining) == 1 and chunked is None  # 30 + 3 slots = 5 blocks each: the second does not fit the other 3
    assert len(sched.waiting) == 2


def test_limits_are_clear_errors(eng):
    sched = Scheduler(eng, None, max_rows=1, max_waiting=1)
    with pytest.raises(ConfigError, match="exceeds the context"):
        sched.submit(Sequence([5] * 10, eng.max_seq_len))
    sched.submit(Sequence([5, 6], 4))
    with pytest.raises(QueueFull):
        sched.submit(Sequence([5, 6], 4))
    sched.drain()
    with pytest.raises(NotAccepting):
        sched.submit(Sequence([5, 6], 4))
    sched.run()  # drains: the queued sequence runs to its end, then run returns
    assert sched.running == 0 and not sched.waiting


def test_static_batching_admits_only_into_an_empty_batch(eng):
    """The benchmark's baseline: a batch runs until its last sequence ends before others join."""
    prompts = random_prompts(eng.args.vocab_size, [5, 6, 7, 8, 9], seed=8)
    sched = Scheduler(eng, SpecConfig(depth=2), max_rows=2, static=True)
    seqs = [Sequence(p, n) for p, n in zip(prompts, [3, 20, 4, 4, 6])]
    sizes = []
    original_admit = sched.decoder.admit

    def admit(joining):
        if joining:
            sizes.append((len(sched.decoder.running), len(joining)))
        original_admit(joining)

    sched.decoder.admit = admit
    sched.generate_all(seqs, timeout_s=600)
    assert sizes == [(0, 2), (0, 2), (0, 1)]
    for p, s in zip(prompts, seqs):
        assert assert_same_or_tie(eng, [p], [s.output], eng.generate([p], max_new_tokens=s.max_new_tokens).token_ids) == 0


@pytest.mark.parametrize("spec", [None, SpecConfig(depth=3), SpecConfig(depth=2, topk=2, adaptive=False)])
def test_engine_generate_runs_through_the_scheduler_with_rows_refilled(eng, spec):
    """`Engine.generate(max_batch=2)`: five prompts through two rows, the others joining as rows
    finish, give what decoding all five at once gives (greedy up to logit ties; sampled draws are
    keyed by seed, stream and position, so exactly), and the stats count every prompt's tokens."""
    prompts = random_prompts(eng.args.vocab_size, [7, 3, 11, 5, 9], seed=27)
    joined = []
    original = Scheduler.for_batch.__func__

    def spy(cls, engine, decoder, max_rows, n_sequences, prefill_tokens):
        sched = original(cls, engine, decoder, max_rows, n_sequences, prefill_tokens)
        admit = decoder.admit
        decoder.admit = lambda seqs: (joined.append((len(decoder.running), len(seqs))),
                                      admit(seqs))
        return sched

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "for_batch", classmethod(spy))
        capped = eng.generate(prompts, max_new_tokens=14, spec=spec, max_batch=2)
    assert joined[0] == (0, 2) and any(running > 0 for running, _ in joined[1:])  # later prompts joined a live batch
    whole = eng.generate(prompts, max_new_tokens=14, spec=spec)
    assert assert_same_or_tie(eng, prompts, capped.token_ids, whole.token_ids) <= 1
    assert capped.stats.tokens == sum(map(len, capped.token_ids)) and capped.stats.batch_size == 5
    sampled = dict(max_new_tokens=14, temperature=0.8, top_p=0.9, seed=5)
    if spec is None or spec.topk == 1:  # one-hot drafts: draws keyed by position (trees draw more)
        assert (eng.generate(prompts, spec=spec, max_batch=2, **sampled).token_ids
                == eng.generate(prompts, spec=None, **sampled).token_ids)


def test_engine_generate_rejects_a_max_batch_below_one(eng):
    with pytest.raises(ConfigError, match="max_batch must be >= 1"):
        eng.generate([[3, 4]], max_new_tokens=2, max_batch=0)
