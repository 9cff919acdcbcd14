"""Adaptive speculation (`specdec.adaptive`): the policy's choices, and losslessness while the
draft depth changes from step to step (greedy equality, sampled distribution)."""

from __future__ import annotations

import math

import pytest
import torch

from specdec import SpecConfig
from specdec.adaptive import (CATCH_UP, CONFIDENCE, FIRST_REVISIT, MAX_REVISIT, MIN_SAMPLES, PROMPT_CATCH_UP,
                              AcceptanceEstimate, SpeculationPolicy, StepCosts, median_error, row_bucket)
from specdec.sequence import Sequence
from specdec.speculative import SpeculativeDecoder
from tests.test_speculative import assert_same_or_tie, chi_square, eng, exact_joint, random_prompts, tiny  # noqa: F401


class ScriptedPolicy:
    """Forces the depth of every step from a repeating script (the switching under test)."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.i, self.ran = script, 0, []

    def choose(self, rows: int, horizon: float = float("inf"), catch_up: int | None = None,
               deepest: int | None = None) -> int:
        depth = self.script[self.i % len(self.script)]
        self.i += 1
        return depth

    def observe(self, depth: int, rows: int, seconds: float, n_accepted: list[int]) -> None:
        self.ran.append(depth)

    def observe_catch_up(self, rows: int, seconds: float, kind: int = CATCH_UP) -> None:
        pass


SCRIPT = [3, 0, 0, 1, 2, 0, 3, 3, 1, 0]  # plain runs of 1 and 2 steps between every depth


# ----------------------------------------------------------------------------- lossless switching


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_plain_while_depth_switches(eng, tiny, batch):
    ties = 0
    for engine, vocab in ((eng, eng.args.vocab_size), (tiny, 8)):
        prompts = random_prompts(vocab, [7, 3, 11, 5][:batch], seed=40 + batch)
        plain = engine.generate(prompts, max_new_tokens=30).token_ids
        policy = ScriptedPolicy(SCRIPT)
        out, stats = engine.schedule(SpeculativeDecoder(engine, SpecConfig(depth=3), 0.0, 1.0, 0, policy), prompts,
                                     30)
        ties += assert_same_or_tie(engine, prompts, out, plain)
        assert set(policy.ran) == {0, 1, 2, 3}
        assert stats.depth_steps == [policy.ran.count(d) for d in range(4)]
        assert [sum(by_rows) for by_rows in stats.rows_steps] == stats.depth_steps
        assert max(len(by_rows) for by_rows in stats.rows_steps) == batch + 1  # every row live at the start
        assert stats.tokens == sum(map(len, out))
    assert ties <= 1


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_tokens_equal_plain_sampling_while_depth_switches(eng, tiny, temperature, top_p):
    """One-hot drafts: a node's draw uses the uniform of the output position it would fill, so
    speculative sampling emits plain sampling's tokens for the same seed, whatever the depths."""
    for engine, vocab in ((eng, eng.args.vocab_size), (tiny, 8)):
        prompts = random_prompts(vocab, [7, 3, 11, 5], seed=60)
        plain = engine.generate(prompts, max_new_tokens=30, temperature=temperature, top_p=top_p, seed=9).token_ids
        policy = ScriptedPolicy(SCRIPT)
        decoder = SpeculativeDecoder(engine, SpecConfig(depth=3), temperature, top_p, 9, policy)
        out, _ = engine.schedule(decoder, prompts, 30)
        assert out == plain
        again = engine.generate(prompts, max_new_tokens=30, temperature=temperature, top_p=top_p, seed=9,
                                spec=SpecConfig(depth=3))  # the measured policy: a seed reproduces too
        assert again.token_ids == plain
    other = eng.generate(prompts[:1], max_new_tokens=30, temperature=temperature, top_p=top_p, seed=10).token_ids
    assert other != plain[:1]  # the seed matters


