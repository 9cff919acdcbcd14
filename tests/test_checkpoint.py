"""Loading the exact HF FP8 layout, dequantisation, the cast/convert tools, and bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specdec import kernels
from specdec.model.checkpoint import CheckpointReader
from specdec.model.errors import CheckpointError
from specdec.model.fp8_cast_bf16 import cast
from specdec.model.load import load_verifier
from specdec.model.parallel import ParallelContext
from specdec.model.prepare import GroupedFP8Experts
from specdec import Engine
from tests.conftest import run_cli


def test_fp8_checkpoint_layout_is_the_release_layout(fp8_ckpt):
    index = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3  # several shards
    name = "model.layers.1.self_attn.q_a_proj.weight"
    with safe_open(str(fp8_ckpt / index[name]), "pt") as f:
        assert f.get_slice(name).get_dtype() == "F8_E4M3"
    with safe_open(str(fp8_ckpt / index[name + "_scale_inv"]), "pt") as f:
        assert f.get_slice(name + "_scale_inv").get_shape() == [2, 2]  # ceil(192/128) x ceil(256/128)
    assert "model.layers.3.eh_proj.weight" in index  # the MTP layer (L = num_hidden_layers = 3)
    assert "model.layers.3.shared_head.head.weight" in index
    assert (fp8_ckpt / "tokenizer.json").is_file() and (fp8_ckpt / "tokenizer_config.json").is_file()


def test_fp8_weights_dequantise_exactly_like_the_reference(fp8_ckpt):
    model, reader = load_verifier(fp8_ckpt, ParallelContext(), keep_fp8=False, show_progress=False)
    for name in ["model.layers.0.mlp.gate_proj.weight", "model.layers.2.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.1.mlp.experts.5.down_proj.weight"]:
        w, s = reader.read(name), reader.read(name + "_scale_inv")
        expected = kernels.weight_dequant(w, s, impl="torch")
        got = model.get_parameter(name)
        assert torch.equal(got, expected), name
    assert model.mtp_tensors and all(n.startswith("model.layers.3.") for n in model.mtp_tensors)


def test_fp8_kept_in_fp8_gives_same_logits_as_dequantised(fp8_ckpt):
    a, _ = load_verifier(fp8_ckpt, ParallelContext(), keep_fp8=False, show_progress=False)
    b, _ = load_verifier(fp8_ckpt, ParallelContext(), keep_fp8=True, show_progress=False)
    assert b.model.layers[1].self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    logits = []
    for m in (a, b):
        kv, pe = torch.zeros(4, 1, 8, 128), torch.zeros(4, 1, 8, 32)
        pos = torch.arange(8).expand(1, 8)
        with torch.inference_mode():
            logits.append(m(ids, pos, kv, pe, pos, pos.unsqueeze(-1) >= pos.unsqueeze(1)).logits)
    # FP8 GEMM also quantises activations (and MoE routing may flip), so the model is only close ...
    assert torch.nn.functional.cosine_similarity(logits[0].flatten(), logits[1].flatten(), dim=0) > 0.95
    # ... while one FP8 linear equals the float product of its quantised activations and dequantised weight
    fp8_lin = b.model.layers[1].self_attn.q_a_proj
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    xq, xs = kernels.act_quant(x, impl="torch")
    x_deq = (xq.float().view(3, 2, 128) * xs.unsqueeze(-1)).view(3, 256)
    expected = x_deq @ a.model.layers[1].self_attn.q_a_proj.weight.T
    torch.testing.assert_close(fp8_lin(x), expected, rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_decodes(fp8_ckpt):
    eng = Engine.from_pretrained(fp8_ckpt, device="cpu", max_seq_len=128)
    out = eng.generate(["def f(x):", "import"], max_new_tokens=8)
    assert [len(t) for t in out.token_ids] == [8, 8] or any(1 in t for t in out.token_ids)
    assert out.stats.tokens == sum(map(len, out.token_ids))


def test_fp8_cast_to_bf16_matches_dequantisation(fp8_ckpt, tmp_path):
    out = cast(fp8_ckpt, tmp_path / "bf16")
    reader = CheckpointReader(out)
    assert not any(n.endswith("_scale_inv") for n in reader.weight_map)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    src = CheckpointReader(fp8_ckpt)
    name = "model.layers.2.mlp.shared_experts.up_proj.weight"
    expected = kernels.weight_dequant(src.read(name), src.read(name + "_scale_inv"), out_dtype=torch.bfloat16)
    assert torch.equal(reader.read(name), expected)
    assert reader.read(name).dtype == torch.bfloat16
    Engine.from_pretrained(out, device="cpu", max_seq_len=32).generate([[5, 6, 7]], max_new_tokens=2)


# ---------------------------------------------------------------- bad checkpoints

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard_of(ckpt: Path, name: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / index[name]


def _rewrite_shard(ckpt: Path, name: str, edit) -> None:
    shard = _shard_of(ckpt, name)
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _generate(ckpt: Path):
    return run_cli(["-m", "specdec.generate", "--ckpt-path", str(ckpt), "--prompt", "x", "--max-new-tokens", "2"])


def test_missing_shard(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    shard = _shard_of(ck, "model.layers.2.self_attn.o_proj.weight")
    shard.unlink()
    _assert_one_line_error(_generate(ck), shard.name, "missing")


def test_missing_tensor(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite_shard(ck, name, lambda t: t.pop(name))
    index_file = ck / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    _assert_one_line_error(_generate(ck), name, "missing")


def test_shape_mismatch_with_config(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    name = "model.layers.0.input_layernorm.weight"
    _rewrite_shard(ck, name, lambda t: t.__setitem__(name, torch.ones(100, dtype=torch.bfloat16)))
    _assert_one_line_error(_generate(ck), name, "shape")


def test_missing_scale(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    name = "model.layers.2.self_attn.q_b_proj.weight_scale_inv"
    _rewrite_shard(ck, name, lambda t: t.pop(name))
    _assert_one_line_error(_generate(ck), "model.layers.2.self_attn.q_b_proj.weight", "_scale_inv")


def test_corrupt_shard(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    shard = _shard_of(ck, "model.norm.weight")
    shard.write_bytes(shard.read_bytes()[:200])
    _assert_one_line_error(_generate(ck), shard.name)


def test_missing_checkpoint_dir(tmp_path):
    _assert_one_line_error(_generate(tmp_path / "nope"), "nope")


def test_missing_tokenizer(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    (ck / "tokenizer.json").unlink()
    _assert_one_line_error(_generate(ck), "tokenizer.json")


def test_reader_reports_missing_index_shard(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    next(ck.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002"):
        CheckpointReader(ck)


def test_wrong_dtype(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    name = "model.norm.weight"
    _rewrite_shard(ck, name, lambda t: t.__setitem__(name, torch.ones(256, dtype=torch.int32)))
    _assert_one_line_error(_generate(ck), name, "dtype")


def test_fp8_weight_stored_as_float_where_fp8_is_kept(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite_shard(ck, name, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match="expected float8_e4m3fn"):
        load_verifier(ck, ParallelContext(), keep_fp8=True, show_progress=False)


def test_kv_lora_rank_mismatch_with_config(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["kv_lora_rank"] = 64
    (ck / "config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(_generate(ck), "kv_a_proj_with_mqa", "shape")


def test_heads_not_divisible_by_world_size(fp8_ckpt, tmp_path):
    ck = _copy(fp8_ckpt, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    with pytest.raises(Exception, match="not divisible by world size 3"):
        load_verifier(ck, ParallelContext(3, 0), show_progress=False)
    assert cfg["num_attention_heads"] % 3


def test_fp8_kv_b_is_dequantised_once_at_load(fp8_ckpt, monkeypatch):
    """An FP8 kv_b_proj is dequantised at load (verifier and MTP layer), not in every forward; the
    forward's output is what per-call dequantisation gave."""
    from specdec.model import mla
    from specdec.mtp.drafter import load_drafter
    model, reader = load_verifier(fp8_ckpt, ParallelContext(), keep_fp8=True, show_progress=False)
    drafter = load_drafter(model, reader, "cpu", model.fp8_block, False)
    layers = [m for m in list(model.modules()) + list(drafter.layer.modules()) if isinstance(m, mla.MLA)]
    assert len(layers) == model.args.n_layers + 1 and all(m.kv_b_absorbed is not None for m in layers)
    assert "kv_b_absorbed" not in "".join(model.state_dict())  # not a checkpoint tensor
    ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).expand(1, 8)

    def logits() -> torch.Tensor:
        kv, pe = torch.zeros(4, 1, 8, 128), torch.zeros(4, 1, 8, 32)
        with torch.inference_mode():
            return model(ids, pos, kv, pe, pos, pos.unsqueeze(-1) >= pos.unsqueeze(1)).logits

    once = logits()
    calls = []
    real = kernels.weight_dequant
    monkeypatch.setattr(kernels, "weight_dequant", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(logits(), once) and not calls  # the forward dequantises nothing
    for m in layers:
        m.kv_b_absorbed = None  # back to dequantising per call
    assert torch.equal(logits(), once) and calls


@pytest.mark.parametrize("local", [None, (2, 6)])
def test_fp8_experts_run_grouped_like_one_by_one(fp8_ckpt, local):
    """FP8 experts are stacked at load and run as grouped GEMMs (one per projection for all local
    experts); this rank's routed sum equals running each chosen expert on its tokens, also when the
    rank holds only some experts (expert parallelism: the others' slots give zeros)."""
    model, _ = load_verifier(fp8_ckpt, ParallelContext(), keep_fp8=True, show_progress=False)
    moe = model.model.layers[1].mlp
    assert isinstance(moe.routed_backend, GroupedFP8Experts)
    w, _ = moe.routed_backend.stacks["down_proj"]
    assert moe.experts[str(moe.local_experts.start)].down_proj.weight.data_ptr() == w.data_ptr()  # views, no copy
    if local is not None:
        moe.local_experts = range(*local)
        moe.routed_backend = GroupedFP8Experts(moe)
    flat = torch.randn(7, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    weights, indices = moe.gate(flat)
    with torch.inference_mode():
        grouped = moe.routed_backend(flat, weights, indices)
        stacked = moe.routed_backend.stacks
        one_by_one = moe.routed_local(flat, weights, indices)
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-5, atol=1e-5)
    if local is not None:
        others = ~((indices >= local[0]) & (indices < local[1])).any(dim=1)
        assert torch.equal(grouped[others], torch.zeros_like(grouped[others]))  # no local expert: zero
    assert stacked["gate_proj"][0].shape[0] == len(moe.local_experts)
