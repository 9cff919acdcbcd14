"""ModelArgs from HF config.json and from the demo's JSON; YaRN RoPE against transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from specdec.model.args import from_hf_config, load_model_args
from specdec.model.errors import ConfigError
from specdec.model.rope import rope_inv_freq
from specdec.model.synthetic import small_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

V3_HF = {  # the fields of DeepSeek-V3's released config.json that specdec reads
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "first_k_dense_replace": 3, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}


def test_v3_hf_config_and_demo_671b_agree():
    hf = from_hf_config(V3_HF)
    demo = load_model_args(CONFIGS / "config_671B.json")
    for field in ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
                  "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                  "n_limited_groups", "score_func", "route_scale", "q_lora_rank", "kv_lora_rank",
                  "qk_rope_head_dim", "rope_factor", "original_seq_len", "has_score_bias", "fp8_block_size",
                  "n_mtp_layers"]:
        assert getattr(hf, field) == getattr(demo, field), field
    assert math.isclose(hf.softmax_scale, demo.softmax_scale)
    assert math.isclose(hf.softmax_scale, 192**-0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_demo_v2_configs():
    lite = load_model_args(CONFIGS / "config_16B.json")
    assert lite.q_lora_rank == 0 and lite.score_func == "softmax" and lite.n_expert_groups == 1
    assert not lite.has_score_bias and lite.fp8_block_size is None and lite.n_mtp_layers == 0
    big = load_model_args(CONFIGS / "config_236B.json")
    assert (big.n_expert_groups, big.n_limited_groups, big.route_scale) == (8, 3, 16.0)


def test_v2_hf_config():
    cfg = {**V3_HF, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy", "n_group": 8,
           "topk_group": 3, "norm_topk_prob": False}
    del cfg["scoring_func"]
    args = from_hf_config(cfg)
    assert args.score_func == "softmax" and not args.has_score_bias and not args.norm_topk_prob
    assert args.n_expert_groups == 8


def test_yarn_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = small_config()
    cfg.pop("quantization_config")
    hf_cfg = DeepseekV3Config(**cfg)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    args = from_hf_config(cfg)
    torch.testing.assert_close(rope_inv_freq(args), inv_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(args.rope_attention_factor, attention_factor)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.pop("hidden_size") and c.update(dim=1), "unknown field"),
    (lambda c: c.pop("kv_lora_rank"), "kv_lora_rank"),
    (lambda c: c.update(n_routed_experts=6), "not divisible by n_group"),
    (lambda c: c.update(model_type="llama"), "model_type"),
    (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
])
def test_bad_configs(tmp_path, edit, needle):
    cfg = small_config()
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=needle):
        load_model_args(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model_args(tmp_path)