def test_mtp_cache_after_plain_steps_equals_a_fresh_pass(eng):
    """After a run of plain steps, the catch-up leaves the MTP cache rows as a from-scratch MTP pass
    over the whole sequence would: drafting after a switch sees what it would have seen."""
    prompts = random_prompts(eng.args.vocab_size, [6, 9], seed=3)
    dec = SpeculativeDecoder(eng, SpecConfig(depth=2), 0.0, 1.0, 0, ScriptedPolicy([0, 0, 0, 2]))
    out, _ = eng.schedule(dec, prompts, 13)  # 1 prefill token + 3 plain steps + a depth-2 step + ...
    with torch.inference_mode():
        cache = dec.cache  # the pool the loop decoded in (cache_for below may reallocate)
        live_kv = cache.kv[-1].clone()  # the MTP layer's rows as the loop left them
        lengths = cache.lengths[:2].clone()
    fresh = SpeculativeDecoder(eng, SpecConfig(depth=2, adaptive=False), 0.0, 1.0, 0)
    full = [p + o[:-1] for p, o in zip(prompts, out)]  # every committed token (the last is pending)
    fresh.use_cache(eng.cache_for(2, 40))
    fresh.admit([Sequence(p, 1 << 20, 0.0, 1.0, 0, r) for r, p in enumerate(full)])  # prefill: verifier, then MTP
    with torch.inference_mode():
        fresh_kv = fresh.cache.kv[-1]
        for r in range(2):
            n = int(lengths[r]) - 1  # positions whose pair (h_i, x_{i+1}) both runs know
            torch.testing.assert_close(live_kv[r, :n], fresh_kv[r, :n], rtol=1e-4, atol=1e-5)


def test_rows_that_finish_before_the_first_draft_leave_the_deferred_prefill_consistent(eng):
    """The MTP prefill over the prompts waits for the first drafting step; a row that finishes in
    the plain steps before it leaves the loop with its share, and the others still decode as plain."""
    prompts = random_prompts(eng.args.vocab_size, [6, 9, 4], seed=21)
    budgets = [2, 14, 9]
    plain = [eng.generate([p], max_new_tokens=n).token_ids[0] for p, n in zip(prompts, budgets)]
    policy = ScriptedPolicy([0, 0, 0, 2, 1, 0, 3])
    dec = SpeculativeDecoder(eng, SpecConfig(depth=3), 0.0, 1.0, 0, policy)
    dec.use_cache(eng.cache_for(3, 40))
    seqs = [Sequence(p, n) for p, n in zip(prompts, budgets)]
    dec.admit(seqs)
    assert dec.state.prompt is not None  # deferred: nothing drafted yet
    while dec.running:
        dec.step()
    assert policy.ran[:4] == [0, 0, 0, 2]
    assert_same_or_tie(eng, prompts, [s.output for s in seqs], plain)


@pytest.mark.parametrize("mode, temperature, top_p", [("onehot", 1.0, 1.0), ("sample", 0.8, 0.9)])
def test_sampled_distribution_holds_while_depth_switches(tiny, mode, temperature, top_p):
    """Three tokens: the prefill's, then two steps. Batches run every order of plain and draft
    steps (plain → drafts exercises the MTP catch-up); their pooled samples must follow p."""
    prompt = [3, 5, 2, 7]
    n, rows = 3, 1200
    counts = torch.zeros([8] * n)
    ran = set()
    for i, script in enumerate(([0, 1], [0, 2], [1, 0], [2, 0], [0, 0])):
        policy = ScriptedPolicy(script)
        spec = SpecConfig(depth=2, draft_mode=mode)
        decoder = SpeculativeDecoder(tiny, spec, temperature, top_p, 13 + i, policy)
        out, _ = tiny.schedule(decoder, [prompt] * rows, n)
        for toks in out:
            counts[tuple(toks)] += 1
        ran.add(tuple(policy.ran))
    stat, crit = chi_square(counts, exact_joint(tiny, prompt, n, temperature, top_p))
    assert ran == {(0, 1), (0, 2), (1, 0), (2, 0), (0, 0)}  # some of the 1,200 rows always need a second step
    assert stat < crit, (stat, crit)


# ----------------------------------------------------------------------------- the policy's choices


def held(policy: SpeculationPolicy, rows: int) -> int:
    """The depth the policy settles on for its next step at `rows` rows (`choose` may run a probe instead)."""
    policy.choose(rows)
    return policy.settled[row_bucket(rows)]


def costs(plain: float, per_depth: list[float], buckets=(1, 2, 4), catch_up: float | None = None) -> StepCosts:
    """Imposed step costs (and, given, the MTP catch-up's after a plain stretch) in every bucket."""
    table = {}
    for b in buckets:
        table[(0, b)] = plain
        for d, c in enumerate(per_depth, start=1):
            table[(d, b)] = c
        if catch_up is not None:
            table[(CATCH_UP, b)] = catch_up
    return StepCosts(fixed=table)


