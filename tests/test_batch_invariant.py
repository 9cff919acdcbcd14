"""The batch-invariant mode: a token's logits are bitwise the same decoded alone or verified among drafts.

1. The torch kernel set (`kernels.invariant_reference`, the CPU's): each row's bits do not depend
   on the rows beside it (FP8 linears included); results match the usual ops; a verified chain's
   and tree's logits equal the decoded ones bit for bit in bfloat16 and float32, with FP8 weights
   too; greedy MTP (chain, adaptive, tree, continuous batching) equals plain greedy in bfloat16.
2. The Triton kernel set (`kernels.triton_invariant`, CUDA's), run by the interpreter in one fresh
   subprocess (TRITON_INTERPRET=1): rows invariant and close to torch, a chain's and a tree's
   attention queries equal to themselves alone, a model's verified chain and tree equal to their
   decoded paths in bfloat16. (Two ranks: `test_distributed`; paged and FP8 pools: `test_attention_kernel`.)
3. Configuration errors.

No verdict here compares against the usual (batch-variant) kernels' bits: whether those part is
up to each CPU's BLAS, so only the mode's own promise is tested.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from specdec import Engine
from specdec.config import SpecConfig
from specdec.kernels import fp8_linear, weight_quant
from specdec.kernels import invariant_reference as ref_ops
from specdec.kernels.attention import mla_attention_reference
from specdec.model.errors import ConfigError
from specdec.model.parallel import ParallelContext
from specdec.model.prepare import prepare_batch_invariant
from specdec.model.synthetic import random_tensors, small_config, write_random_checkpoint
from specdec.model.args import from_hf_config
from specdec.model.transformer import Transformer
from tests.interpreter_harness import main as interpreter_main
from tests.interpreter_harness import results_in_interpreter
from specdec.bench.invariance import verified_and_decoded

TINY_BF16 = small_config(vocab_size=8, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32,
                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
"""A 2-layer (dense + MoE) model with an 8-token vocabulary: few kernel launches under the interpreter."""
PROMPT = [1, 2, 3, 4, 5, 6, 7, 0, 1, 3, 5]
TREE_NODES = [2, 5, 1, 7, 3, 3, 6]  # root, then 6 nodes
TREE_PARENTS = [0, 0, 1, 1, 2, 4]  # two branches at the root and at node 1, depth 3


def tiny_model(kernels: str | None, dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """The 2-layer test model with random weights, its kernels the batch-invariant set `kernels`."""
    args = from_hf_config(TINY_BF16)
    model = Transformer(args, ParallelContext(), dtype, None, 64)
    state = {k: v for k, v in random_tensors(TINY_BF16, seed=5).items() if not k.startswith(f"model.layers.{args.n_layers}.")}
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() and "gate.weight" not in k else v
                           for k, v in state.items()}, strict=True)
    if kernels is not None:
        prepare_batch_invariant(model, kernels)
    return model.eval()


# ----------------------------------------------------------------------------- 1. the torch set


def _row_invariance(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    """op over the first m rows gives the first m rows of op over all of them, bit for bit."""
    whole = op(x)
    for m in (1, 2, 5, x.shape[0] - 1):
        assert torch.equal(op(x[:m]), whole[:m]), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_set_rows_do_not_depend_on_the_rows_beside_them(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 96, generator=g).to(dtype)
    w = torch.randn(200, 96, generator=g).to(dtype)
    _row_invariance(lambda t: ref_ops.linear(t, w), x)
    torch.testing.assert_close(ref_ops.linear(x, w), F.linear(x, w))
    norm_w = torch.randn(96, generator=g).to(dtype)
    _row_invariance(lambda t: ref_ops.rms_norm(t, norm_w, 1e-6), x)
    _row_invariance(lambda t: ref_ops.gate_scores(t, "sigmoid"), x.float())
    _row_invariance(lambda t: ref_ops.gate_scores(t, "softmax"), x.float())
    torch.testing.assert_close(ref_ops.gate_scores(x, "softmax"), x.float().softmax(-1))
    up = torch.randn(9, 96, generator=g).to(dtype)
    _row_invariance(lambda t: ref_ops.silu_mul(t, up[: t.shape[0]]), x)
    torch.testing.assert_close(ref_ops.silu_mul(x, up), F.silu(x) * up, atol=2e-2, rtol=2e-2)
    w8, s8 = weight_quant(torch.randn(200, 256, generator=g))
    x256 = torch.randn(9, 256, generator=g).to(dtype)
    _row_invariance(lambda t: ref_ops.fp8_linear(t, w8, s8), x256)
    torch.testing.assert_close(ref_ops.fp8_linear(x256, w8, s8), fp8_linear(x256, w8, s8, impl="torch"))
    heads = torch.randn(4, 96, 32, generator=g).to(dtype)
    xb = x.unsqueeze(0).expand(4, -1, -1)
    whole = ref_ops.bmm(xb, heads)
    assert torch.equal(ref_ops.bmm(xb[:, :3], heads), whole[:, :3])
    torch.testing.assert_close(whole, torch.bmm(xb, heads))


def test_torch_set_attention_of_a_query_does_not_depend_on_the_others_or_the_span() -> None:
    """A chain's query j equals the same query alone over exactly the slots it sees (later slots
    holding other values), and the usual attention within rounding."""
    g = torch.Generator().manual_seed(1)
    b, t, h, c, r, s = 2, 5, 4, 32, 16, 40
    q, qp = torch.randn(b, t, h, c, generator=g).bfloat16(), torch.randn(b, t, h, r, generator=g).bfloat16()
    kv, pe = torch.randn(b, s, c, generator=g).bfloat16(), torch.randn(b, s, r, generator=g).bfloat16()
    first = torch.tensor([20, 31])
    mask = torch.arange(s).view(1, 1, -1) <= (first.view(-1, 1) + torch.arange(t)).unsqueeze(-1)
    chain = ref_ops.mla_attention(q, qp, kv, pe, mask, 0.2)
    torch.testing.assert_close(chain, mla_attention_reference(q, qp, kv, pe, mask, 0.2), atol=2e-2, rtol=2e-2)
    for j in range(t):
        span = first + j + 1
        for row in range(b):
            garbage_kv, garbage_pe = kv[row : row + 1].clone(), pe[row : row + 1].clone()
            garbage_kv[:, span[row]:] = 7.0
            garbage_pe[:, span[row]:] = -3.0
            alone = ref_ops.mla_attention(q[row : row + 1, j : j + 1], qp[row : row + 1, j : j + 1], garbage_kv,
                                          garbage_pe, mask[row : row + 1, j : j + 1], 0.2)
            assert torch.equal(alone, chain[row : row + 1, j : j + 1]), (row, j)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("parents", [None, TREE_PARENTS], ids=["chain", "tree"])
def test_verified_logits_equal_decoded_logits_bitwise(parents: list[int] | None, dtype: torch.dtype) -> None:
    verified, decoded = verified_and_decoded(tiny_model("torch", dtype), PROMPT, TREE_NODES, parents)
    assert torch.equal(verified, decoded)
    usual, _ = verified_and_decoded(tiny_model(None, dtype), PROMPT, TREE_NODES, parents)
    torch.testing.assert_close(verified, usual, atol=0.1, rtol=0.05)  # the same model, other rounding


@pytest.fixture(scope="module")
def bf16_invariant_engine(tmp_path_factory) -> Engine:
    """The 8-token test model (as `tiny_vocab_ckpt`) in bfloat16 with the torch batch-invariant set."""
    cfg = small_config(vocab_size=8, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
                       qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "v8", cfg, fp8=False, seed=3)
    engine = Engine.from_pretrained(ckpt, device="cpu", dtype=torch.bfloat16, max_seq_len=64, batch_invariant="auto")
    engine.eos_ids = frozenset()
    return engine


@pytest.mark.parametrize("spec", [SpecConfig(depth=3, adaptive=False), SpecConfig(depth=3),
                                  SpecConfig(depth=3, topk=2, nodes=6)], ids=["chain3", "adaptive3", "tree3x2x6"])
def test_greedy_mtp_equals_plain_greedy_in_bf16(bf16_invariant_engine: Engine, spec: SpecConfig) -> None:
    engine = bf16_invariant_engine
    assert engine.model.lm_head.invariant is ref_ops  # "auto" on the CPU: the torch set
    prompts = [[1, 2, 3, 4, 5], [7, 6, 5], [3, 3, 1, 0, 2, 6, 7], [4], [5, 5, 5, 5]]
    plain = engine.generate(prompts, max_new_tokens=20).token_ids
    for max_batch in (None, 2):  # static, and continuous batching (rows join as others finish)
        out = engine.generate(prompts, max_new_tokens=20, spec=spec, max_batch=max_batch)
        assert out.token_ids == plain, max_batch
        if not spec.adapts:  # (an adaptive run's depths follow timings)
            assert out.stats.tau > 1.0  # drafts were accepted, so verified tokens were emitted


# ----------------------------------------------------------------------------- 3. configuration


def test_batch_invariant_refuses_compile(fp8_ckpt) -> None:
    with pytest.raises(ConfigError, match="--batch-invariant and --compile are exclusive"):
        Engine.from_pretrained(fp8_ckpt, device="cpu", batch_invariant="auto", compile=True)


def test_fp8_weights_kept_in_fp8_verify_as_they_decode(fp8_ckpt) -> None:
    """FP8 projections (kept FP8, as on CUDA) run the set's `fp8_linear`: still bit for bit."""
    engine = Engine.from_pretrained(fp8_ckpt, device="cpu", dtype=torch.bfloat16, max_seq_len=64, keep_fp8=True,
                                    batch_invariant="auto")
    assert any(getattr(m, "weight_scale_inv", None) is not None for m in engine.model.modules())
    verified, decoded = verified_and_decoded(engine.model, [5, 17, 300, 42, 9, 77], [8, 100, 3, 250, 4])
    assert torch.equal(verified, decoded)
    plain = engine.generate(["def f(x):", "import os"], max_new_tokens=10).token_ids
    chain = engine.generate(["def f(x):", "import os"], max_new_tokens=10, spec=SpecConfig(depth=3, adaptive=False))
    assert chain.token_ids == plain


