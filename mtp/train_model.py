"""Differentiable DeepSeek-V3 (main model + MTP module) for training, named exactly as the HF checkpoint.

Every parameter's name and shape equals the released checkpoint tensor it is exported to
(`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_a_proj.weight`, ...,
`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, `model.norm.weight`, `lm_head.weight`; the MTP
module at `model.layers.{L}` with `enorm`, `hnorm`, `eh_proj`, a decoder block and
`shared_head.norm`). The MTP module shares the main embedding and head during training (as in the
DeepSeek-V3 paper); `export_tensors` writes the copies the release stores at
`model.layers.{L}.embed_tokens` / `model.layers.{L}.shared_head.head`.

The math is the inference model's, and where the two forms agree the code is too: the norms and
the router are `model.parallel.RMSNorm` and `model.moe.Gate` (float32 RMSNorm; sigmoid router whose
`e_score_correction_bias` affects selection only, group-limited top-k, weights normalised over the
top-k times `routed_scaling_factor`) with weights that train, and RoPE is `model.rope`'s
interleaved-pair form and tables. What differs is the form training needs: MLA with q-LoRA and a
normalised KV latent is computed in the plain (non-absorbed) causal form via
`F.scaled_dot_product_attention`, which equals the absorbed decode path mathematically, over
`nn.Linear` weights; each routed expert runs on the tokens sorted to it; shared experts and dense
first layers as the inference model has them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from specdec import kernels
from specdec.model import moe, parallel
from specdec.model.args import ModelArgs
from specdec.model.export import is_fp8_tensor
from specdec.model.rope import apply_rope, rope_tables


def _norm(dim: int, eps: float) -> parallel.RMSNorm:
    """The inference model's RMSNorm (`model.parallel.RMSNorm`) with a float32 weight that trains."""
    norm = parallel.RMSNorm(dim, eps, torch.float32)
    norm.weight.requires_grad_(True)
    return norm


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