def test_speculation_that_does_not_pay_decodes_plainly(eng, monkeypatch):
    """Measured costs say every draft depth loses: the run is plain steps only, equals plain, and
    never runs the drafter (its prefill over the prompts waits for a drafting step that never comes)."""
    spec = SpecConfig(depth=3)
    eng.cost_tables[eng.cost_key(spec)] = costs(1.0, [50.0, 60.0, 70.0])
    known = eng.policy_for(spec).acceptance
    for _ in range(10):
        known.add([1, 2, 0, 3], 3)  # acceptance already measured (else the first steps draft deep to learn it)
    drafter_calls = []
    drafter = eng.run_drafter
    monkeypatch.setattr(eng, "run_drafter", lambda *a, **k: drafter_calls.append(1) or drafter(*a, **k))
    try:
        prompts = random_prompts(eng.args.vocab_size, [5, 8], seed=9)
        n = FIRST_REVISIT - 4  # shorter than the first revisit of a draft depth
        out = eng.generate(prompts, max_new_tokens=n, spec=spec)
        plain = eng.generate(prompts, max_new_tokens=n)
    finally:
        del eng.cost_tables[eng.cost_key(spec)], eng.policies[eng.cost_key(spec)]
    assert out.stats.depth_steps == [n - 1, 0, 0, 0]
    assert out.stats.tau == 1.0 and out.token_ids == plain.token_ids
    assert drafter_calls == []


def test_sampled_drafts_adapt_too(eng):
    """Drafts sampled from q (T > 0) are chosen per step like one-hot ones, from their own measured
    costs: where drafting loses, every step is plain (and then the output is plain seeded sampling's,
    whose draws are keyed by position); where it is free, steps draft deep."""
    spec = SpecConfig(depth=3, draft_mode="sample")
    assert spec.adapts and not SpecConfig(depth=3, draft_mode="sample", adaptive=False).adapts
    key = eng.cost_key(spec, sampled=True)
    assert key != eng.cost_key(SpecConfig(depth=3), sampled=True)  # sampled drafts cost more: own table
    prompts = random_prompts(eng.args.vocab_size, [5, 8], seed=9)
    n = FIRST_REVISIT - 4
    depth_steps = {}
    for label, per_depth in (("dear", [50.0, 60.0, 70.0]), ("free", [1.0, 1.0, 1.0])):
        eng.cost_tables[key] = costs(1.0, per_depth)
        known = eng.policy_for(spec, sampled=True).acceptance
        for _ in range(20):
            known.add([3, 3, 2, 3], 3)
        try:
            out = eng.generate(prompts, max_new_tokens=n, temperature=0.8, seed=4, spec=spec)
        finally:
            del eng.cost_tables[key], eng.policies[key]
        depth_steps[label] = out.stats.depth_steps
        if label == "dear":
            assert out.token_ids == eng.generate(prompts, max_new_tokens=n, temperature=0.8, seed=4).token_ids
    assert depth_steps["dear"] == [n - 1, 0, 0, 0]
    assert depth_steps["free"][0] <= 1 and depth_steps["free"][3] > 0


def test_cheap_speculation_runs_deep(eng):
    """Drafting for free, with drafts seen accepted (this checkpoint's random weights accept none of
    their own, and with none accepted drafting cannot be shown to pay): every step drafts 3 deep."""
    spec = SpecConfig(depth=3)
    eng.cost_tables[eng.cost_key(spec)] = costs(1.0, [1.0, 1.0, 1.0])
    known = eng.policy_for(spec).acceptance
    for _ in range(20):
        known.add([3, 3, 3, 2], 3)
    try:
        out = eng.generate(random_prompts(eng.args.vocab_size, [5], seed=2), max_new_tokens=24, spec=spec)
    finally:
        del eng.cost_tables[eng.cost_key(spec)]
        eng.policies.pop(eng.cost_key(spec), None)
    # deepest is best at equal cost, except in the last steps: a row with n tokens left drafts n - 1
    assert out.stats.depth_steps[3] >= out.stats.verify_steps - 3 and out.stats.depth_steps[0] <= 1


def test_no_step_drafts_more_than_a_row_can_keep():
    """With n tokens left a row keeps at most n of a step's depth + 1: the choice is cut to n - 1."""
    policy = SpeculationPolicy(3, costs(1.0, [1.0, 1.0, 1.0]))
    for _ in range(20):
        policy.acceptance.add([3, 3], 3)
    assert [policy.choose(2, deepest=d) for d in (None, 5, 2, 1, 0)] == [3, 3, 2, 1, 0]
    kept_on = SpeculationPolicy(3, costs(1.0, [1.0, 1.0, 1.0]), min_depth=1)
    kept_on.acceptance = policy.acceptance
    assert kept_on.choose(2, deepest=0) == 1  # speculation pinned on stays on


