"""Trainer of the default model (`mtp.train`, `mtp.train_model`, `mtp.data`): data split, training,
export through the real loader, MTP math, load balancing and bit-exact resume."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from specdec import kernels
import torch.nn.functional as F
from safetensors.torch import load_file

from specdec.model.args import ModelArgs, from_hf_config
from specdec.model.checkpoint import CheckpointReader, load_state
from specdec.model.load import load_verifier
from specdec.model.mtp_layer import MTPLayer
from specdec.model.parallel import ParallelContext
from specdec.model.rope import rope_tables
from specdec.model.synthetic import random_tensors
from specdec.mtp import train as T
from specdec.mtp.data import (build_corpus, encode_stream, heldout_windows, split_files, stdlib_root, train_batch,
                      window_starts)
from specdec.mtp.train_model import DeepSeekV3ForTraining, export_tensors, fake_fp8_weights, load_tensors, update_router_bias
from specdec import Engine

TINY = [
    "--vocab-size", "512", "--hidden", "64", "--layers", "2", "--dense-layers", "1", "--heads", "2",
    "--q-lora-rank", "48", "--kv-lora-rank", "32", "--qk-nope-dim", "16", "--qk-rope-dim", "16", "--v-dim", "24",
    "--inter", "128", "--moe-inter", "32", "--experts", "8", "--n-group", "4", "--topk-group", "2", "--topk", "2",
    "--shared-experts", "1", "--rope-factor", "4", "--rope-original-len", "16", "--max-position", "256",
    "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3", "--warmup", "5", "--eval-windows", "8",
    "--final-eval-windows", "8", "--max-train-chars", "150000", "--max-heldout-chars", "40000", "--quiet",
    "--threads", "1",
]


@pytest.fixture(autouse=True, scope="module")
def _restore_threads() -> Iterator[None]:
    """`mtp.train.run` sets torch's thread count; give the rest of the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_args(**overrides: str) -> ModelArgs:
    a = T.build_parser().parse_args(TINY + ["--steps", "1"])
    for k, v in overrides.items():
        setattr(a, k, v)
    return from_hf_config(T.hf_config(a))


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """A work dir whose token cache (tiny BPE, small slices of both splits) other runs copy."""
    work = tmp_path_factory.mktemp("train") / "base"
    build_corpus(work, 512, max_chars=150_000, heldout_max_chars=40_000, log=lambda m: None)
    return work / "data"


def work_dir(tmp_path: Path, data_cache: Path, name: str) -> Path:
    work = tmp_path / name
    shutil.copytree(data_cache, work / "data")
    return work


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> tuple[Path, dict]:
    """One short training run with export: (work dir, summary)."""
    work = work_dir(tmp_path_factory.mktemp("run"), data_cache, "work")
    summary = T.run(TINY + ["--steps", "60", "--eval-every", "10", "--work-dir", str(work), "--out",
                            str(work / "export")])
    return work, summary


# ------------------------------------------------------------------------------------------------ data