class MLA(nn.Module):
    """Multi-head latent attention, training form: K/V are expanded from the latent per head."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.softmax_scale = args.softmax_scale
        q_out = args.n_heads * args.qk_head_dim
        if args.q_lora_rank == 0:
            self.q_proj = _linear(args.dim, q_out)
        else:
            self.q_a_proj = _linear(args.dim, args.q_lora_rank)
            self.q_a_layernorm = _norm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = _linear(args.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = _linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim)
        self.kv_a_layernorm = _norm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = _linear(args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim))
        self.o_proj = _linear(args.n_heads * args.v_head_dim, args.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention.

        Args:
            x: `[B, T, dim]` normed hidden states.
            cos, sin: `[1 or B, T, rope_dim/2]` rotary tables at positions 0..T-1.
        Returns:
            `[B, T, dim]`.
        """
        q, k, v = self.project(x, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return self.output(out)

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values of `x` `[B, T, dim]`, RoPE applied at the tables' positions.

        Returns:
            q, k `[B, H, T, nope + rope]` and v `[B, H, T, v_head_dim]`.
        """
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(bsz, seqlen, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(bsz, seqlen, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe.to(q_nope.dtype)], dim=-1)
        k = torch.cat([k_nope, k_pe.to(k_nope.dtype).expand(-1, -1, self.n_heads, -1)], dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def output(self, heads: torch.Tensor) -> torch.Tensor:
        """Attention output per head `[B, H, T, v_head_dim]` → `[B, T, dim]` through o_proj."""
        bsz, _, seqlen, _ = heads.shape
        return self.o_proj(heads.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.v_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); used for dense layers, routed and shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = _linear(dim, inter_dim)
        self.up_proj = _linear(dim, inter_dim)
        self.down_proj = _linear(inter_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., dim]` → `[..., dim]`."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(moe.Gate):
    """The inference router (`model.moe.Gate`: scores, group-limited top-k, weights) with a weight
    that trains; `e_score_correction_bias [E]` is set by load balancing, not by gradient. Scores stay
    float32 under autocast."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.weight.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, dim]` → (weights `[N, topk]` float32, differentiable; expert indices `[N, topk]` int64)."""
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


class MoE(nn.Module):
    """DeepSeekMoE: shared experts on every token + top-k routed experts, tokens grouped by expert."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_routed_experts = args.n_routed_experts
        self.gate = Gate(args)
        self.experts = nn.ModuleDict({str(i): MLP(args.dim, args.moe_inter_dim) for i in range(args.n_routed_experts)})
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[..., dim]` → (output `[..., dim]`, tokens routed to each expert `[E]` int64)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = self.gate(flat)
        routed, counts = self._routed(flat, weights, indices)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape), counts

    def _routed(self, flat: torch.Tensor, weights: torch.Tensor,
                indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort the (token, slot) pairs by expert, run each expert on its contiguous run, scatter back.

        flat `[N, dim]`, weights/indices `[N, k]` → (`[N, dim]` weighted sum, counts `[E]`).
        """
        k = indices.shape[1]
        order = indices.flatten().argsort(stable=True)
        token = order // k
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)
        runs = flat[token].split(counts.tolist())
        out = torch.cat([self.experts[str(e)](run) for e, run in enumerate(runs) if run.shape[0]], dim=0)
        out = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(flat, dtype=out.dtype).index_add_(0, token, out).to(flat.dtype), counts


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(x)); dense MLP below `n_dense_layers`, else MoE."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = _norm(args.dim, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = _norm(args.dim, args.rms_norm_eps)
        dense = layer_id < args.n_dense_layers
        self.mlp = MLP(args.dim, args.inter_dim) if dense else MoE(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x `[B, T, dim]` → (`[B, T, dim]`, per-expert token counts `[E]` or None for a dense layer)."""
        return self.ffn(x + self.self_attn(self.input_layernorm(x), cos, sin))

    def ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's second half: x + mlp(norm(x)), and the MoE's per-expert counts `[E]` (None if dense)."""
        ffn_in = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, counts = self.mlp(ffn_in)
            return x + y, counts
        return x + self.mlp(ffn_in), None


class SharedHeadNorm(nn.Module):
    """`shared_head.norm` of the MTP module (its `shared_head.head` is the main `lm_head` while training)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.norm = _norm(args.dim, args.rms_norm_eps)


class MTPBlock(Block):
    """MTP module `model.layers.{L}`: enorm, hnorm, eh_proj `[dim, 2·dim]`, a decoder block, shared_head.norm."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__(layer_id, args)
        self.enorm = _norm(args.dim, args.rms_norm_eps)
        self.hnorm = _norm(args.dim, args.rms_norm_eps)
        self.eh_proj = _linear(2 * args.dim, args.dim)
        self.shared_head = SharedHeadNorm(args)

    def combine(self, emb_next: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """eh_proj(cat([enorm(embed(t_{i+1})), hnorm(h_i)])): `[B, T, dim]` x2 → `[B, T, dim]` (embedding first)."""
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(hidden)], dim=-1))