def test_choice_follows_measured_costs_and_acceptance():
    policy = SpeculationPolicy(3, costs(1.0, [1.2, 1.5, 1.9]))
    for _ in range(40):  # drafts 1 and 2 always accepted, draft 3 never
        policy.acceptance.add([2, 2], 3)
    # tau(1) = 2, tau(2) = 3, tau(3) ≈ 3: rate 1.67, 2.0, 1.58 per cost unit, plain 1.0
    assert policy.choose(2) == 2
    policy = SpeculationPolicy(3, costs(1.0, [2.5, 3.5, 4.5]))
    for _ in range(40):
        policy.acceptance.add([2, 2], 3)
    assert policy.choose(2) == 0  # every depth is slower per token than a plain step


def test_unknown_acceptance_drafts_deep_and_carries_over_calls(eng):
    policy = SpeculationPolicy(3, costs(1.0, [2.0, 3.0, 4.0]))
    assert policy.choose(1) == 3  # costs known, acceptance not: learn it at every position
    for _ in range(5):
        policy.observe(3, 1, 4.0, [0])
    assert policy.choose(1) == 0  # five drafts rejected at position 1: plain is faster
    spec = SpecConfig(depth=3)
    eng.policies.pop(eng.cost_key(spec), None)
    eng.generate(random_prompts(eng.args.vocab_size, [5], seed=2), max_new_tokens=12, spec=spec)
    kept = eng.policies[eng.cost_key(spec)]
    assert kept.acceptance.reached[0] > 0 and kept.steps > 0  # kept by the engine for its next call
    eng.generate(random_prompts(eng.args.vocab_size, [5], seed=3), max_new_tokens=12, spec=spec)
    assert eng.policies[eng.cost_key(spec)] is kept and kept.steps > 11  # its clock runs on across calls
    eng.policies.pop(eng.cost_key(spec))


def test_unmeasured_depths_are_explored_deepest_first_then_revisited():
    policy = SpeculationPolicy(2, StepCosts())
    order = []
    for _ in range(3 * MIN_SAMPLES):
        d = policy.choose(1)
        order.append(d)
        policy.observe(d, 1, {0: 1.0, 1: 5.0, 2: 9.0}[d], [0] if d else [])
    assert order == [2] * MIN_SAMPLES + [1] * MIN_SAMPLES + [0] * MIN_SAMPLES
    run = []
    for _ in range(3 * MAX_REVISIT):
        d = policy.choose(1)
        run.append(d)
        policy.observe(d, 1, {0: 1.0, 1: 5.0, 2: 9.0}[d], [0] if d else [])
    assert run.count(0) >= len(run) - 6  # plain wins; draft depths only come back as revisits
    assert 1 <= run.count(1) <= 3 and 1 <= run.count(2) <= 3
    assert set(run[4:3 * FIRST_REVISIT]) == {0}  # (after learning the acceptance) a revisit costs 4-8 plain steps


def test_revisits_are_spaced_by_what_they_cost():
    """A depth that loses little to the best is revisited after FIRST_REVISIT steps; one whose revisit
    costs several best steps (with the MTP catch-up it needs after plain steps) only every few
    hundred (its revisits stay within REVISIT_BUDGET)."""
    def revisits(cost_of_depth_1: float, steps: int, catch_up: float = 0.01) -> list[int]:
        policy = SpeculationPolicy(1, costs(1.0, [cost_of_depth_1], catch_up=catch_up))
        for _ in range(20):
            policy.acceptance.add([0, 0], 1)  # drafts rejected: tau(1) = 1 plus the prior's share
        at = []
        for step in range(steps):
            d = policy.choose(1)
            if d:
                at.append(step)
            policy.observe(d, 1, 0.0, [0] if d else [])
        return at

    assert revisits(1.05, 2 * FIRST_REVISIT)[0] == FIRST_REVISIT  # a revisit loses ~3% of a step
    costly = revisits(3.0, MAX_REVISIT + 1)  # a revisit loses ~2 steps: ~200 steps apart
    gaps = [b - a for a, b in zip([-1] + costly, costly)]
    assert 1 <= len(costly) <= 3 and min(gaps) >= 150
    slow_catch_up = revisits(1.05, MAX_REVISIT + 1, catch_up=2.0)  # cheap step, dear catch-up
    assert 1 <= len(slow_catch_up) <= 3 and slow_catch_up[0] >= 150


