"""The measured GEMM choice (`kernels.cpu_gemm`): the tuner takes the faster formulation by the
timings it is given, remembers verdicts per machine key, and no choice changes what is decoded."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.kernels.cpu_gemm import DEFAULT, FORMULATIONS, MIN_GAIN, ROW_BUCKETS, GemmTuner, RowPlan, cpu_model, machine_key
from specdec import Engine, SpecConfig


def scripted_timer(fastest: dict[int, str], calls: list | None = None):
    """Timings the test controls: `fastest[rows]` (default "x_wt") takes 1 µs, the others 3 µs."""

    def timer(formulations, rows, out, inp):
        if calls is not None:
            calls.append((rows, out, inp, formulations))
        return {f: 1e-6 if f == fastest.get(rows, "x_wt") else 3e-6 for f in formulations}

    return timer


def test_tuner_picks_the_faster_formulation_per_row_bucket(tmp_path):
    calls = []
    tuner = GemmTuner(timer=scripted_timer({6: "w_xt", 16: "w_xt", 64: "x_wcopy"}, calls),
                      cache_path=tmp_path / "plans.json", measure=True)
    plan = tuner.plan(576, 256)
    assert plan.for_rows(6) == plan.for_rows(7) == "w_xt" and plan.for_rows(5) == plan.for_rows(8) == "x_wt"
    assert plan.for_rows(16) == plan.for_rows(23) == "w_xt" and plan.for_rows(24) == "x_wt"
    assert plan.for_rows(500) == "x_wt"  # x_wcopy was not a candidate: copies only where allowed
    assert all("x_wcopy" not in c[3] for c in calls)
    head = tuner.plan(8192, 256, allow_copy=True)
    assert head.for_rows(64) == head.for_rows(1000) == "x_wcopy" and head.needs_copy


def test_a_marginal_win_keeps_the_default(tmp_path):
    def timer(formulations, rows, out, inp):
        return {f: 1e-6 * (1 - MIN_GAIN / 2 if f == "w_xt" else 1) for f in formulations}

    plan = GemmTuner(timer=timer, cache_path=tmp_path / "p.json", measure=True).plan(64, 64)
    assert set(plan.by_bucket) == {DEFAULT}


def test_machines_that_share_a_model_name_get_different_keys():
    """Two VMs' /proc/cpuinfo both say "AMD EPYC": family, model and vector extension tell them apart."""
    from specdec.kernels.machine_cache import describe_cpu

    zen2 = "processor\t: 0\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2\n\n" \
           "processor\t: 1\nmodel name\t: other\n"
    zen4 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f\n"
    assert describe_cpu(zen2) == "AMD EPYC (family 23 model 49, avx2)"
    assert describe_cpu(zen4) == "AMD EPYC (family 25 model 17, avx512)"
    assert describe_cpu("model name\t: Some CPU\n") == "Some CPU" and describe_cpu("flags : avx2\n") is None


def test_verdicts_are_cached_per_machine_key(tmp_path):
    path = tmp_path / "plans.json"
    calls = []
    tuner = GemmTuner(timer=scripted_timer({4: "w_xt"}, calls), cache_path=path, measure=True)
    tuner.plan(100, 50)
    tuner.save()
    n = len(calls)
    again = GemmTuner(timer=scripted_timer({}, calls), cache_path=path, measure=True)
    assert again.plan(100, 50).for_rows(4) == "w_xt" and len(calls) == n  # read back, not re-timed
    data = json.loads(path.read_text())
    assert machine_key(torch.float32) in data and cpu_model() in machine_key(torch.float32)
    data[machine_key(torch.float32).replace(cpu_model(), "another CPU")] = data.pop(machine_key(torch.float32))
    path.write_text(json.dumps(data))
    fresh = GemmTuner(timer=scripted_timer({}, calls), cache_path=path, measure=True)
    assert fresh.plan(100, 50).for_rows(4) == "x_wt" and len(calls) > n  # another machine's verdicts: re-timed
    assert GemmTuner(timer=scripted_timer({}, calls), cache_path=path, measure=True, refresh=True).entries == {}