def test_triton_set_on_the_cpu_without_the_interpreter_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        prepare_batch_invariant(tiny_model(None), "triton")


def test_an_fp8_checkpoint_is_dequantised_for_the_mode_and_decodes_like_plain(fp8_ckpt) -> None:
    engine = Engine.from_pretrained(fp8_ckpt, device="cpu", max_seq_len=64, batch_invariant="auto")
    assert engine.model.lm_head.invariant is ref_ops
    assert all(lin.weight_scale_inv is None for lin in engine.model.modules() if hasattr(lin, "weight_scale_inv"))
    plain = engine.generate(["def f(x):"], max_new_tokens=8).token_ids
    assert engine.generate(["def f(x):"], max_new_tokens=8, spec=SpecConfig(depth=2)).token_ids == plain


# ----------------------------------------------------------------------------- 2. the Triton set (interpreter)


def _check_triton_rows() -> None:
    from specdec.kernels import triton_invariant as tri

    assert tri.INTERPRETED
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(37, 96, generator=g).to(dtype)
        w = torch.randn(200, 96, generator=g).to(dtype)
        _row_invariance(lambda t: tri.linear(t, w), x)
        tol = {} if dtype == torch.float32 else {"atol": 0.15, "rtol": 0.02}
        torch.testing.assert_close(tri.linear(x, w).float(), x.float() @ w.float().t(), **tol)
        heads = torch.randn(3, 128, 96, generator=g).to(dtype).transpose(1, 2)  # strided [G, K, N]
        xb = torch.randn(3, 19, 96, generator=g).to(dtype)
        whole = tri.bmm(xb, heads)
        assert torch.equal(tri.bmm(xb[:, :1], heads), whole[:, :1])
        torch.testing.assert_close(whole.float(), torch.bmm(xb.float(), heads.float()), **tol)
        norm_w = torch.randn(96, generator=g).to(dtype)
        _row_invariance(lambda t: tri.rms_norm(t, norm_w, 1e-6), x)
        torch.testing.assert_close(tri.rms_norm(x, norm_w, 1e-6), ref_ops.rms_norm(x, norm_w, 1e-6), **tol)
        up = torch.randn(37, 96, generator=g).to(dtype)
        _row_invariance(lambda t: tri.silu_mul(t, up[: t.shape[0]]), x)
        torch.testing.assert_close(tri.silu_mul(x, up), ref_ops.silu_mul(x, up), **tol)
    w8, s8 = weight_quant(torch.randn(200, 320, generator=g))  # a partial K block too
    x320 = torch.randn(21, 320, generator=g).to(torch.bfloat16)
    _row_invariance(lambda t: tri.fp8_linear(t, w8, s8), x320)
    torch.testing.assert_close(tri.fp8_linear(x320, w8, s8), ref_ops.fp8_linear(x320, w8, s8), atol=0.05, rtol=0.02)
    logits = torch.randn(9, 8, generator=g)
    for func in ("sigmoid", "softmax"):
        _row_invariance(lambda t: tri.gate_scores(t, func), logits)
        torch.testing.assert_close(tri.gate_scores(logits, func), ref_ops.gate_scores(logits, func))