def test_a_revisit_due_while_the_prompts_wait_for_the_drafter_waits_for_their_price():
    """Plain decoding settled; a revisit of depth 1 from plain steps costs a catch-up of 0.1 step,
    but while the call's prompts still wait for the MTP prefill (measured: 3 steps) it costs 3
    steps more, so it waits until its share of the time is REVISIT_BUDGET again."""
    table = costs(1.0, [1.05], catch_up=0.1)
    for b in (1, 2, 4):
        table.fixed[(PROMPT_CATCH_UP, b)] = 3.0
    def revisits(catch_up: int) -> list[int]:
        policy = SpeculationPolicy(1, table)
        for _ in range(20):
            policy.acceptance.add([0, 0], 1)
        at = []
        for step in range(MAX_REVISIT + 1):
            if policy.choose(1, 1000.0, catch_up):
                at.append(step)
            policy.observe(0, 1, 0.0, [])
        return at

    assert revisits(CATCH_UP)[0] == FIRST_REVISIT
    prompts_waiting = revisits(PROMPT_CATCH_UP)
    assert prompts_waiting and prompts_waiting[0] >= 300


def test_acceptance_estimate_is_conditional_per_position():
    est = AcceptanceEstimate(3)
    for _ in range(200):
        est.add([0, 1, 3, 3], 3)  # position 1: 3/4 accepted; position 2: 2 of 3 reached; position 3: 2 of 2
    assert est.conditional(0) == pytest.approx(0.75, abs=0.02)
    assert est.conditional(1) == pytest.approx(2 / 3, abs=0.02)
    assert est.conditional(2) == pytest.approx(1.0, abs=0.03)
    assert est.expected_tokens(0) == 1.0
    assert est.expected_tokens(2) == pytest.approx(1 + 0.75 + 0.5, abs=0.03)


def test_a_position_not_drafted_keeps_its_estimate():
    """Steps of depth 2 leave position 3's estimate what depth-3 steps measured (decayed toward the
    prior, it priced depth 3 out and held depth 2), on a fading weight."""
    est = AcceptanceEstimate(3)
    for _ in range(100):
        est.add([3, 3, 3, 1], 3)  # position 3: always accepted when reached; position 2: 3 of 4
    before = est.conditional(2)
    for _ in range(200):
        est.add([2, 0, 2, 2], 2)
    assert est.conditional(2) == pytest.approx(before, rel=1e-9) and before > 0.9
    assert est.reached[2] < 1.0  # but on little weight now: a wide error, so the policy probes depth 3
    # positions 1 and 2 follow the new steps (before: 1.0 and 0.75)
    assert est.conditional(0) == pytest.approx(0.75, abs=0.02) and est.conditional(1) == pytest.approx(1.0, abs=0.02)


def test_row_buckets():
    assert [row_bucket(r) for r in (1, 2, 3, 4, 7, 8, 9, 16, 31)] == [1, 2, 2, 4, 4, 8, 8, 16, 16]


def test_step_costs_persist_per_key(tmp_path):
    path = tmp_path / "costs.json"
    a = StepCosts(path, "machine A")
    for s in (3.0, 1.0, 2.0):
        a.add(1, 3, s)
    a.save()
    assert StepCosts(path, "machine A").cost(1, 2) == 1.0  # same bucket (2..3 rows), lower quartile
    assert StepCosts(path, "machine B").cost(1, 2) is None


def test_a_burst_of_slow_timings_does_not_price_a_depth_out():
    """Depth 3 at batch 1 timed five times while another job shared the CPU (78-215 ms, as seen
    on a 2-core VM) and four times alone (about 23 ms). Its cost stays the machine's own, so the
    policy keeps drafting 3 deep (a median said 78 ms, and the policy ran depth 2 instead)."""
    costs = StepCosts()
    for depth, timings_ms in [(0, (12.7, 12.8, 13.2, 12.6)), (1, (17.0, 17.4, 16.8, 17.1)),
                              (2, (20.1, 19.8, 20.4, 20.0)),
                              (3, (78.3, 82.5, 163.1, 215.4, 202.7, 22.8, 23.1, 23.5, 22.9))]:
        for ms in timings_ms:
            costs.add(depth, 1, ms / 1e3)
    assert costs.cost(3, 1) == pytest.approx(0.0231)
    policy = SpeculationPolicy(3, costs)
    for _ in range(60):  # the first draft accepted 90% of the time, the later ones always after it
        policy.acceptance.add([3] * 9 + [0], 3)
    assert policy.choose(1) == 3


