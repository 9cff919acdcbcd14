"""Peer check: transformers' DeepseekV3ForCausalLM and specdec on the same random float32 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdec import Engine

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(f32_ckpt):
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(str(f32_ckpt), dtype=torch.float32).eval()
    eng = Engine.from_pretrained(f32_ckpt, device="cpu", dtype=torch.float32, max_seq_len=128)
    return hf, eng


def test_project_kernels_package_does_not_fool_transformers(pair):
    """Run from the checkout (its root on the path), `kernels` is Hugging Face's when installed
    (`import_hub_kernels`, in conftest), never the project's folder, which transformers would import."""
    import sys

    from specdec import kernels as own

    hub = sys.modules.get("kernels")
    assert hub is None or Path(hub.__file__).resolve() != Path(own.__file__).resolve()


def test_prefill_logits_match(pair):
    hf, eng = pair
    ids = torch.randint(3, eng.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = eng.logits(ids.tolist())
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_cached_decode_logits_match_for_16_steps(pair):
    """Feed HF's greedy tokens one by one through specdec's cached decode path; compare every step."""
    hf, eng = pair
    prompt = torch.randint(3, eng.args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_out = hf.generate(prompt, max_new_tokens=17, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=2, eos_token_id=None)
    hf_logits = torch.stack(hf_out.logits, dim=1)[0]  # [17, V]
    hf_tokens = hf_out.sequences[0, prompt.shape[1]:]
    cache = eng.cache_for(1, 64)
    tokens, lengths = eng.pad(prompt.tolist())
    with torch.inference_mode():
        logits = [eng.prefill(cache, tokens, lengths)[0]]
        for t in hf_tokens[:-1]:
            logits.append(eng.decode_step(cache, t.view(1), 1)[0])
    ours = torch.stack(logits)
    assert len(ours) == 17  # prefill + 16 cached decode steps
    torch.testing.assert_close(ours, hf_logits, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_generate(pair):
    hf, eng = pair
    prompt = torch.randint(3, eng.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=2, eos_token_id=None)
    out = eng.generate([prompt[0].tolist()], max_new_tokens=24)
    assert out.token_ids[0] == ref[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("overrides", [
    {"q_lora_rank": None},  # plain q projection
    {"rope_scaling": None, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0},  # no YaRN, no groups
])
def test_config_variants_match(tmp_path, overrides):
    from transformers import DeepseekV3ForCausalLM

    from specdec.model.synthetic import small_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "v", small_config(**overrides), fp8=False, seed=5)
    hf = DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    eng = Engine.from_pretrained(ckpt, device="cpu", dtype=torch.float32, max_seq_len=64)
    ids = torch.randint(3, eng.args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(eng.logits(ids.tolist()), ref, rtol=1e-4, atol=1e-4)
