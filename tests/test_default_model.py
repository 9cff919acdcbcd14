"""The embedded default model: shipped in the package, loaded by the same loader as any checkpoint."""

from __future__ import annotations

import json

import pytest

from specdec.mtp.eval import evaluate, heldout_stream
from specdec.mtp.data import heldout_windows
from specdec import Engine, SpecConfig
from specdec.defaults import PACKAGED_MODEL


@pytest.fixture(scope="module")
def default_engine():
    return Engine.from_pretrained(None, device="cpu", max_seq_len=512)


def test_default_model_is_shipped_in_the_release_layout(default_engine):
    assert default_engine.checkpoint == PACKAGED_MODEL and default_engine.notice is None
    cfg = json.loads((PACKAGED_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    size = sum(f.stat().st_size for f in PACKAGED_MODEL.iterdir())
    assert size <= 30 * 2**20
    assert default_engine.drafter is not None


def test_generation_on_a_heldout_prompt_is_code_not_repetition(default_engine):
    prompt = "def test_reverse_list(self):\n    items = [1, 2, 3]\n"
    out = default_engine.generate([prompt], max_new_tokens=64)
    ids, text = out.token_ids[0], out.texts[0]
    assert len(set(ids)) >= 16, text  # not a loop over a handful of tokens
    assert max(ids.count(t) for t in set(ids)) <= len(ids) // 3, text
    assert sum(ch.isprintable() or ch in "\n\t" for ch in text) >= 0.95 * len(text)
    assert any(word in text for word in ("self", "assert", "def ", "return", "(")), text


def test_mtp_head_agrees_with_the_main_model_on_heldout_code(default_engine):
    stream = heldout_stream(default_engine, max_chars=200_000)
    result = evaluate(default_engine, heldout_windows(stream, 8, 128))
    assert result["mtp_agreement"] > 0.5, result
    assert result["perplexity"] < 200, result


def test_speculative_decoding_on_the_default_model_is_lossless_and_accepts(default_engine):
    prompts = ["class Stack:\n    def __init__(self):\n", "def gcd(a, b):\n"]
    plain = default_engine.generate(prompts, max_new_tokens=32)
    for spec in (SpecConfig(depth=2), SpecConfig(depth=2, adaptive=False), SpecConfig(depth=3, topk=2, nodes=6)):
        out = default_engine.generate(prompts, max_new_tokens=32, spec=spec)
        assert out.token_ids == plain.token_ids
        if not spec.adapts:  # an adaptive run's depths follow this machine's timings: no verdict on them
            assert out.stats.tau > 1.3, out.stats