def test_drafting_must_beat_plain_by_its_measured_uncertainty():
    """With exact costs, the uncertainty is the acceptance's: drafting runs only when predicted
    faster than plain by CONFIDENCE standard errors of τ; once it runs, plain decoding takes over as
    soon as it is predicted faster at all."""
    table = costs(1.0, [1.5, 9.0, 9.0])
    policy = SpeculationPolicy(3, table)
    for _ in range(40):
        policy.acceptance.add([1, 0], 3)  # position 1 accepted about half the time
    tau1, error = policy.acceptance.expected_tokens(1), policy.acceptance.tau_error(1)
    assert 0.02 < error < 0.2  # about 66 decayed drafts seen at position 1
    table.fixed[(1, 1)] = tau1  # depth 1 exactly as fast per token as plain: plain
    assert policy.choose(1) == 0
    table.fixed[(1, 1)] = tau1 / (1 + CONFIDENCE * error / 2)  # faster by half the confidence: plain
    assert policy.choose(1) == 0
    table.fixed[(1, 1)] = tau1 / (1 + 1.5 * CONFIDENCE * error)  # clearly faster: depth 1, and it stays
    assert policy.choose(1) == 1
    table.fixed[(1, 1)] = tau1 / 1.01
    assert policy.choose(1) == 1
    table.fixed[(1, 1)] = tau1 * 1.01  # plain faster by a hair: plain
    assert policy.choose(1) == 0


def test_between_drafting_depths_only_the_cost_noise_counts():
    """Depths 2 and 3 share their acceptance counts, so with exact costs the policy moves from 2 to
    3 as soon as 3 is predicted faster, however few drafts it has seen."""
    table = costs(1.0, [9.0, 1.0, 1.0])
    policy = SpeculationPolicy(3, table)
    for _ in range(5):
        policy.acceptance.add([3], 3)  # every draft accepted, but few seen
    table.fixed[(3, 1)] = 9.0
    assert held(policy, 1) == 2
    table.fixed[(3, 1)] = policy.acceptance.expected_tokens(3) / policy.acceptance.expected_tokens(2) / 1.01
    assert held(policy, 1) == 3


def test_between_drafting_depths_the_faster_by_prediction_runs():
    """Moving between drafting depths costs nothing, so no margin keeps the depth held: with ratios
    of depth 3 to depth 2 that wander by ±25%, the policy holding depth 2 moves to 3 as soon as
    their median predicts 3 faster at all, and back as soon as it predicts 2 faster. (Leaving plain
    decoding, such noise is no proof: test_noisy_cost_ratios_widen_the_margin.)"""
    acceptance = AcceptanceEstimate(3)
    for _ in range(100):
        acceptance.add([3], 3)
    even = acceptance.expected_tokens(3) / acceptance.expected_tokens(2)  # the cost ratio at which they tie
    steps = StepCosts()
    for depth, seconds in ((0, 0.010), (1, 0.014), (2, 0.017), (3, 0.017 * even * 1.03)):
        for _ in range(MIN_SAMPLES):
            steps.add(depth, 1, seconds)
    policy = SpeculationPolicy(3, steps, acceptance=acceptance)
    assert held(policy, 1) == 2  # depth 3 slower by 3%

    def choice(median: float) -> int:
        for factor in (0.75, 1.25, 1.0) * 3:
            steps.add_pair(2, 0.010, 3, 0.010 * median * factor, 1)
        return held(policy, 1)

    assert choice(even / 1.03) == 3  # faster by 3%, by noisy ratios: it runs
    assert choice(even * 1.03) == 2  # slower again: back


def test_noisy_cost_ratios_widen_the_margin():
    """The same median ratio of depth 1 to plain (1.2 plain steps for τ(1) ≈ 1.3): measured steadily
    it is a clear win; measured on a machine whose ratios wander by ±30% it is not proof enough."""
    def choice(ratios: list[float]) -> int:
        steps = StepCosts()
        for r in ratios:
            steps.add(0, 1, 0.010)
            steps.add(1, 1, 0.010 * r)
            steps.add_pair(0, 0.010, 1, 0.010 * r, 1)
        policy = SpeculationPolicy(1, steps)
        for _ in range(200):
            policy.acceptance.add([1, 1, 1, 0, 0, 0, 1, 1, 1, 1], 1)  # 70% accepted: τ(1) ≈ 1.7
        return policy.choose(1)

    steady = [1.19, 1.2, 1.21, 1.2, 1.2, 1.19, 1.21, 1.2, 1.2]
    noisy = [0.9, 1.2, 1.5, 1.2, 1.6, 0.8, 1.2, 1.55, 0.85]
    assert median_error(steady) < 0.01 < 0.1 < median_error(noisy)
    assert choice([r * 1.3 for r in steady]) == 1
    assert choice([r * 1.3 for r in noisy]) == 0


