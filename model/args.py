"""Model hyper-parameters (`ModelArgs`) read from a Hugging Face `config.json` or a demo-style JSON.

Two sources describe the same architecture with different field names:

* Hugging Face `config.json` (`model_type` `deepseek_v3` or `deepseek_v2`): `hidden_size`,
  `num_hidden_layers`, `rope_scaling` (or transformers-5 `rope_parameters`), ...
* The official inference demo's JSON (`configs/config_671B.json` ...): `dim`, `n_layers`, ...

Both become one frozen `ModelArgs`; nothing else in the code reads raw config dicts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from specdec.model.errors import ConfigError

ScoreFunc = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a DeepSeek-V2/V3 model (dims are element counts, not bytes)."""

    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: ScoreFunc = "sigmoid"
    route_scale: float = 2.5
    norm_topk_prob: bool = True
    has_score_bias: bool = True  # `e_score_correction_bias` (V3's aux-loss-free balancing)
    # MLA
    q_lora_rank: int = 1536  # 0: plain q projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE / YaRN
    rope_theta: float = 10000.0
    rope_factor: float = 40.0  # 1.0: no YaRN
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    # MTP modules stored after the main layers (layer index n_layers ...)
    n_mtp_layers: int = 1
    max_position_embeddings: int = 163840
    # checkpoint storage
    fp8_block_size: int | None = 128  # None: BF16/float checkpoint
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: head_dim^-0.5, times YaRN's mscale² when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.rope_factor > 1.0 and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """YaRN factor multiplied into cos/sin (Hugging Face's rule; 1.0 when mscale == mscale_all_dim)."""
        if self.rope_factor <= 1.0:
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.mscale) / yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return yarn_mscale(self.rope_factor, 1.0)

    def validate(self) -> None:
        """Raise ConfigError on values no model can have."""
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be > 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config field qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_dense_layers < self.n_layers:
            if self.n_activated_experts > self.n_routed_experts or self.n_activated_experts < 1:
                raise ConfigError(
                    f"num_experts_per_tok={self.n_activated_experts} must be in [1, n_routed_experts={self.n_routed_experts}]"
                )
            if self.n_routed_experts % self.n_expert_groups:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_expert_groups}"
                )
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                raise ConfigError(f"topk_group={self.n_limited_groups} must be in [1, n_group={self.n_expert_groups}]")


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention-magnitude correction 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any]:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind not in ("yarn", "default"):
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (expected 'yarn' or none)")
    return scaling if kind == "yarn" else {}


def from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """Build ModelArgs from a Hugging Face DeepSeek-V2/V3 `config.json` dict."""
    model_type = cfg.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"config.json model_type {model_type!r} is not deepseek_v3 or deepseek_v2")
    try:
        scaling = _rope_scaling(cfg)
        rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        n_layers = int(cfg["num_hidden_layers"])
        v3 = model_type == "deepseek_v3"
        score_func = cfg.get("scoring_func", "sigmoid" if v3 else "softmax")
        quant = cfg.get("quantization_config") or {}
        block = quant.get("weight_block_size")
        if block is not None and (block[0] != block[1]):
            raise ConfigError(f"quantization_config.weight_block_size {block} must be square")
        eos = cfg.get("eos_token_id", 1)
        n_group = cfg.get("n_group") or 1
        topk_method = cfg.get("topk_method", "noaux_tc" if v3 else "greedy")
        args = ModelArgs(
            vocab_size=int(cfg["vocab_size"]),
            dim=int(cfg["hidden_size"]),
            inter_dim=int(cfg["intermediate_size"]),
            moe_inter_dim=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
            n_layers=n_layers,
            n_dense_layers=int(cfg.get("first_k_dense_replace", 0)) if cfg.get("n_routed_experts") else n_layers,
            n_heads=int(cfg["num_attention_heads"]),
            n_routed_experts=int(cfg.get("n_routed_experts") or 0),
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            n_activated_experts=int(cfg.get("num_experts_per_tok") or 0),
            n_expert_groups=int(n_group) if topk_method != "greedy" else 1,
            n_limited_groups=int(cfg.get("topk_group") or 1) if topk_method != "greedy" else 1,
            score_func=score_func,
            route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)),
            has_score_bias=topk_method == "noaux_tc",
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            rope_theta=float(rope_theta),
            rope_factor=float(scaling.get("factor", 1.0)),
            original_seq_len=int(scaling.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))),
            beta_fast=float(scaling.get("beta_fast", 32)),
            beta_slow=float(scaling.get("beta_slow", 1)),
            mscale=float(scaling.get("mscale") or 0.0),
            mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            n_mtp_layers=int(cfg.get("num_nextn_predict_layers", 0)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            fp8_block_size=int(block[0]) if block else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        )
    except KeyError as e:
        raise ConfigError(f"config.json is missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a bad value: {e}") from None
    if score_func not in ("softmax", "sigmoid"):
        raise ConfigError(f"config.json scoring_func {score_func!r} is not softmax or sigmoid")
    args.validate()
    return args


_DEMO_DEFAULTS = {  # the official demo's ModelArgs defaults for fields its JSONs may omit
    "n_expert_groups": 1,
    "n_limited_groups": 1,
    "score_func": "softmax",
    "route_scale": 1.0,
    "q_lora_rank": 0,
    "original_seq_len": 4096,
    "rope_theta": 10000.0,
    "rope_factor": 40.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
}


def from_demo_config(cfg: dict[str, Any]) -> ModelArgs:
    """Build ModelArgs from the official demo's JSON (`dim`, `n_layers`, `dtype`, ...)."""
    names = {f.name for f in fields(ModelArgs)}
    known = names | {"dtype", "max_batch_size", "max_seq_len", "scale_fmt"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"demo config has unknown field(s): {', '.join(unknown)}")
    merged = {**_DEMO_DEFAULTS, **{k: v for k, v in cfg.items() if k in names}}
    sigmoid = merged["score_func"] == "sigmoid"
    merged.setdefault("has_score_bias", merged.get("dim") == 7168)  # the demo's rule for V3's router bias
    merged.setdefault("norm_topk_prob", sigmoid)
    merged.setdefault("mscale_all_dim", merged["mscale"])
    merged.setdefault("n_mtp_layers", 1 if sigmoid else 0)
    merged["fp8_block_size"] = 128 if cfg.get("dtype") == "fp8" else None
    try:
        args = replace(ModelArgs(), **merged)
    except TypeError as e:
        raise ConfigError(f"demo config has a bad value: {e}") from None
    args.validate()
    return args


def load_model_args(path: str | Path) -> ModelArgs:
    """Read ModelArgs from a checkpoint directory (its config.json) or from a JSON file of either style."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: config file not found")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: cannot read JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    try:
        return from_hf_config(cfg) if "hidden_size" in cfg else from_demo_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
