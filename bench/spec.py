"""`python -m bench.spec`: plain vs MTP chains vs trees (and `--tree auto`), side by side in one run.

Prompts are code snippets from the standard library's test suite (held out from the default
model's training), each starting at a `def`/`class` line. Every configuration decodes the same
prompts with the same settings in the same process; greedy outputs are checked token-equal to
plain decoding. Prints a Markdown table (tau, acceptance per position, tokens/s, speedup).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mtp.data import read_texts, split_files, stdlib_root
from specdec import Engine, SpecConfig
from specdec.auto_tree import choose_tree


def heldout_prompts(count: int, chars: int = 240) -> list[str]:
    """`count` snippets from evenly spaced held-out files, each from its first `def`/`class` line."""
    _, files = split_files(stdlib_root())
    picked = files[:: max(1, len(files) // (count * 3))]
    prompts = []
    for text in read_texts(picked):
        start = next((i for i in range(len(text)) if text.startswith(("def ", "class "), i)
                      and (i == 0 or text[i - 1] == "\n")), None)
        if start is not None and len(text) - start > chars:
            prompts.append(text[start : start + chars])
        if len(prompts) == count:
            break
    return prompts


def pooled(outs: list) -> dict:
    """Statistics of several generate calls as one: sums of tokens and seconds, step-weighted rates."""
    steps = sum(o.stats.row_steps for o in outs) or 1
    depth = len(outs[0].stats.acceptance_per_position)
    tokens, wall = sum(o.stats.tokens for o in outs), sum(o.stats.wall_s for o in outs)
    return {
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "tau": sum(o.stats.tau * o.stats.row_steps for o in outs) / steps if depth else 1.0,
        "acceptance_per_position": [sum(o.stats.acceptance_per_position[i] * o.stats.row_steps for o in outs) / steps
                                    for i in range(depth)],
        "token_ids": [t for o in outs for t in o.token_ids],
    }


def _row(label: str, s: dict, plain_tps: float, same: bool | None) -> str:
    acc = " ".join(f"{x:.2f}" for x in s["acceptance_per_position"]) or "-"
    ok = "" if same is None else ("yes" if same else "NO")
    return f"| {label} | {s['tau']:.2f} | {acc} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / plain_tps:.2f}x | {ok} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spec", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-path")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--shapes", default="1x1,2x1,3x1,4x1,3x2x6,4x2x8,3x3x9",
                   help="depth x topk [x nodes] per configuration")
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    eng = Engine.from_pretrained(a.ckpt_path, max_seq_len=1024)
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    ids = eng.encode(heldout_prompts(max(a.prompts, *batch_sizes)))
    print(f"checkpoint {eng.checkpoint}; {len(ids)} held-out prompts; {a.max_new_tokens} new tokens; greedy; "
          f"torch threads {torch.get_num_threads()}")
    results = {}
    for batch in batch_sizes:
        groups = [ids[i : i + batch] for i in range(0, len(ids) - batch + 1, batch)]
        configs: list[tuple[str, SpecConfig | None]] = [("plain", None)]
        for shape in a.shapes.split(","):
            dims = [int(x) for x in shape.split("x")]
            spec = SpecConfig(depth=dims[0], topk=dims[1], nodes=dims[2] if len(dims) > 2 else None)
            configs.append((f"depth {spec.depth}, topk {spec.topk}, nodes {spec.n_nodes}", spec))
        choice = choose_tree(eng, groups[0], 0.0, 1.0, 0)
        print(choice.report)
        configs.append((f"tree auto: depth {choice.depth}, topk {choice.topk}, nodes {choice.nodes}",
                        SpecConfig(depth=choice.depth, topk=choice.topk, nodes=choice.nodes)))
        for _, spec in configs:  # warm-up
            eng.generate(groups[0], max_new_tokens=8, spec=spec)
        print(f"\nbatch {batch} ({len(groups)} call(s))\n\n"
              "| configuration | tau | acceptance per position | tokens/s | speedup | = plain |\n|---|---|---|---|---|---|")
        plain = None
        for label, spec in configs:
            stats = pooled([eng.generate(g, max_new_tokens=a.max_new_tokens, spec=spec) for g in groups])
            plain = plain or stats
            same = None if spec is None else stats["token_ids"] == plain["token_ids"]
            print(_row(label, stats, plain["tokens_per_s"], same))
            results[f"batch{batch}/{label}"] = {**{k: v for k, v in stats.items() if k != "token_ids"},
                                                "speedup": stats["tokens_per_s"] / plain["tokens_per_s"],
                                                "equal_to_plain": same}
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