def test_catch_up_is_repaid_over_the_tokens_left():
    """After plain steps, drafting first runs the MTP catch-up (measured: 4 plain steps). Depth 1 at
    1.5× the rate of plain repays it over a long budget, not over the last few tokens."""
    table = costs(1.0, [1.0], catch_up=4.0)
    def choice(horizon: float) -> int:
        policy = SpeculationPolicy(1, table)
        for _ in range(200):
            policy.acceptance.add([1, 0], 1)  # τ(1) ≈ 1.5 for one plain step's cost
        return policy.choose(1, horizon, CATCH_UP)

    assert choice(200.0) == 1
    assert choice(6.0) == 0  # 6 tokens: 6 plain steps, or 4 + 4 at depth 1
    policy = SpeculationPolicy(1, table)
    for _ in range(200):
        policy.acceptance.add([1, 0], 1)
    assert policy.choose(1, 6.0, PROMPT_CATCH_UP) == 0  # an unmeasured prompt catch-up: priced as a catch-up
    assert policy.choose(1, 6.0, None) == 1  # the drafter is level: nothing to repay


def test_median_error():
    assert median_error([1.0]) == 0.0 and median_error([2.0, 2.0, 2.0]) == 0.0
    assert median_error([1.0, 2.0, 3.0]) == pytest.approx(1.2533 * 1.4826 / 3 ** 0.5 / 2.0)


def test_depths_are_compared_by_steps_timed_back_to_back():
    """The machine's speed drifts: depth 1 was timed alone in a fast spell (10 ms) and plain in a
    slow one (9 ms), but run back to back depth 1 costs 1.6 plain steps. With τ(1) = 1.5 the
    back-to-back ratio decides: plain."""
    costs = StepCosts()
    for ms in (10.0, 10.2, 10.1):
        costs.add(1, 8, ms / 1e3)
    for ms in (9.0, 9.1, 9.2):
        costs.add(0, 8, ms / 1e3)
    policy = SpeculationPolicy(1, costs)
    for _ in range(60):
        policy.acceptance.add([1, 0], 1)  # position 1 accepted half the time
    assert costs.relative(1, 0, 8) == pytest.approx(10.0 / 9.0)  # lower quartiles
    assert policy.choose(8) == 1  # by the absolute costs, depth 1 wins (τ 1.5 for 1.1 plain steps)
    for t0, t1 in [(6.0, 9.6), (6.1, 9.8), (5.9, 9.4)]:  # revisits: plain then depth 1, same rows
        policy.observe(0, 8, t0 / 1e3, [])
        policy.observe(1, 8, t1 / 1e3, [1])
    assert costs.relative(1, 0, 8) == pytest.approx(1.6, abs=0.01)
    assert costs.relative(0, 1, 8) == pytest.approx(1 / 1.6, abs=0.01)
    assert policy.choose(8) == 0
    policy.observe(0, 4, 0.004, [])  # a pair is only taken from steps over the same rows
    policy.observe(1, 8, 0.020, [1])
    assert costs.relative(1, 0, 8) == pytest.approx(1.6, abs=0.01)


def test_back_to_back_ratios_persist_with_the_costs(tmp_path):
    path = tmp_path / "costs.json"
    a = StepCosts(path, "machine A")
    for t0, t1 in [(1.0, 2.0), (1.0, 3.0)]:
        a.add_pair(0, t0, 2, t1, 5)
        a.add(0, 5, t0)
    a.save()
    b = StepCosts(path, "machine A")
    assert b.relative(2, 0, 4) == pytest.approx(2.5) and b.relative(0, 2, 4) == pytest.approx(0.4)
    assert b.cost(0, 4) == 1.0


