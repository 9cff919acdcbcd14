"""Randomly initialised DeepSeek-V3-shaped checkpoints in the exact released layout.

`python -m specdec.model.synthetic --out DIR [--bf16]` writes one (small config by default). Tests use it
to exercise the loader, the FP8 path and the MTP layer without any download; the demo uses it
until a trained default model ships.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from specdec.model.args import from_hf_config
from specdec.model.export import quantize_state, write_checkpoint
from specdec.model.parallel import ParallelContext
from specdec.model.tokenizer_build import train_bpe, tokenizer_files
from specdec.model.mtp_layer import MTPLayer
from specdec.model.transformer import Transformer


def small_config(vocab_size: int = 512, **overrides) -> dict:
    """A small HF `config.json` with every DeepSeek-V3 feature: q-LoRA, groups, YaRN, MoE, dense layer, MTP.

    Sharded dims split on 128-blocks at 2 ranks (so FP8 stays FP8 when pre-sharded), while
    `q_lora_rank` 192 and `kv_a_proj` 160 rows exercise partial FP8 blocks.
    """
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "n_shared_experts": 2,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "q_lora_rank": 192,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]},
    }
    cfg.update(overrides)
    return cfg


def random_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 random weights for every tensor of the checkpoint, MTP layer included, by HF name."""
    args = from_hf_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        main = Transformer(args, ParallelContext(), torch.float32, None, 8)
        mtp = MTPLayer(args.n_layers, args, ParallelContext(), torch.float32, None)
    shapes = {n: tuple(p.shape) for n, p in main.named_parameters()}
    for i in range(args.n_layers, args.n_layers + args.n_mtp_layers):
        shapes.update({f"model.layers.{i}.{n}": tuple(t.shape) for n, t in mtp.named_parameters()})
    out = {name: _init(name, shape, gen) for name, shape in shapes.items()}
    for i in range(args.n_layers, args.n_layers + args.n_mtp_layers):  # the release duplicates these
        out[f"model.layers.{i}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{i}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def write_random_checkpoint(out_dir: str | Path, config: dict | None = None, fp8: bool = True, seed: int = 0,
                            tokenizer_texts: list[str] | None = None, shard_bytes: int = 1 << 20) -> Path:
    """Write a random checkpoint (FP8 unless `fp8=False`, then float32) with a BPE tokenizer."""
    config = dict(config or small_config())
    tensors = random_tensors(config, seed)
    if fp8:
        tensors = quantize_state(tensors)
    else:
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
    texts = tokenizer_texts or _default_texts()
    tok = train_bpe(texts, config["vocab_size"])
    return write_checkpoint(out_dir, tensors, config, tokenizer_files(tok, config["max_position_embeddings"]),
                            shard_bytes=shard_bytes)


def _default_texts() -> list[str]:
    """A little Python source from the standard library (always present) to train the tokenizer on."""
    import json as json_mod
    import textwrap as textwrap_mod

    return [Path(m.__file__).read_text() for m in (json_mod, textwrap_mod, argparse)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.model.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write (replaced if present)")
    parser.add_argument("--bf16", action="store_true", help="write float weights without FP8 quantisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    a = parser.parse_args(argv)
    path = write_random_checkpoint(a.out, small_config(a.vocab_size), fp8=not a.bf16, seed=a.seed)
    print(f"wrote random checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