class Decoder(nn.Module):
    """`model.*`: embed_tokens, main layers 0..L-1 followed by the MTP module(s), final norm."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        main = [Block(i, args) for i in range(args.n_layers)]
        mtp = [MTPBlock(i, args) for i in range(args.n_layers, args.n_layers + args.n_mtp_layers)]
        self.layers = nn.ModuleList(main + mtp)
        self.norm = _norm(args.dim, args.rms_norm_eps)


class Forward(NamedTuple):
    """One training forward.

    hidden: `[B, T, dim]` main final hidden after `model.norm`.
    logits: `[B, T, vocab]` float32 main logits (position i predicts token i+1).
    mtp_logits: `[B, T, vocab]` float32 MTP logits (position i predicts token i+2), or None.
    loads: per MoE layer index, tokens routed to each expert `[E]` int64 (main and MTP layers).
    """

    hidden: torch.Tensor
    logits: torch.Tensor
    mtp_logits: torch.Tensor | None
    loads: dict[int, torch.Tensor]


class DeepSeekV3ForTraining(nn.Module):
    """Main model + first MTP module with HF checkpoint parameter names.

    Args:
        args: architecture (the one `from_hf_config` reads back from the exported config.json).
        max_seq_len: positions covered by the RoPE tables.
    """

    def __init__(self, args: ModelArgs, max_seq_len: int) -> None:
        super().__init__()
        if args.n_mtp_layers < 1:
            raise ValueError("training needs num_nextn_predict_layers >= 1")
        self.args, self.max_seq_len = args, max_seq_len
        self.model = Decoder(args)
        self.lm_head = _linear(args.dim, args.vocab_size)
        cos, sin = rope_tables(args, max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def mtp(self) -> MTPBlock:
        """The first MTP module (`model.layers.{L}`)."""
        return self.model.layers[self.args.n_layers]

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Normal(0, std) matrices, residual-output projections scaled by 1/sqrt(2·depth), unit norms, zero bias."""
        depth = self.args.n_layers + self.args.n_mtp_layers
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.zero_()
                elif p.dim() == 1:
                    p.fill_(1.0)
                else:
                    scale = 1 / math.sqrt(2 * depth) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                    p.normal_(0.0, std * scale, generator=generator)

    def rope(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) `[1, seqlen, rope_dim/2]` of positions 0..seqlen-1."""
        if seqlen > self.max_seq_len:
            raise ValueError(f"sequence length {seqlen} exceeds the RoPE tables' {self.max_seq_len}")
        return self.rope_cos[:seqlen].unsqueeze(0), self.rope_sin[:seqlen].unsqueeze(0)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden `[..., dim]` → float32 logits `[..., vocab]` (shared by the MTP module)."""
        return self.lm_head(hidden).float()

    def main_forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """tokens `[B, T]` → (hidden after model.norm `[B, T, dim]`, logits `[B, T, vocab]`, loads)."""
        cos, sin = self.rope(tokens.shape[1])
        h = self.model.embed_tokens(tokens)
        loads: dict[int, torch.Tensor] = {}
        for i in range(self.args.n_layers):
            h, counts = self.model.layers[i](h, cos, sin)
            if counts is not None:
                loads[i] = counts
        hidden = self.model.norm(h)
        return hidden, self.head(hidden), loads

    def mtp_forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MTP module at RoPE positions 0..T-1.

        Args:
            hidden: `[B, T, dim]` main hidden h_i after model.norm.
            next_tokens: `[B, T]` tokens t_{i+1}.
        Returns:
            (logits `[B, T, vocab]` float32 for tokens t_{i+2}, per-expert counts `[E]` or None).
        """
        cos, sin = self.rope(hidden.shape[1])
        mtp = self.mtp
        x = mtp.combine(self.model.embed_tokens(next_tokens), hidden)
        x, counts = mtp(x, cos, sin)
        return self.head(mtp.shared_head.norm(x)), counts

    def mtp_chain_forward(self, hidden: torch.Tensor, tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """The MTP module run as the drafter chains it: depth k feeds depth k+1 its normed output.

        Anchored at every position i = 0..T-1, depth k (1-based) sits at RoPE position i+k-1, reads
        token t_{i+k} and predicts t_{i+k+1}. Its query sees what it sees while drafting: the depth-1
        keys of positions ≤ i (the rows committed from verifier states) and the keys of depths 2..k of
        its own chain (the scratch rows written earlier in the same draft), nothing else. Depth 1 is
        `mtp_forward`.

        Args:
            hidden: `[B, T, dim]` main hidden h_i after model.norm at the anchors.
            tokens: `[B, T + depth]` the window's tokens t_1 .. t_{T+depth} (position p holds t_{p+1}).
            depth: chain length K ≥ 1.
        Returns:
            K logits `[B, T, vocab]` float32; entry k-1 at anchor i is the distribution of t_{i+k+1}.
        """
        bsz, seqlen, _ = hidden.shape
        if tokens.shape[1] < seqlen + depth - 1:
            raise ValueError(f"tokens [{tokens.shape[1]}] must cover the {seqlen} anchors plus {depth - 1} chained")
        cos_all, sin_all = self.rope(seqlen + depth - 1)
        mtp, attn = self.mtp, self.mtp.self_attn
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=hidden.device).tril()
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        logits, h = [], hidden
        for k in range(depth):
            x = mtp.combine(self.model.embed_tokens(tokens[:, k:k + seqlen]), h)
            q, key, value = attn.project(mtp.input_layernorm(x), cos_all[:, k:k + seqlen], sin_all[:, k:k + seqlen])
            keys.append(key)
            values.append(value)
            committed = (q @ keys[0].transpose(-1, -2)).masked_fill(~causal, float("-inf"))  # [B, H, T, T]
            own_chain = [(q * kk).sum(-1, keepdim=True) for kk in keys[1:]]  # [B, H, T, 1] each
            weights = (torch.cat([committed, *own_chain], dim=-1).float() * attn.softmax_scale).softmax(-1)
            weights = weights.to(value.dtype)
            heads = weights[..., :seqlen] @ values[0]
            for j, vv in enumerate(values[1:]):
                heads = heads + weights[..., seqlen + j:seqlen + j + 1] * vv
            x, _ = mtp.ffn(x + attn.output(heads))
            h = mtp.shared_head.norm(x)
            logits.append(self.head(h))
        return logits

    def forward(self, tokens: torch.Tensor, with_mtp: bool = True) -> Forward:
        """tokens `[B, T+1]` (T inputs plus the token after them, which feeds the MTP module) → `Forward` over T."""
        inputs = tokens[:, :-1]
        hidden, logits, loads = self.main_forward(inputs)
        mtp_logits = None
        if with_mtp:
            mtp_logits, counts = self.mtp_forward(hidden, tokens[:, 1:])
            if counts is not None:
                loads[self.args.n_layers] = counts
        return Forward(hidden, logits, mtp_logits, loads)


class Losses(NamedTuple):
    """total = main + mtp_weight · mtp (scalars); loads as in `Forward`."""

    total: torch.Tensor
    main: torch.Tensor
    mtp: torch.Tensor
    loads: dict[int, torch.Tensor]


def training_losses(model: DeepSeekV3ForTraining, window: torch.Tensor, mtp_weight: float) -> Losses:
    """Next-token CE + mtp_weight · next-next-token CE on a batch of windows `[B, T+2]` int64."""
    out = model(window[:, :-1])
    vocab = out.logits.shape[-1]
    main = F.cross_entropy(out.logits.reshape(-1, vocab), window[:, 1:-1].reshape(-1))
    mtp = F.cross_entropy(out.mtp_logits.reshape(-1, vocab), window[:, 2:].reshape(-1))
    return Losses(main + mtp_weight * mtp, main, mtp, out.loads)


@torch.no_grad()
def update_router_bias(model: nn.Module, loads: dict[int, torch.Tensor], gamma: float) -> None:
    """Auxiliary-loss-free balancing: bias_e += gamma · sign(mean load − load_e) for every MoE layer in `loads`."""
    for layer_id, counts in loads.items():
        bias = model.model.layers[layer_id].mlp.gate.e_score_correction_bias
        if bias is None:
            continue
        load = counts.float()
        bias.add_(gamma * torch.sign(load.mean() - load))


def export_tensors(model: DeepSeekV3ForTraining) -> dict[str, torch.Tensor]:
    """Float32 copies of every checkpoint tensor by HF name, with the MTP module's embed/head duplicates."""
    out = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    for i in range(model.args.n_layers, model.args.n_layers + model.args.n_mtp_layers):
        out[f"model.layers.{i}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{i}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def load_tensors(model: DeepSeekV3ForTraining, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint-named float tensors into `model` (the MTP duplicates are ignored); raises KeyError if missing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in tensors:
                raise KeyError(f"tensor {name} is missing")
            p.copy_(tensors[name].to(p.dtype))


def count_parameters(model: DeepSeekV3ForTraining) -> dict[str, int]:
    """Parameter counts: total (shared embed/head once), embedding+head, and active per token (top-k experts)."""
    args = model.args
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    expert = 3 * args.dim * args.moe_inter_dim
    moe_layers = sum(1 for layer in model.model.layers if isinstance(layer.mlp, MoE))
    inactive = moe_layers * expert * (args.n_routed_experts - args.n_activated_experts)
    return {"total": total, "embedding_and_head": embed, "active": total - inactive}


def fp8_roundtrip(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """w `[out, in]` after FP8 block quantisation and dequantisation (what the exported checkpoint holds)."""
    q, scale = kernels.weight_quant(w.detach().float(), block)
    return kernels.weight_dequant(q, scale, block, torch.float32).to(w.dtype)


@contextlib.contextmanager
def fake_fp8_weights(model: DeepSeekV3ForTraining, block: int = 128) -> Iterator[None]:
    """Quantisation-aware training: inside, every projection exported as FP8 holds its FP8 round trip.

    Gradients computed inside are taken at the quantised point and kept in `.grad`; the float
    weights come back on exit, so the optimizer updates the float master copy (straight-through).
    """
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_fp8_tensor(name):
                saved.append((p, p.detach().clone()))
                p.copy_(fp8_roundtrip(p, block))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)