def test_a_depth_priced_out_by_a_slow_spell_is_probed_back():
    """Pairs timed while other work shared the CPU (kept on disk) price depth 3 at 4.8, 1.2 and 2.1
    plain steps: likely faster than plain at τ ≈ 3.4, but not proof enough to switch. The policy
    probes it on alternate steps; the steps' true ratio (1.9) replaces the stale pairs and it
    switches for good."""
    steps = StepCosts()
    for ratio in (4.8, 1.2, 2.1):
        steps.add(0, 1, 0.010)
        steps.add(3, 1, 0.010 * ratio)
        steps.add_pair(0, 0.010, 3, 0.010 * ratio, 1)
    for depth in (1, 2, CATCH_UP):
        for _ in range(MIN_SAMPLES):
            steps.add(depth, 1, {1: 0.014, 2: 0.017, CATCH_UP: 0.0005}[depth])
    policy = SpeculationPolicy(3, steps)
    for _ in range(100):
        policy.acceptance.add([3, 3, 2, 3], 3)  # τ(3) ≈ 3.5
    assert policy._best(1, policy.rates(1), math.inf, None)[0] == 0  # not proven: plain is held
    run = []
    for _ in range(40):
        d = policy.choose(1, catch_up=CATCH_UP)
        run.append(d)
        policy.observe(d, 1, {0: 0.010, 1: 0.014, 2: 0.017, 3: 0.019}[d], [3] if d else [])
    assert run[:2] == [3, 0]  # probed at once, alternating with plain
    assert run.index(3) < 2 and run[10:].count(3) >= 29  # then depth 3 for good (a revisit or so aside)


def test_a_drafting_depth_priced_out_by_stale_ratios_is_probed_back():
    """Holding depth 2 on stale back-to-back ratios that price depth 3 at 1.38x depth 2 (median of
    ratios wandering 1.10-1.45; truly 1.10x), with every draft accepted (τ(3)/τ(2) = 4/3): depth 3
    may well be faster, so it is probed on alternate steps until the true ratio replaces the stale
    ones, and then it runs for good. (Without probes it waited for its rare revisits.)"""
    seconds = {0: 0.010, 1: 0.014, 2: 0.017, 3: 0.0187}
    steps = StepCosts()
    for depth, t in seconds.items():
        for _ in range(MIN_SAMPLES):
            steps.add(depth, 1, t)
    for ratio in (1.10, 1.45, 1.38, 1.15, 1.40):
        steps.add_pair(2, 0.017, 3, 0.017 * ratio, 1)
    policy = SpeculationPolicy(3, steps)
    for _ in range(100):
        policy.acceptance.add([3], 3)
    policy.settled[1] = 2  # held: rates are in depth-2 steps, depth 3 priced by the stale pairs
    assert policy._best(1, policy.rates(1), math.inf, None) == (2, 3)  # depth 2 held, depth 3 probed
    run = []
    for _ in range(40):
        d = policy.choose(1)
        run.append(d)
        policy.observe(d, 1, seconds[d], [d])
    assert run[:2] in ([3, 2], [2, 3]) and run[20:].count(3) >= 19


def test_a_depth_unlikely_to_pay_is_not_probed():
    """The same stale pairs with poor acceptance (τ(3) ≈ 1.5): depth 3 is predicted slower than plain
    at the pairs' median (and depths 1 and 2 by their costs), so plain decoding runs on, with no
    probes."""
    steps = StepCosts()
    for ratio in (4.8, 1.2, 2.1):
        steps.add_pair(0, 0.010, 3, 0.010 * ratio, 1)
    for depth, seconds in ((0, 0.010), (1, 0.018), (2, 0.022), (3, 0.019), (CATCH_UP, 0.0005)):
        for _ in range(MIN_SAMPLES):
            steps.add(depth, 1, seconds)
    policy = SpeculationPolicy(3, steps)
    for _ in range(100):
        policy.acceptance.add([0, 1], 3)
    run = [policy.choose(1, catch_up=CATCH_UP) for _ in range(FIRST_REVISIT - 1)]
    assert set(run) == {0}


def test_a_step_that_was_not_timed_leaves_no_cost():
    """A step observed without seconds (it compiled its graph) counts as run, and its acceptance
    counts, but it adds no cost sample and pairs with neither neighbour."""
    steps = StepCosts()
    policy = SpeculationPolicy(2, steps)
    policy.observe(0, 4, 0.010, [])
    policy.observe(2, 4, None, [2, 2, 2, 2])
    policy.observe(0, 4, 0.010, [])
    assert policy.depths_run == [2, 0, 1] and policy.acceptance.reached[0] == pytest.approx(4.0)
    assert steps.count(2, 4) == 0 and not steps.pairs
