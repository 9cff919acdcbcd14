"""`python -m specdec.mtp.train`: train the small DeepSeek-V3-shaped default model (with one MTP module) on CPU.

Data: the standard library's source (its `test` package held out), byte-level BPE (`mtp.data`).
Model: `mtp.train_model.DeepSeekV3ForTraining` (HF checkpoint names, inference-identical math).
Loss: CE(next token) + λ·CE(MTP, token after next); auxiliary-loss-free router balancing.
Optimiser: AdamW, linear warmup + cosine decay to `min_lr_ratio · lr`, gradient clipping.
Budget: `--steps N`, or `--minutes M` (the step count is planned from the measured speed during the
first half of the run and then frozen). `--work-dir` holds the token cache, resumable training
checkpoints (safetensors + JSON) and `metrics.jsonl`; `--resume` continues from there bit-exactly.
`--out DIR` exports the released layout (FP8 projections, config.json, tokenizer files) plus
`training_summary.json`, and checks the export through `model.load.load_verifier`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from specdec import kernels
from specdec.model.args import ModelArgs, from_hf_config
from specdec.model.export import is_fp8_tensor, quantize_state, write_checkpoint
from specdec.model.load import load_verifier
from specdec.model.parallel import ParallelContext
from specdec.model.tokenizer_build import tokenizer_files
from specdec.mtp.data import Corpus, build_corpus, heldout_windows, train_batch
from specdec.mtp.train_model import (DeepSeekV3ForTraining, count_parameters, export_tensors, fake_fp8_weights,
                             load_tensors, training_losses, update_router_bias)

CKPT_DIR = "checkpoint"
FP8_BLOCK = 128


# ----------------------------------------------------------------------------------------------- config

def build_parser() -> argparse.ArgumentParser:
    """Command-line flags: architecture, optimisation, budget, I/O."""
    p = argparse.ArgumentParser(prog="python -m specdec.mtp.train", description=__doc__.splitlines()[0])
    arch = p.add_argument_group("architecture")
    arch.add_argument("--vocab-size", type=int, default=8192)
    arch.add_argument("--hidden", type=int, default=256, help="hidden_size")
    arch.add_argument("--layers", type=int, default=8, help="main decoder layers (MTP layer not counted)")
    arch.add_argument("--dense-layers", type=int, default=1, help="first_k_dense_replace")
    arch.add_argument("--heads", type=int, default=4)
    arch.add_argument("--q-lora-rank", type=int, default=192, help="0: plain q_proj")
    arch.add_argument("--kv-lora-rank", type=int, default=128)
    arch.add_argument("--qk-nope-dim", type=int, default=32)
    arch.add_argument("--qk-rope-dim", type=int, default=32)
    arch.add_argument("--v-dim", type=int, default=64)
    arch.add_argument("--inter", type=int, default=768, help="dense MLP intermediate_size")
    arch.add_argument("--moe-inter", type=int, default=160, help="moe_intermediate_size (per expert)")
    arch.add_argument("--experts", type=int, default=8, help="n_routed_experts")
    arch.add_argument("--shared-experts", type=int, default=1)
    arch.add_argument("--topk", type=int, default=2, help="num_experts_per_tok")
    arch.add_argument("--n-group", type=int, default=4)
    arch.add_argument("--topk-group", type=int, default=2)
    arch.add_argument("--route-scale", type=float, default=2.5, help="routed_scaling_factor")
    arch.add_argument("--rope-theta", type=float, default=10000.0)
    arch.add_argument("--rope-factor", type=float, default=4.0, help="YaRN factor (1: plain RoPE)")
    arch.add_argument("--rope-original-len", type=int, default=512, help="YaRN original_max_position_embeddings")
    arch.add_argument("--max-position", type=int, default=2048, help="max_position_embeddings")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--seq-len", type=int, default=256)
    opt.add_argument("--batch-size", type=int, default=16)
    opt.add_argument("--lr", type=float, default=2e-3)
    opt.add_argument("--min-lr-ratio", type=float, default=0.05)
    opt.add_argument("--warmup", type=int, default=150, help="linear warmup steps")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--beta1", type=float, default=0.9)
    opt.add_argument("--beta2", type=float, default=0.95)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    opt.add_argument("--init-std", type=float, default=0.02)
    opt.add_argument("--mtp-weight", type=float, default=0.3, help="λ on the MTP loss")
    opt.add_argument("--bias-gamma", type=float, default=1e-3, help="router bias update speed γ")
    opt.add_argument("--qat-frac", type=float, default=0.1,
                     help="final fraction of steps trained through FP8-rounded projections (straight-through)")
    opt.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                     help="bfloat16 autocast for matmuls (float32 master weights)")
    run = p.add_argument_group("budget and I/O")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--minutes", type=float, help="wall-clock budget (training + evals)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--work-dir", type=Path, default=Path(".train"))
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    run.add_argument("--stop-after", type=int,
                     help="save a checkpoint and exit after this many steps of this invocation")
    run.add_argument("--out", type=Path, help="export the trained model here (released checkpoint layout)")
    run.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")
    run.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation")
    run.add_argument("--final-eval-windows", type=int, default=256, help="held-out windows for the final report")
    run.add_argument("--ckpt-every", type=float, default=5.0, help="minutes between training checkpoints")
    run.add_argument("--max-train-chars", type=int, help="read only this much training text (quick runs)")
    run.add_argument("--max-heldout-chars", type=int, default=4_000_000, help="held-out text to tokenize")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def hf_config(a: argparse.Namespace) -> dict:
    """The HF `config.json` dict (model_type deepseek_v3, FP8 block quantisation, one MTP layer) for flags `a`."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": a.vocab_size,
        "hidden_size": a.hidden,
        "intermediate_size": a.inter,
        "moe_intermediate_size": a.moe_inter,
        "num_hidden_layers": a.layers,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.heads,
        "n_shared_experts": a.shared_experts,
        "n_routed_experts": a.experts,
        "num_experts_per_tok": a.topk,
        "n_group": a.n_group,
        "topk_group": a.topk_group,
        "routed_scaling_factor": a.route_scale,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "first_k_dense_replace": a.dense_layers,
        "moe_layer_freq": 1,
        "q_lora_rank": a.q_lora_rank or None,
        "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_dim,
        "qk_rope_head_dim": a.qk_rope_dim,
        "v_head_dim": a.v_dim,
        "hidden_act": "silu",
        "max_position_embeddings": a.max_position,
        "rms_norm_eps": 1e-6,
        "rope_theta": a.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": a.init_std,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]},
    }
    if a.rope_factor > 1.0:
        cfg["rope_scaling"] = {"type": "yarn", "factor": a.rope_factor,
                               "original_max_position_embeddings": a.rope_original_len,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    return cfg


def training_settings(a: argparse.Namespace) -> dict:
    """The non-architecture flags as a JSON-able dict (recorded in checkpoints and the summary)."""
    keys = ["seq_len", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2", "grad_clip",
            "init_std", "mtp_weight", "bias_gamma", "qat_frac", "bf16", "steps", "minutes", "seed", "threads",
            "max_train_chars", "max_heldout_chars"]
    return {k: getattr(a, k) for k in keys}


# ------------------------------------------------------------------------------------------ optimiser

def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to `min_ratio · peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: DeepSeekV3ForTraining, a: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights undecayed; router bias is not trained)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), eps=1e-8, fused=True)


def _trained_names(model: DeepSeekV3ForTraining, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's index order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


# -------------------------------------------------------------------------------------- checkpointing

@dataclass
class TrainState:
    """Progress that a resumed run continues from.

    step: optimizer steps done. total_steps: planned length (None until planned in `--minutes` mode).
    planned_final: whether total_steps is frozen. tokens_seen: training tokens consumed (inputs).
    elapsed_s: wall seconds spent on training and evaluation so far (over all resumes).
    """

    step: int = 0
    total_steps: int | None = None
    planned_final: bool = False
    tokens_seen: int = 0
    elapsed_s: float = 0.0


def save_checkpoint(work_dir: Path, model: DeepSeekV3ForTraining, opt: torch.optim.Optimizer, state: TrainState,
                    cfg: dict, settings: dict) -> Path:
    """Write weights, optimizer moments, RNG and progress to `work_dir/checkpoint` atomically (no pickle)."""
    tmp = work_dir / (CKPT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(tmp / "model.safetensors"))
    opt_tensors = {"rng.torch": torch.get_rng_state()}
    sd = opt.state_dict()
    for idx, name in enumerate(_trained_names(model, opt)):
        for key, value in sd["state"].get(idx, {}).items():
            opt_tensors[f"{name}.{key}"] = torch.as_tensor(value).contiguous()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"state": asdict(state), "config": cfg, "settings": settings}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    final = work_dir / CKPT_DIR
    old = work_dir / (CKPT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(work_dir: Path, model: DeepSeekV3ForTraining, opt: torch.optim.Optimizer,
                    cfg: dict) -> TrainState:
    """Restore what `save_checkpoint` wrote; the architecture in the checkpoint must equal `cfg`."""
    ckpt = work_dir / CKPT_DIR
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no training checkpoint to resume from")
    meta = json.loads((ckpt / "state.json").read_text())
    if meta["config"] != cfg:
        diff = sorted(k for k in set(cfg) | set(meta["config"]) if cfg.get(k) != meta["config"].get(k))
        raise ValueError(f"{ckpt}: checkpoint architecture differs from the flags in: {', '.join(diff)}")
    weights = load_file(str(ckpt / "model.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, name in enumerate(_trained_names(model, opt)):
        entry = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if entry:
            state[idx] = entry
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return TrainState(**meta["state"])


# ---------------------------------------------------------------------------------------- evaluation

def autocast(enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 CPU autocast when `enabled`, else a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: DeepSeekV3ForTraining, windows: torch.Tensor, batch_size: int, bf16: bool) -> dict[str, float]:
    """Held-out metrics over windows `[N, T+2]`.

    Returns ppl / mtp_ppl (exp of mean CE for token i+1 / i+2), main_acc / mtp_acc (top-1 vs the data),
    mtp_agreement: share of positions where the MTP argmax for token i+2 equals the main model's
    argmax for token i+2 (the teacher-forced "second-token acceptance").
    """
    was_training = model.training
    model.eval()
    sums = {"ce": 0.0, "mtp_ce": 0.0, "acc": 0.0, "mtp_acc": 0.0, "agree": 0.0}
    count = 0
    for chunk in windows.split(batch_size):
        with autocast(bf16):
            hidden, logits, _ = model.main_forward(chunk[:, :-1])
            seq = hidden.shape[1] - 1
            mtp_logits, _ = model.mtp_forward(hidden[:, :seq], chunk[:, 1:seq + 1])
        main_pred = logits.argmax(-1)
        mtp_pred = mtp_logits.argmax(-1)
        vocab = logits.shape[-1]
        sums["ce"] += F.cross_entropy(logits[:, :seq].reshape(-1, vocab), chunk[:, 1:seq + 1].reshape(-1),
                                      reduction="sum").item()
        sums["mtp_ce"] += F.cross_entropy(mtp_logits.reshape(-1, vocab), chunk[:, 2:].reshape(-1),
                                          reduction="sum").item()
        sums["acc"] += (main_pred[:, :seq] == chunk[:, 1:seq + 1]).sum().item()
        sums["mtp_acc"] += (mtp_pred == chunk[:, 2:]).sum().item()
        sums["agree"] += (mtp_pred == main_pred[:, 1:]).sum().item()
        count += chunk.shape[0] * seq
    model.train(was_training)
    return {"ppl": math.exp(sums["ce"] / count), "mtp_ppl": math.exp(sums["mtp_ce"] / count),
            "main_acc": sums["acc"] / count, "mtp_acc": sums["mtp_acc"] / count,
            "mtp_agreement": sums["agree"] / count}


# ------------------------------------------------------------------------------------------ training

def train_step(model: DeepSeekV3ForTraining, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
               a: argparse.Namespace, qat: bool = False) -> tuple[float, float]:
    """One AdamW step on batch `[B, T+2]`, then the router-bias update; returns (main CE, MTP CE).

    qat: compute the gradient through the FP8-rounded projections (`fake_fp8_weights`).
    """
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    with fake_fp8_weights(model, FP8_BLOCK) if qat else contextlib.nullcontext():
        with autocast(a.bf16):
            losses = training_losses(model, batch, a.mtp_weight)
        losses.total.backward()
    if a.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], a.grad_clip)
    opt.step()
    update_router_bias(model, losses.loads, a.bias_gamma)
    return losses.main.item(), losses.mtp.item()


def plan_steps(state: TrainState, a: argparse.Namespace, now_elapsed: float) -> None:
    """Set `state.total_steps`: `--steps`, or in `--minutes` mode extrapolate the measured seconds/step.

    The plan is revised at every evaluation until half of it is done, then frozen (`planned_final`).
    """
    if a.steps is not None:
        state.total_steps, state.planned_final = a.steps, True
        return
    if state.planned_final or state.step < min(a.warmup, 50) or state.step == 0:
        return
    per_step = now_elapsed / state.step
    remaining = max(0.0, a.minutes * 60 - now_elapsed)
    state.total_steps = max(state.step + 1, state.step + int(remaining / per_step))
    if state.step >= state.total_steps / 2:
        state.planned_final = True


def _bar(state: TrainState, quiet: bool) -> tqdm:
    return tqdm(total=state.total_steps, initial=state.step, unit="step", disable=quiet, mininterval=2.0,
                dynamic_ncols=True, file=sys.stderr)


def _log(work_dir: Path, record: dict) -> None:
    with open(work_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class Session:
    """Everything one run works with."""

    args: argparse.Namespace
    cfg: dict
    margs: ModelArgs
    corpus: Corpus
    model: DeepSeekV3ForTraining
    opt: torch.optim.AdamW
    state: TrainState
    eval_windows: torch.Tensor


def setup(a: argparse.Namespace) -> Session:
    """Threads, data, model (seeded init or resumed), optimizer and the held-out evaluation set."""
    torch.set_num_threads(a.threads)
    if a.steps is None and a.minutes is None:
        raise SystemExit("give a budget: --steps N or --minutes M")
    a.work_dir.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(a)
    margs = from_hf_config(cfg)
    corpus = build_corpus(a.work_dir, a.vocab_size, max_chars=a.max_train_chars,
                          heldout_max_chars=a.max_heldout_chars, log=lambda m: print(m, file=sys.stderr))
    if corpus.tokenizer.get_vocab_size() != a.vocab_size:
        raise SystemExit(f"tokenizer has {corpus.tokenizer.get_vocab_size()} tokens, expected {a.vocab_size}: "
                         "use a smaller --vocab-size for this little text")
    torch.manual_seed(a.seed)
    model = DeepSeekV3ForTraining(margs, a.seq_len + 1)
    model.init_weights(torch.Generator().manual_seed(a.seed), a.init_std)
    opt = make_optimizer(model, a)
    state = load_checkpoint(a.work_dir, model, opt, cfg) if a.resume else TrainState()
    windows = heldout_windows(corpus.heldout, a.eval_windows, a.seq_len + 2)
    return Session(a, cfg, margs, corpus, model, opt, state, windows)


class Throughput:
    """Training tokens/s over a sliding span of steps (evaluation and checkpoint time excluded)."""

    def __init__(self, tokens_per_step: int, span: int = 50) -> None:
        self.tokens_per_step, self.span = tokens_per_step, span
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def step(self) -> float:
        """Record one step; returns tokens/s since the span began."""
        self.steps += 1
        rate = self.steps * self.tokens_per_step / max(1e-9, time.perf_counter() - self.t0)
        if self.steps >= self.span:
            self.reset()
        return rate


def _periodic_eval(s: Session, bar: tqdm, losses: tuple[float, float]) -> dict[str, float]:
    """Held-out eval, logged to metrics.jsonl and the console; returns the metrics."""
    metrics = evaluate(s.model, s.eval_windows, s.args.batch_size, s.args.bf16)
    record = {"step": s.state.step, "tokens": s.state.tokens_seen, "minutes": round(s.state.elapsed_s / 60, 3),
              "lr": s.opt.param_groups[0]["lr"], "train_ce": losses[0], "train_mtp_ce": losses[1], **metrics}
    _log(s.args.work_dir, record)
    bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return metrics


def train(s: Session) -> tuple[dict[str, float], bool]:
    """Run optimizer steps until the plan is done (or `--stop-after`); evaluate and checkpoint periodically.

    Returns (last periodic eval, whether the planned steps are all done).
    """
    a, state, model = s.args, s.state, s.model
    model.train()
    plan_steps(state, a, state.elapsed_s)
    bar = _bar(state, a.quiet)
    start = time.perf_counter() - state.elapsed_s
    last_ckpt, done_here = time.perf_counter(), 0
    speed = Throughput(a.batch_size * a.seq_len)
    last_eval: dict[str, float] = {}
    while state.total_steps is None or state.step < state.total_steps:
        if a.stop_after is not None and done_here >= a.stop_after:
            break
        batch = train_batch(s.corpus.train, a.batch_size, a.seq_len + 2, a.seed, state.step)
        total = state.total_steps or max(state.step + 1, a.warmup * 10)
        qat = state.planned_final and state.step >= total * (1 - a.qat_frac)
        losses = train_step(model, s.opt, batch, lr_at(state.step, total, a.lr, a.warmup, a.min_lr_ratio), a, qat)
        if not all(map(math.isfinite, losses)):
            raise FloatingPointError(f"loss is not finite at step {state.step}")
        state.step += 1
        state.tokens_seen += batch[:, :-2].numel()
        done_here += 1
        bar.set_postfix(loss=f"{losses[0]:.3f}", mtp=f"{losses[1]:.3f}", tok_s=f"{speed.step():.0f}", refresh=False)
        bar.update(1)
        state.elapsed_s = time.perf_counter() - start
        if state.step % a.eval_every == 0 or state.step == state.total_steps:
            last_eval = _periodic_eval(s, bar, losses)
            state.elapsed_s = time.perf_counter() - start
            speed.reset()
        if state.step % a.eval_every == 0 or state.total_steps is None:
            plan_steps(state, a, state.elapsed_s)
            bar.total = state.total_steps
        if time.perf_counter() - last_ckpt > a.ckpt_every * 60:
            save_checkpoint(a.work_dir, model, s.opt, state, s.cfg, training_settings(a))
            last_ckpt = time.perf_counter()
            speed.reset()
    bar.close()
    save_checkpoint(a.work_dir, model, s.opt, state, s.cfg, training_settings(a))
    return last_eval, state.total_steps is not None and state.step >= state.total_steps


# -------------------------------------------------------------------------------------------- export

def dequantized(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 view of stored checkpoint tensors: FP8 weights times their block scales, the rest upcast."""
    out = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if is_fp8_tensor(name):
            out[name] = kernels.weight_dequant(t, stored[name + "_scale_inv"], FP8_BLOCK, torch.float32)
        else:
            out[name] = t.float()
    return out


def export_checkpoint(model: DeepSeekV3ForTraining, corpus: Corpus, cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    """Write the released layout to `out` (FP8 projections + scales, BF16 rest, tokenizer).

    Returns the stored tensors by checkpoint name.
    """
    stored = quantize_state(export_tensors(model), FP8_BLOCK)
    write_checkpoint(out, stored, cfg, tokenizer_files(corpus.tokenizer, cfg["max_position_embeddings"]))
    out.chmod(0o755)  # the atomic temp dir is private; a shipped model must be world-readable
    for f in out.iterdir():
        f.chmod(0o644)
    return stored


@torch.no_grad()
def verifier_check(out: Path, model: DeepSeekV3ForTraining, window: torch.Tensor) -> float:
    """Max |logit difference| between `load_verifier(out)` and `model` on token windows `[B, T]`.

    `model` must hold the exported (dequantised) weights; the verifier runs in float32.
    """
    verifier, _ = load_verifier(out, ParallelContext(), keep_fp8=False, show_progress=False,
                                max_seq_len=window.shape[1])
    bsz, seqlen = window.shape
    args = verifier.args
    kv = torch.zeros(args.n_layers, bsz, seqlen, args.kv_lora_rank)
    pe = torch.zeros(args.n_layers, bsz, seqlen, args.qk_rope_head_dim)
    pos = torch.arange(seqlen).expand(bsz, seqlen)
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril().expand(bsz, seqlen, seqlen)
    ref = verifier(window, pos, kv, pe, pos, mask).logits
    _, logits, _ = model.main_forward(window)
    return (ref - logits).abs().max().item()


def finish(s: Session, last_eval: dict[str, float], minutes: float) -> dict:
    """Final held-out eval (float and exported weights), export, verifier check, training_summary.json."""
    a, model = s.args, s.model
    windows = heldout_windows(s.corpus.heldout, a.final_eval_windows, a.seq_len + 2)
    float_eval = evaluate(model, windows, a.batch_size, bf16=False)
    summary = {
        "parameters": count_parameters(model),
        "tokens_seen": s.state.tokens_seen,
        "steps": s.state.step,
        "finished": True,
        "minutes": s.state.elapsed_s / 60,
        "wall_minutes_this_run": minutes,
        "train_tokens_in_corpus": int(len(s.corpus.train)),
        "epochs": s.state.tokens_seen / max(1, len(s.corpus.train)),
        "heldout_windows": int(windows.shape[0]),
        "final_float32": float_eval,
        "last_periodic_eval": last_eval,
        "settings": training_settings(a),
        "config": s.cfg,
    }
    if a.out is not None:
        stored = export_checkpoint(model, s.corpus, s.cfg, a.out)
        exported = DeepSeekV3ForTraining(s.margs, a.seq_len + 1)
        load_tensors(exported, dequantized(stored))
        summary["final_exported"] = evaluate(exported, windows, a.batch_size, bf16=False)
        summary["verifier_max_abs_logit_diff"] = verifier_check(a.out, exported, windows[:2, : a.seq_len])
        summary["checkpoint_bytes"] = sum(f.stat().st_size for f in a.out.iterdir() if f.is_file())
        (a.out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    (a.work_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, train, export; returns the training summary."""
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    s = setup(a)
    counts = count_parameters(s.model)
    print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active per token), "
          f"train tokens {len(s.corpus.train):,}", file=sys.stderr)
    last_eval, done = train(s)
    if not done:
        print(f"stopped at step {s.state.step}; continue with --resume", file=sys.stderr)
        return {"steps": s.state.step, "tokens_seen": s.state.tokens_seen, "finished": False}
    summary = finish(s, last_eval, (time.perf_counter() - t0) / 60)
    print(json.dumps({k: summary[k] for k in ("steps", "tokens_seen", "minutes", "final_float32")}), file=sys.stderr)
    if "final_exported" in summary:
        print(json.dumps({"final_exported": summary["final_exported"],
                          "verifier_max_abs_logit_diff": summary["verifier_max_abs_logit_diff"]}), file=sys.stderr)
    return summary


def keep_freed_memory() -> bool:
    """Ask glibc to serve big tensors from its heap and keep freed memory (no mmap/munmap churn).

    Each step frees and re-allocates the same large activations; with glibc's defaults every one of
    them is a fresh mmap whose pages fault in again, costing tens of milliseconds per tensor.
    Returns whether the settings took (False off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 40))
    except (OSError, AttributeError):
        return False


def passive_omp_environment() -> dict[str, str] | None:
    """The environment to re-run this CLI under when OpenMP threads would busy-wait, else None.

    With the default spinning, two compute threads sharing two cores with any other busy process
    slow down several-fold (each spins while the other is descheduled); sleeping waiters cost
    little when the machine is idle. libgomp reads the policy once at load, hence a re-exec.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return None
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: list[str] | None = None) -> int:
    env = passive_omp_environment() if argv is None else None
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "specdec.mtp.train", *sys.argv[1:]], env)
    keep_freed_memory()
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