def _check_triton_attention_chain() -> None:
    """Each query of a chain equals itself attended alone over a cache cut at its own slot (later
    slots zero, as plain decoding leaves them), bf16 and float32; close to the reference."""
    from specdec.kernels import triton_invariant as tri

    g = torch.Generator().manual_seed(2)
    b, t, h, c, r, s, first = 1, 5, 4, 128, 32, 80, 37
    mask = (torch.arange(s).view(1, 1, -1) <= (first + torch.arange(t)).view(1, -1, 1)).expand(b, t, s)
    for dtype in (torch.float32, torch.bfloat16):
        q, qp = torch.randn(b, t, h, c, generator=g).to(dtype), torch.randn(b, t, h, r, generator=g).to(dtype)
        kv, pe = torch.randn(b, s, c, generator=g).to(dtype), torch.randn(b, s, r, generator=g).to(dtype)
        chain = tri.mla_attention(q, qp, kv, pe, mask, 0.1)
        torch.testing.assert_close(chain.float(), mla_attention_reference(q, qp, kv, pe, mask, 0.1).float(),
                                   atol=2e-2, rtol=2e-2)
        for j in range(t):
            span = first + j + 1
            cut_kv, cut_pe = kv.clone(), pe.clone()
            cut_kv[:, span:], cut_pe[:, span:] = 0, 0
            alone = tri.mla_attention(q[:, j : j + 1], qp[:, j : j + 1], cut_kv[:, :span], cut_pe[:, :span],
                                      mask[:, j : j + 1, :span], 0.1)
            assert torch.equal(alone, chain[:, j : j + 1]), (dtype, j)