def test_measuring_off_means_the_default_and_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_TUNE", "0")
    tuner = GemmTuner(timer=scripted_timer({1: "w_xt"}), cache_path=tmp_path / "p.json")
    assert tuner.plan(64, 64).by_bucket == RowPlan().by_bucket
    tuner.save()
    assert not (tmp_path / "p.json").exists()


def test_real_timer_runs_every_candidate():
    from specdec.kernels.cpu_gemm import blas_timer

    t = blas_timer(torch.float32, budget_s=1e-4, rounds=2)(FORMULATIONS, 3, 40, 24)
    assert set(t) == set(FORMULATIONS) and all(v > 0 for v in t.values())


class ForcedTuner(GemmTuner):
    """Every GEMM runs `gemm`, every MoE layer `experts` (timings scripted, nothing measured)."""

    def __init__(self, dtype, path, gemm: str, experts: str) -> None:
        super().__init__(dtype, True, scripted_timer({r: gemm for r in ROW_BUCKETS}), path)
        self.experts = experts

    def choose(self, name, candidates, default, timer):
        if name.startswith("moe"):
            return RowPlan((self.experts,) * len(ROW_BUCKETS))
        return super().choose(name, candidates, default, timer)


@pytest.mark.parametrize("forced, experts", [("w_xt", "dense"), ("x_wcopy", "loop"), ("x_wt", "grouped")])
def test_decoded_tokens_do_not_depend_on_the_choice(f32_ckpt, forced, experts, tmp_path):
    """An engine whose every layer runs `forced` (heads included) and whose MoE layers run `experts`
    decodes what the untuned one does."""
    chosen = Engine.from_pretrained(f32_ckpt, device="cpu", max_seq_len=96,
                                    tune=ForcedTuner(torch.float32, tmp_path / "p.json", forced, experts))
    default = Engine.from_pretrained(f32_ckpt, device="cpu", max_seq_len=96, tune=False)
    head = chosen.model.lm_head
    assert head.gemm_plan.for_rows(1) == forced and default.model.lm_head.gemm_plan.for_rows(1) == DEFAULT
    moe = chosen.model.model.layers[-1].mlp
    assert moe.routed_backend.plan.for_rows(4) == experts
    assert set(default.model.model.layers[-1].mlp.routed_backend.plan.by_bucket) == {"loop"}  # measuring off: the default
    if forced == "w_xt":
        assert chosen.model.model.layers[0].self_attn.q_kv_a.plan.for_rows(3) == "w_xt"  # fused groups too
    prompts = [[5, 17, 300, 41], [9, 8, 7]]
    torch.testing.assert_close(chosen.logits(prompts), default.logits(prompts), rtol=1e-4, atol=1e-4)
    for spec in (None, SpecConfig(depth=2, adaptive=False)):
        a = chosen.generate(prompts, max_new_tokens=20, spec=spec).token_ids
        b = default.generate(prompts, max_new_tokens=20, spec=spec).token_ids
        assert a == b


def test_moe_layers_get_a_timed_expert_plan(f32_ckpt, tmp_path):
    tuner = GemmTuner(torch.float32, True, scripted_timer({}), tmp_path / "p.json")
    eng = Engine.from_pretrained(f32_ckpt, device="cpu", max_seq_len=96, tune=tuner)
    moe_entries = {k: v for k, v in tuner.timings().items() if k.startswith("moe")}
    assert len(moe_entries) == 1  # every MoE layer has one shape: timed once
    entry = next(iter(moe_entries.values()))
    assert set(entry["us"]["4"]) == {"loop", "dense", "grouped"} and all(t > 0 for t in entry["us"]["4"].values())
    assert eng.model.model.layers[-1].mlp.routed_backend.plan.by_bucket == tuple(entry["plan"])
