"""`python -m specdec.generate` / `torchrun -m specdec.generate`: the command-line front end.

Prompts come from `--prompt`, `--input-file` (one per line) or `--interactive`; results print on
rank 0 and optionally go to `--json FILE` (written atomically). Bad input ends with one line on
stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from specdec.kernels.fp8_cache import KV_CACHE_DTYPES
from specdec.model.errors import ConfigError, SpecdecError
from specdec.auto_tree import choose_tree
from specdec.distributed import exit_rank, shutdown, under_torchrun
from specdec.engine import Engine, SpecConfig

EXIT_USAGE = 2


class CliParser(argparse.ArgumentParser):
    """argparse that reports bad flags in one line and exits 2 (its default) without usage spam."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="specdec.generate", description="Generate with a DeepSeek-V3 checkpoint (specdec).")
    p.add_argument("--ckpt-path", help="checkpoint directory (HF layout); default: the embedded model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--input-file", help="UTF-8 text file, one prompt per line")
    src.add_argument("--interactive", action="store_true", help="chat on the terminal (/exit, /clear)")
    p.add_argument("--spec", choices=["mtp", "none"], default=None,
                   help="mtp: MTP speculative decoding (default when the checkpoint has an MTP layer); none: plain")
    p.add_argument("--draft-depth", type=int, default=3,
                   help="drafted tokens per step (K); adaptive (the default for chains): the most a step drafts")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="choose each step's draft depth in 0..K (0: a plain step) from step costs measured on this "
                        "machine and the running acceptance, so MTP is never slower than plain decoding (default); "
                        "--no-adaptive drafts K tokens every step. Trees pin the shape; with --compile a step is "
                        "plain or drafts K")
    p.add_argument("--draft-mode", choices=["onehot", "sample"], default="onehot",
                   help="sampling: onehot drafts the MTP distribution's draw coupled to the verifier's (output = plain "
                        "sampling's, seed for seed), sample draws drafts independently (speculative sampling)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="draft only among the N lowest token ids (BPE merge order: the frequent ones); "
                        "the drafter's head then reads N rows, not the whole vocabulary (lossless)")
    p.add_argument("--tree-topk", type=int, default=1, help="children per expanded draft node (1: a chain)")
    p.add_argument("--tree-nodes", type=int, default=None,
                   help="draft nodes verified per step (default: tree-topk x draft-depth)")
    p.add_argument("--tree", choices=["auto"], default=None,
                   help="auto: choose depth/topk/nodes from measured acceptance and verify cost (prints why)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=4096, help="longest prompt + generation")
    p.add_argument("--max-batch", type=int, default=None,
                   help="prompts decoded at once (default: all); the others join as rows finish "
                        "(continuous batching)")
    p.add_argument("--compare", action="store_true", help="also decode plainly and report the speedup")
    p.add_argument("--json", dest="json_path", help="write results and stats to this JSON file (atomically)")
    add_backend_flags(p, "the first use of each batch size and draft shape compiles for ~30-120 s")
    return p


def add_backend_flags(p: argparse.ArgumentParser, compile_cost: str) -> None:
    """--device, --kv-cache-dtype, --compile, --cuda-graphs and --batch-invariant (generate and serve);
    `compile_cost`: when --compile's compiling happens, for its help."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="latent cache format: auto (the compute dtype) or fp8 (e4m3 + one scale per token, "
                        "about half of bf16's bytes; changes logits slightly, see README)")
    p.add_argument("--compile", action="store_true",
                   help="compile every decoding step whole with torch.compile (CPU, one process, unquantised "
                        f"weights; an adaptive step is plain or drafts K; {compile_cost})")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay every decoding step from a CUDA graph captured per batch bucket, span and draft "
                        "shape (CUDA only; each is captured on first use)")
    p.add_argument("--batch-invariant", action="store_const", const="auto", default=None,
                   help="batch-invariant kernels: a token's logits are bitwise the same decoded alone or verified "
                        "among drafts, so greedy MTP equals plain greedy in bf16 too (Triton on CUDA, one torch call "
                        "per row on the CPU; slower)")


def check_args(a: argparse.Namespace) -> None:
    """Range checks argparse cannot express; raise ConfigError naming the flag."""
    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {a.temperature}")
    if not 0.0 < a.top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.max_batch is not None and a.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {a.max_batch}")
    if a.draft_depth < 1:
        raise ConfigError(f"--draft-depth must be >= 1, got {a.draft_depth}")
    if a.draft_vocab is not None and a.draft_vocab < 1:
        raise ConfigError(f"--draft-vocab must be >= 1, got {a.draft_vocab}")
    if a.tree_topk < 1:
        raise ConfigError(f"--tree-topk must be >= 1, got {a.tree_topk}")
    if a.tree_nodes is not None and a.tree_nodes < a.draft_depth:
        raise ConfigError(f"--tree-nodes ({a.tree_nodes}) must be >= --draft-depth ({a.draft_depth})")
    if a.tree == "auto" and a.spec == "none":
        raise ConfigError("--tree auto chooses a draft tree; it needs --spec mtp")
    if a.tree == "auto" and a.compile:
        raise ConfigError("--tree auto calibrates on eager forwards and cannot price compiled ones; with --compile "
                          "give --draft-depth (and --tree-topk)")
    if a.compare and a.spec == "none":
        raise ConfigError("--compare compares MTP speculative decoding with plain decoding; it needs --spec mtp")


def spec_config(engine: Engine, a: argparse.Namespace, prompts: list | None = None) -> SpecConfig | None:
    """The SpecConfig the flags ask for (None: plain), after checking the checkpoint can draft.

    With `--tree auto` the shape is calibrated on `prompts` and the reasoning printed (rank 0).
    """
    spec = a.spec or ("mtp" if engine.drafter is not None else "none")
    if spec == "none":
        if a.compare:
            raise ConfigError(f"--compare: {engine.checkpoint} has no MTP layer to draft with")
        return None
    if engine.drafter is None:
        raise ConfigError(f"--spec mtp: {engine.checkpoint} has no MTP layer "
                          f"(model.layers.{engine.args.n_layers}.* is absent)")
    if a.tree == "auto" and prompts:
        choice = choose_tree(engine, engine.encode(prompts), a.temperature, a.top_p, a.seed, a.draft_mode)
        if engine.ctx.rank == 0:
            print(choice.report, file=sys.stderr)
        return SpecConfig(depth=choice.depth, topk=choice.topk, nodes=choice.nodes, draft_mode=a.draft_mode,
                          draft_vocab=a.draft_vocab, adaptive=False)
    try:
        return SpecConfig(depth=a.draft_depth, topk=a.tree_topk, nodes=a.tree_nodes, draft_mode=a.draft_mode,
                          draft_vocab=a.draft_vocab, adaptive=a.adaptive)
    except ConfigError as e:
        raise ConfigError(f"--draft-depth/--tree-topk/--tree-nodes/--draft-vocab: {e}") from None


def read_prompts(path: str) -> list[str]:
    """Non-blank lines of a UTF-8 file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--input-file {path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--input-file {path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"--input-file {path}: cannot read ({e.strerror})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--input-file {path}: no prompts (file is empty)")
    return prompts


def write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON to a temp file beside `path`, then rename it into place."""
    target = Path(path)
    if not target.parent.is_dir():
        raise ConfigError(f"--json {path}: directory {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, ensure_ascii=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stats_line(label: str, s) -> str:
    line = (f"[{label}: {s.tokens} tokens in {s.wall_s:.2f} s = {s.tokens_per_s:.1f} tok/s; "
            f"{s.verify_steps} verify steps; batch {s.batch_size}")
    if s.acceptance_per_position:
        accept = " ".join(f"{x:.2f}" for x in s.acceptance_per_position)
        line += f"; tau {s.tau:.2f}; acceptance per position {accept}"
    if len(s.depth_steps) > 1 and sum(s.depth_steps):
        line += "; steps by depth " + " ".join(f"d{d} {n}" for d, n in enumerate(s.depth_steps) if n)
    return line + "]"


def run_batch(engine: Engine, a: argparse.Namespace, prompts: list[str]) -> None:
    spec = spec_config(engine, a, prompts)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
              max_batch=a.max_batch)
    if a.compare:  # warm both paths up (allocator, caches, first-call costs) so the timed runs compare fairly
        for s in (spec, None):
            engine.generate(prompts, spec=s, **{**kw, "max_new_tokens": min(8, a.max_new_tokens)})
    out = engine.generate(prompts, spec=spec, **kw)
    plain = engine.generate(prompts, spec=None, **kw) if a.compare else None
    if engine.ctx.rank != 0:
        return
    for prompt, text in zip(prompts, out.texts):
        print(f">>> {prompt}\n{text}\n")
    print(stats_line("mtp" if spec else "plain", out.stats))
    payload = {"results": [{"prompt": p, "completion": t, "token_ids": ids}
                           for p, t, ids in zip(prompts, out.texts, out.token_ids)],
               "stats": out.stats.as_dict()}
    if plain is not None:
        speedup = out.stats.tokens_per_s / plain.stats.tokens_per_s
        same = sum(x == y for x, y in zip(out.token_ids, plain.token_ids))
        print(stats_line("plain", plain.stats))
        print(f"speedup (tokens/s, mtp / plain): {speedup:.2f}x; identical outputs: {same}/{len(prompts)}")
        payload.update(plain=plain.stats.as_dict(), speedup=speedup)
    if a.json_path:
        write_json_atomic(a.json_path, payload)


def run_interactive(engine: Engine, a: argparse.Namespace) -> None:
    """Multi-turn chat; the chat template is used when the tokenizer has one. /exit quits, /clear resets."""
    tok = engine.tokenizer
    messages: list[dict] = []
    spec: SpecConfig | None = None
    calibrated = False
    while True:
        line = _read_line(engine, ">>> ")
        if line is None or line.strip() == "/exit":
            return
        if line.strip() == "/clear":
            messages.clear()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
        else:
            ids = tok.encode("\n".join(m["content"] for m in messages), add_special_tokens=False)
        if not calibrated:  # --tree auto calibrates on the first message
            spec, calibrated = spec_config(engine, a, [ids]), True
        out = engine.generate([ids], max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                              seed=a.seed, spec=spec)
        reply = out.texts[0]
        if engine.ctx.rank == 0:
            print(reply)
        messages.append({"role": "assistant", "content": reply})


def _read_line(engine: Engine, prompt: str) -> str | None:
    """Rank 0 reads a line (None on EOF) and shares it with the other ranks."""
    line: str | None = None
    if engine.ctx.rank == 0:
        try:
            line = input(prompt)
        except EOFError:
            line = None
    if engine.ctx.world_size > 1:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        check_args(a)
        prompts = a.prompt or (read_prompts(a.input_file) if a.input_file else [])
        engine = Engine.from_pretrained(a.ckpt_path, device=a.device, max_seq_len=a.max_seq_len,
                                        show_progress=True, compile=a.compile, cuda_graphs=a.cuda_graphs,
                                        kv_cache_dtype=a.kv_cache_dtype, batch_invariant=a.batch_invariant)
        if engine.ctx.rank == 0:
            if engine.notice:
                print(engine.notice, file=sys.stderr)
            print(engine.describe_drafter(), file=sys.stderr)
        if a.interactive:
            run_interactive(engine, a)
        else:
            run_batch(engine, a, prompts)
        shutdown(wait_for_peers=True)
    except SpecdecError as e:
        print(f"specdec.generate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("specdec.generate: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    status = main()
    if under_torchrun():  # ranks leave without the interpreter's teardown (`exit_rank`)
        exit_rank(status)
    sys.exit(status)