def test_split_excludes_tests_and_site_packages(tmp_path: Path) -> None:
    for rel in ["a.py", "pkg/mod.py", "test/test_x.py", "test/sub/data.py", "pkg/tests/t.py",
                "idlelib/idle_test/t.py", "site-packages/m.py", "unittest/test/t.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    train, heldout = split_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in train] == ["a.py", "pkg/mod.py"]
    assert [p.relative_to(tmp_path).as_posix() for p in heldout] == ["test/sub/data.py", "test/test_x.py"]


def test_real_stdlib_split_is_disjoint_and_nonempty() -> None:
    root = stdlib_root()
    train, heldout = split_files(root)
    assert len(train) > 100 and len(heldout) > 100
    assert all(p.relative_to(root).parts[0] == "test" for p in heldout)
    assert not any({"test", "tests", "site-packages"} & set(p.relative_to(root).parts[:-1]) for p in train)
    assert split_files(root) == (train, heldout)


def test_documents_end_with_eos_and_batches_are_seeded(data_cache: Path) -> None:
    corpus = build_corpus(data_cache.parent, 512, max_chars=150_000, heldout_max_chars=40_000)
    stream = encode_stream(corpus.tokenizer, ["a = 1\n", "b = 2\n"])
    eos_positions = np.flatnonzero(stream == 1)
    assert list(eos_positions) == [eos_positions[0], len(stream) - 1] and eos_positions[0] > 0
    assert corpus.tokenizer.decode(stream[: eos_positions[0]].tolist()) == "a = 1\n"
    b1 = train_batch(corpus.train, 4, 34, seed=3, step=7)
    assert torch.equal(b1, train_batch(corpus.train, 4, 34, seed=3, step=7))
    assert not torch.equal(b1, train_batch(corpus.train, 4, 34, seed=3, step=8))
    starts = window_starts(len(corpus.train), 34, 4, 3, 7)
    assert torch.equal(b1[2], torch.from_numpy(corpus.train[starts[2]: starts[2] + 34].astype(np.int64)))
    assert torch.equal(heldout_windows(corpus.heldout, 5, 34), heldout_windows(corpus.heldout, 5, 34))


def test_lr_schedule() -> None:
    assert T.lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert T.lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert T.lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert T.lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------- training

def test_training_lowers_loss_and_exports(trained) -> None:
    work, summary = trained
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert records[-1]["ppl"] < 0.7 * records[0]["ppl"]
    assert records[-1]["train_ce"] < math.log(512) - 1.0
    assert summary["finished"] and summary["tokens_seen"] == 60 * 8 * 32
    assert summary["verifier_max_abs_logit_diff"] < 1e-4
    assert summary["final_exported"]["ppl"] < 1.05 * summary["final_float32"]["ppl"]
    assert 0.0 <= summary["final_exported"]["mtp_agreement"] <= 1.0
    on_disk = json.loads((work / "export" / "training_summary.json").read_text())
    assert on_disk["tokens_seen"] == summary["tokens_seen"]


def test_export_has_exact_release_layout(trained) -> None:
    work, _ = trained
    out = work / "export"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)
    reader = CheckpointReader(out)
    expected = {n: tuple(t.shape) for n, t in random_tensors(cfg).items()}
    names = {n for n in reader.weight_map if not n.endswith("_scale_inv")}
    assert names == set(expected)
    for name in names:
        shape, dtype = reader.shape_dtype(name)
        assert shape == expected[name], name
        if name.endswith("e_score_correction_bias"):
            assert dtype == torch.float32
        elif name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight")) \
                and ".eh_proj." not in name:
            assert dtype == torch.float8_e4m3fn, name
            rows, cols = shape
            assert reader.shape_dtype(name + "_scale_inv")[0] == (-(-rows // 128), -(-cols // 128))
        else:
            assert dtype == torch.bfloat16, name
    L = cfg["num_hidden_layers"]
    assert torch.equal(reader.read(f"model.layers.{L}.embed_tokens.weight"), reader.read("model.embed_tokens.weight"))
    assert torch.equal(reader.read(f"model.layers.{L}.shared_head.head.weight"), reader.read("lm_head.weight"))
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def _stored(out: Path) -> dict[str, torch.Tensor]:
    return CheckpointReader(out).read_all()


def _training_model(out: Path,
                    stored: dict[str, torch.Tensor] | None = None) -> tuple[ModelArgs, DeepSeekV3ForTraining]:
    """The training model holding the (dequantised) tensors of export `out` (or of `stored`)."""
    args = from_hf_config(json.loads((out / "config.json").read_text()))
    model = DeepSeekV3ForTraining(args, 64)
    load_tensors(model, T.dequantized(_stored(out) if stored is None else stored))
    return args, model


def _causal_inputs(args: ModelArgs, layers: int, bsz: int, seqlen: int) -> tuple[torch.Tensor, ...]:
    kv = torch.zeros(layers, bsz, seqlen, args.kv_lora_rank)
    pe = torch.zeros(layers, bsz, seqlen, args.qk_rope_head_dim)
    pos = torch.arange(seqlen).expand(bsz, seqlen)
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril().expand(bsz, seqlen, seqlen)
    return kv, pe, pos, mask


@torch.no_grad()
def test_verifier_logits_equal_training_model(trained) -> None:
    work, _ = trained
    out = work / "export"
    args, model = _training_model(out)
    verifier, _ = load_verifier(out, ParallelContext(), keep_fp8=False, show_progress=False, max_seq_len=64)
    tokens = torch.randint(3, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    kv, pe, pos, mask = _causal_inputs(args, args.n_layers, 2, 40)
    ref = verifier(tokens, pos, kv, pe, pos, mask)
    hidden, logits, _ = model.main_forward(tokens)
    assert ref.logits.abs().max() > 1.0
    torch.testing.assert_close(logits, ref.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ref.hidden, atol=2e-5, rtol=1e-5)
    # the un-quantised training weights differ from what the verifier runs: the comparison can fail
    work_model = DeepSeekV3ForTraining(args, 64)
    load_tensors(work_model, load_file(str(work / "checkpoint" / "model.safetensors")))
    assert (work_model.main_forward(tokens)[1] - ref.logits).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ MTP

def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[T, H, d]` rotated as complex pairs by the angles of cos/sin `[T, d/2]`."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * torch.complex(cos, sin).unsqueeze(1)).flatten(-2)


def _swiglu(x: torch.Tensor, w: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return (F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T


def _naive_attention(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, args: ModelArgs) -> torch.Tensor:
    """Absorbed MLA for one sequence x `[T, dim]`, written out head by head."""
    seqlen, nope, rope, v_dim = x.shape[0], args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    cos, sin = rope_tables(args, seqlen)
    q = _rms(x @ w[p + "q_a_proj.weight"].T, w[p + "q_a_layernorm.weight"]) @ w[p + "q_b_proj.weight"].T
    q = q.view(seqlen, args.n_heads, nope + rope)
    kv_a = x @ w[p + "kv_a_proj_with_mqa.weight"].T
    c = _rms(kv_a[:, : args.kv_lora_rank], w[p + "kv_a_layernorm.weight"])
    k_pe = _rope_complex(kv_a[:, None, args.kv_lora_rank:], cos, sin)[:, 0]
    q_pe = _rope_complex(q[..., nope:], cos, sin)
    w_kv_b = w[p + "kv_b_proj.weight"].view(args.n_heads, nope + v_dim, args.kv_lora_rank)
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    heads = []
    for h in range(args.n_heads):
        q_lat = q[:, h, :nope] @ w_kv_b[h, :nope]
        scores = (q_lat @ c.T + q_pe[:, h] @ k_pe.T) * args.softmax_scale
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        heads.append((probs @ c) @ w_kv_b[h, nope:].T)
    return torch.cat(heads, dim=-1) @ w[p + "o_proj.weight"].T


def _naive_moe(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, args: ModelArgs) -> torch.Tensor:
    """DeepSeekMoE token by token: biased group-limited top-k selection, unbiased normalised weights."""
    out = []
    per_group = args.n_routed_experts // args.n_expert_groups
    for tok in x:
        scores = torch.sigmoid(w[p + "gate.weight"] @ tok)
        choice = scores + w[p + "gate.e_score_correction_bias"]
        group_score = [sorted(choice[g * per_group:(g + 1) * per_group].tolist())[-2:]
                       for g in range(args.n_expert_groups)]
        groups = sorted(range(args.n_expert_groups), key=lambda g: -sum(group_score[g]))[: args.n_limited_groups]
        allowed = [e for e in range(args.n_routed_experts) if e // per_group in groups]
        chosen = sorted(allowed, key=lambda e: -choice[e].item())[: args.n_activated_experts]
        weights = scores[chosen] / scores[chosen].sum() * args.route_scale
        y = sum(wt * _swiglu(tok, w, f"{p}experts.{e}.") for wt, e in zip(weights, chosen))
        out.append(y + _swiglu(tok, w, p + "shared_experts."))
    return torch.stack(out)


def _naive_mtp(w: dict[str, torch.Tensor], args: ModelArgs, hidden: torch.Tensor, nxt: torch.Tensor,
               hidden_first: bool = False) -> torch.Tensor:
    """MTP logits `[T, vocab]` for one sequence from checkpoint tensors (its own embed/head copies)."""
    p = f"model.layers.{args.n_layers}."
    parts = [_rms(w[p + "embed_tokens.weight"][nxt], w[p + "enorm.weight"]), _rms(hidden, w[p + "hnorm.weight"])]
    x = torch.cat(parts[::-1] if hidden_first else parts, -1) @ w[p + "eh_proj.weight"].T
    x = x + _naive_attention(_rms(x, w[p + "input_layernorm.weight"]), w, p + "self_attn.", args)
    x = x + _naive_moe(_rms(x, w[p + "post_attention_layernorm.weight"]), w, p + "mlp.", args)
    return _rms(x, w[p + "shared_head.norm.weight"]) @ w[p + "shared_head.head.weight"].T


def _random_model(args: ModelArgs, seed: int) -> DeepSeekV3ForTraining:
    model = DeepSeekV3ForTraining(args, 64)
    gen = torch.Generator().manual_seed(seed)
    model.init_weights(gen, std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (0.0 if "bias" in name else 1.0))
    return model


@torch.no_grad()
def test_mtp_forward_matches_naive_reimplementation() -> None:
    args = tiny_args()
    model = _random_model(args, seed=1)
    tokens = torch.randint(3, args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    hidden, _, _ = model.main_forward(tokens[:, :-1])
    logits, counts = model.mtp_forward(hidden, tokens[:, 1:])
    assert counts.sum().item() == 2 * 12 * args.n_activated_experts
    w = export_tensors(model)
    for b in range(2):
        ref = _naive_mtp(w, args, hidden[b], tokens[b, 1:])
        torch.testing.assert_close(logits[b], ref, atol=1e-4, rtol=1e-4)
    # the released order is [embedding, hidden]; the paper's order gives different logits
    swapped = _naive_mtp(w, args, hidden[0], tokens[0, 1:], hidden_first=True)
    assert (swapped - logits[0]).abs().max() > 1e-2


@torch.no_grad()
def test_mtp_forward_matches_inference_layer_from_checkpoint(trained) -> None:
    work, _ = trained
    out = work / "export"
    args, model = _training_model(out)
    with torch.device("meta"):
        layer = MTPLayer(args.n_layers, args, ParallelContext(), torch.float32, None)
    load_state(layer, CheckpointReader(out), f"model.layers.{args.n_layers}.", "cpu", False)
    tokens = torch.randint(3, args.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    hidden, _, _ = model.main_forward(tokens[:, :-1])
    logits, _ = model.mtp_forward(hidden, tokens[:, 1:])
    x = layer.eh_proj(torch.cat([layer.enorm(layer.embed_tokens(tokens[:, 1:])), layer.hnorm(hidden)], -1))
    kv, pe, pos, mask = _causal_inputs(args, 1, 2, 20)
    cos, sin = rope_tables(args, 20)
    x = layer(x, torch.complex(cos, sin)[pos], kv, pe, 0, pos, mask)
    ref = layer.shared_head.head(layer.shared_head.norm(x))
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- balancing

def test_router_bias_moves_against_load_and_has_no_gradient() -> None:
    args = tiny_args()
    model = _random_model(args, seed=3)
    gate = model.model.layers[1].mlp.gate
    before = gate.e_score_correction_bias.detach().clone()
    load = torch.tensor([10, 0, 5, 5, 5, 5, 2, 8])
    update_router_bias(model, {1: load}, gamma=0.01)
    delta = gate.e_score_correction_bias.detach() - before
    torch.testing.assert_close(delta, 0.01 * torch.sign(load.float().mean() - load.float()))
    window = torch.randint(3, args.vocab_size, (2, 10))
    from specdec.mtp.train_model import training_losses

    losses = training_losses(model, window, 0.3)
    losses.total.backward()
    assert gate.e_score_correction_bias.grad is None and gate.weight.grad is not None
    assert set(losses.loads) == {1, 2}  # main MoE layer and the MTP layer
    opt = T.make_optimizer(model, T.build_parser().parse_args(TINY + ["--steps", "1"]))
    trained_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(gate.e_score_correction_bias) not in trained_ids


# ------------------------------------------------------------------------------------------- resume

def test_resume_is_bit_exact(tmp_path: Path, data_cache: Path) -> None:
    common = TINY + ["--steps", "12", "--eval-every", "4", "--bias-gamma", "0.01"]
    straight = work_dir(tmp_path, data_cache, "straight")
    T.run(common + ["--work-dir", str(straight)])
    split = work_dir(tmp_path, data_cache, "split")
    partial = T.run(common + ["--work-dir", str(split), "--stop-after", "5"])
    assert partial == {"steps": 5, "tokens_seen": 5 * 8 * 32, "finished": False}
    T.run(common + ["--work-dir", str(split), "--resume"])
    for file in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(straight / "checkpoint" / file)), load_file(str(split / "checkpoint" / file))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{file}: {name}"
    metrics = [(work / "metrics.jsonl").read_text().splitlines() for work in (straight, split)]
    strip = [[{k: v for k, v in json.loads(r).items() if k != "minutes"} for r in m] for m in metrics]
    assert strip[0] == strip[1] and len(strip[0]) == 3
    state = json.loads((split / "checkpoint" / "state.json").read_text())["state"]
    assert state["step"] == 12 and state["tokens_seen"] == 12 * 8 * 32
    bias = load_file(str(split / "checkpoint" / "model.safetensors"))["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0  # balancing ran


def test_resume_refuses_a_different_architecture(tmp_path: Path, data_cache: Path) -> None:
    work = work_dir(tmp_path, data_cache, "w")
    T.run(TINY + ["--steps", "2", "--work-dir", str(work)])
    with pytest.raises(ValueError, match="hidden_size"):
        T.run(TINY + ["--steps", "4", "--work-dir", str(work), "--resume", "--hidden", "96"])


@torch.no_grad()
def test_fake_fp8_weights_train_on_the_exported_values() -> None:
    args = tiny_args()
    model = _random_model(args, seed=4)
    floats = export_tensors(model)
    tokens = torch.randint(3, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    exported = DeepSeekV3ForTraining(args, 64)
    load_tensors(exported, T.dequantized(T.quantize_state(floats, float_dtype=torch.float32)))
    with fake_fp8_weights(model):
        inside = model.main_forward(tokens)[1]
        q_b = model.model.layers[0].self_attn.q_b_proj.weight.clone()
    torch.testing.assert_close(inside, exported.main_forward(tokens)[1], atol=1e-5, rtol=1e-5)
    assert not torch.equal(q_b, floats["model.layers.0.self_attn.q_b_proj.weight"])
    torch.testing.assert_close(q_b, exported.model.layers[0].self_attn.q_b_proj.weight, atol=0, rtol=0)
    for name, p in model.named_parameters():
        assert torch.equal(p, floats[name]), name  # float master weights restored


def test_minutes_budget_plans_and_finishes(tmp_path: Path, data_cache: Path) -> None:
    work = work_dir(tmp_path, data_cache, "timed")
    summary = T.run(TINY + ["--minutes", "0.04", "--eval-every", "5", "--work-dir", str(work)])
    state = json.loads((work / "checkpoint" / "state.json").read_text())["state"]
    assert summary["finished"] and state["planned_final"]
    assert state["step"] == state["total_steps"] >= 5


def test_exported_fp8_weights_dequantise_to_the_float_weights(trained) -> None:
    """Every FP8 projection of the export is its float training weight within FP8 (e4m3) rounding."""
    from safetensors.torch import load_file

    work, _ = trained
    floats = load_file(str(work / "checkpoint" / "model.safetensors"))
    stored = _stored(work / "export")
    checked = 0
    for name, w in stored.items():
        if w.dtype != torch.float8_e4m3fn or name not in floats:
            continue
        scale = stored[name + "_scale_inv"]
        deq = kernels.weight_dequant(w, scale, impl="torch")
        ref = floats[name].float()
        block_scale = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: ref.shape[0], : ref.shape[1]]
        # e4m3: 3 mantissa bits (relative step 2^-3, so error ≤ 2^-4 of |w|), subnormal step 2^-9 × scale
        assert torch.all((deq - ref).abs() <= ref.abs() * 2**-4 + block_scale * 2**-9 + 1e-12), name
        checked += 1
    assert checked >= 10


def test_mtp_distillation_changes_only_the_mtp_layer_and_lowers_its_loss(trained, tmp_path: Path) -> None:
    from specdec.mtp import distill as D

    work, _ = trained
    out = tmp_path / "distilled"
    D.main(["--ckpt", str(work / "export"), "--work-dir", str(work), "--out", str(out), "--steps", "30",
            "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--threads", "1",
            "--max-train-chars", "150000", "--max-heldout-chars", "40000"])
    before, after = _stored(work / "export"), _stored(out)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8))}
    args = from_hf_config(json.loads((out / "config.json").read_text()))
    assert changed and all(k.startswith(f"model.layers.{args.n_layers}.") for k in changed)
    assert not any(k.endswith(("embed_tokens.weight", "shared_head.head.weight")) for k in changed)
    corpus = build_corpus(work, 512, max_chars=150_000, heldout_max_chars=40_000, log=lambda m: None)
    windows = heldout_windows(corpus.heldout, 8, 34)
    losses = []
    for stored in (before, after):
        _, model = _training_model(out, stored)
        with torch.no_grad():
            losses.append(D.distill_loss(model, windows).item())
    assert losses[1] < losses[0]  # held-out soft cross-entropy to the main model went down
    assert Engine.from_pretrained(out, device="cpu", max_seq_len=64).drafter is not None


def test_distillation_on_the_main_models_own_text(trained, tmp_path: Path) -> None:
    """`mtp.self_data` writes training prompts followed by the main model's greedy continuation
    (exactly what plain greedy decoding gives), and `mtp.distill --self-data` trains on a mix of
    those windows and corpus windows; a file of the wrong shape is a one-line error."""
    from specdec.mtp import distill as D
    from specdec.mtp import self_data as S

    work, _ = trained
    data = tmp_path / "self.npy"
    S.main(["--ckpt", str(work / "export"), "--work-dir", str(work), "--out", str(data), "--windows", "6",
            "--prompt-len", "9", "--new-tokens", "27", "--batch-size", "4", "--threads", "1",
            "--max-train-chars", "150000", "--max-heldout-chars", "40000"])
    windows = np.load(data)
    assert windows.shape[1] == 36 and len(windows) >= 6 and windows.dtype == np.int32
    eng = Engine.from_pretrained(work / "export", device="cpu", max_seq_len=64)
    prompt = windows[0, :9].astype(np.int64).tolist()
    assert eng.generate([prompt], max_new_tokens=27).token_ids[0] == windows[0, 9:].tolist()
    mixed = D.mixed_batch(np.arange(1000), windows.astype(np.int64), 0.5, 8, 36, seed=3, step=2)
    assert mixed.shape == (8, 36) and torch.equal(mixed, D.mixed_batch(np.arange(1000), windows, 0.5, 8, 36, 3, 2))
    assert sum(any(torch.equal(row, torch.from_numpy(w).long()) for w in windows) for row in mixed) == 4
    out = tmp_path / "distilled"
    common = ["--ckpt", str(work / "export"), "--work-dir", str(work), "--out", str(out), "--steps", "3",
              "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--max-train-chars", "150000",
              "--max-heldout-chars", "40000"]
    D.main(common + ["--self-data", str(data), "--self-frac", "0.75"])
    assert Engine.from_pretrained(out, device="cpu", max_seq_len=64).drafter is not None
    with pytest.raises(SystemExit, match=r"need \[N, >= 36\] token ids"):
        np.save(tmp_path / "short.npy", windows[:, :20])
        D.main(common + ["--self-data", str(tmp_path / "short.npy")])


def _mtp_normed(model: DeepSeekV3ForTraining, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """shared_head.norm of the MTP block run causally over inputs (hidden_j, t_{j+1}) at positions 0..T-1."""
    cos, sin = model.rope(hidden.shape[1])
    x, _ = model.mtp(model.mtp.combine(model.model.embed_tokens(tokens), hidden), cos, sin)
    return model.mtp.shared_head.norm(x)


def test_chained_mtp_forward_sees_what_the_drafter_sees() -> None:
    """Depth k at anchor i equals a causal MTP pass over the committed rows 0..i followed by the chain's own
    k-1 earlier inputs (each the previous depth's normed output with the next true token): the drafter's cache."""
    args = tiny_args()
    torch.manual_seed(0)
    model = _random_model(args, seed=1)
    depth, seqlen = 3, 12
    window = torch.randint(0, args.vocab_size, (2, seqlen + depth + 1))
    with torch.no_grad():
        hidden, _, _ = model.main_forward(window[:, :-1])
        chained = model.mtp_chain_forward(hidden[:, :seqlen], window[:, 1:seqlen + depth], depth)
        assert torch.allclose(chained[0], model.mtp_forward(hidden[:, :seqlen], window[:, 1:seqlen + 1])[0],
                              atol=1e-4)
        for anchor in (0, 5, seqlen - 1):
            states = hidden[:, :anchor + 1]
            for k in range(1, depth + 1):
                normed = _mtp_normed(model, states, window[:, 1:anchor + k + 1])
                assert torch.allclose(model.head(normed[:, -1]), chained[k - 1][:, anchor], atol=1e-4), (anchor, k)
                states = torch.cat([states, normed[:, -1:]], dim=1)