def _check_triton_attention_tree() -> None:
    """A tree node's query equals the same query over a cache holding only the prefix and its
    ancestors at consecutive slots (plain decoding's layout): the siblings in between change nothing."""
    from specdec.kernels import triton_invariant as tri
    from specdec.tree import ancestor_matrix, tree_attention_mask

    g = torch.Generator().manual_seed(3)
    h, c, r, length, n_slots = 4, 128, 32, 21, 40
    ancestors = ancestor_matrix(torch.tensor([TREE_PARENTS]))
    mask = tree_attention_mask(torch.tensor([length]), ancestors, n_slots)
    nodes = len(TREE_PARENTS) + 1
    q, qp = torch.randn(1, nodes, h, c, generator=g).bfloat16(), torch.randn(1, nodes, h, r, generator=g).bfloat16()
    kv, pe = torch.randn(1, n_slots, c, generator=g).bfloat16(), torch.randn(1, n_slots, r, generator=g).bfloat16()
    tree = tri.mla_attention(q, qp, kv, pe, mask, 0.1)
    for node in range(nodes):
        seen = mask[0, node].nonzero().squeeze(1)  # the prefix, then the node's ancestors-or-self by depth
        path_kv, path_pe = torch.zeros_like(kv), torch.zeros_like(pe)
        path_kv[0, : seen.numel()], path_pe[0, : seen.numel()] = kv[0, seen], pe[0, seen]
        alone_mask = (torch.arange(n_slots) < seen.numel()).view(1, 1, -1)
        alone = tri.mla_attention(q[:, node : node + 1], qp[:, node : node + 1], path_kv, path_pe, alone_mask, 0.1)
        assert torch.equal(alone, tree[:, node : node + 1]), node


def _check_triton_model_chain_and_tree() -> None:
    """The 2-layer model on the Triton set in bf16: a verified chain of 4 drafts and a tree of 6 nodes
    equal their tokens decoded one by one, bit for bit."""
    model = tiny_model("triton")
    for nodes, parents in ((TREE_NODES[:5], None), (TREE_NODES, TREE_PARENTS)):
        verified, decoded = verified_and_decoded(model, PROMPT, nodes, parents)
        assert torch.equal(verified, decoded), parents


INTERPRETER_CHECKS: dict[str, Callable[[], None]] = {
    "triton_rows": _check_triton_rows,
    "triton_attention_chain": _check_triton_attention_chain,
    "triton_attention_tree": _check_triton_attention_tree,
    "triton_model_chain_and_tree": _check_triton_model_chain_and_tree,
}


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    """Run the interpreter checks once, in a fresh process with TRITON_INTERPRET=1."""
    return results_in_interpreter(__file__)


@pytest.mark.parametrize("name", list(INTERPRETER_CHECKS))
def test_triton_set_in_the_interpreter(interpreter_results: dict[str, str], name: str) -> None:
    assert interpreter_results[name] == "ok", interpreter_results[name]


if __name__ == "__main__":
    interpreter_main(INTERPRETER_CHECKS)
