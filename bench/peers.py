"""`python -m specdec.bench peers`: specdec against transformers on the same weights, prompts and run.

Decoders (greedy, batch 1, one prompt per call; a warm-up call each, then `--repeats` rounds that
each run every decoder over all prompts in turn):

* specdec `Engine.generate`, plain;
* specdec with MTP speculative decoding (each `--chains` / `--trees` shape);
* transformers `DeepseekV3ForCausalLM.generate` (plain greedy);
* transformers prompt-lookup decoding (`generate(prompt_lookup_num_tokens=K)`, n-gram drafts
  copied from the prompt; transformers supports it at batch 1 only).

Same weights: an FP8 checkpoint is first dequantised into a float32 copy in a temporary
directory (every FP8 block times its `weight_scale_inv`, exactly what specdec computes at load on
the CPU; BF16 tensors widen exactly), and both libraries load that copy in float32. Reported:
tokens/s (new tokens over the summed wall time of the calls, median of the rounds), the ratios to
specdec plain and to transformers `generate` (medians over rounds of the ratio within a round), and
how the output compares with specdec's plain greedy output: token-exact rows, and the share of
reference tokens before each row's first divergence (float rounding can make libraries part ways;
specdec MTP must be exact, else it is a failure).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

from specdec.bench import plots
from specdec.bench.common import BenchError, Report, Table, fmt, paired_ratio, parse_shapes, progress, resolve_auto
from specdec.bench.prompt_set import Prompt
from specdec.bench.stats import compare_outputs
from specdec.model.checkpoint import SCALE_SUFFIX, CheckpointReader
from specdec import Engine


def is_fp8(path: Path) -> bool:
    reader = CheckpointReader(path)
    return any(name.endswith(SCALE_SUFFIX) for name in reader.weight_map)


def float32_copy(src: Path, dst: Path) -> Path:
    """Write `src` to `dst` with every tensor in float32 (FP8 blocks dequantised), shard by shard."""
    from specdec.model.fp8_cast_bf16 import cast

    config = json.loads((src / "config.json").read_text())
    block = (config.get("quantization_config") or {}).get("weight_block_size", [128])[0]
    if CheckpointReader(src).presharded:
        raise BenchError(f"{src}: a pre-sharded checkpoint cannot be loaded by transformers; use the HF checkpoint")
    return cast(src, dst, block, torch.float32, show_progress=False)


def import_hub_kernels() -> None:
    """Import Hugging Face's `kernels` distribution (when installed) as `kernels`, before transformers does.

    Run from a checkout, the current directory, first on `sys.path` under `python -m`, holds the
    project's own `kernels/` folder (`specdec.kernels` once installed), which would shadow it; and
    transformers imports `kernels` as soon as a version it supports is installed, then fails on ours."""
    if "kernels" in sys.modules:
        return
    from specdec import kernels as own

    ours = Path(own.__file__).resolve()
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if (Path(p or ".") / "kernels" / "__init__.py").resolve() != ours]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers then finds no distribution either
        pass
    finally:
        sys.path[:] = saved


def load_transformers(path: Path, device: torch.device):
    """transformers' model for the checkpoint (local files only, no remote code), float32, eval mode."""
    import_hub_kernels()
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    bar = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the MTP layer's tensors are "unexpected" to transformers
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure is one line for the user
        raise BenchError(f"{path}: transformers cannot load this checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.logging.enable_progress_bar()
    return model.eval().to(device)


def _hf_generate(model, eos: list[int], pad: int, **kw):
    def gen(ids: list[int], new: int) -> list[int]:
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                                 eos_token_id=eos or None, pad_token_id=pad, **kw)
        return seq[0, len(ids):].tolist()
    return gen


def _time_rounds(gens: list, ids: list[list[int]], new: int, repeats: int = 1,
                 on_call=None) -> tuple[list[list[float]], list[list[list[int]]]]:
    """Per decoder: the summed wall seconds of one call per prompt in each round, and its outputs.

    A warm-up call each (8 new tokens), then `repeats` rounds, each running every decoder over all
    prompts in turn, so that the decoders share each stretch of a drifting machine's time (as
    `bench.common.timed_runs`). `on_call(j)` is told after decoder j's warm-up and each round."""
    for j, gen in enumerate(gens):
        gen(ids[0], min(8, new))
        if on_call:
            on_call(j)
    walls: list[list[float]] = [[] for _ in gens]
    outs: list[list[list[int]]] = [[] for _ in gens]
    for _ in range(max(repeats, 1)):
        for j, gen in enumerate(gens):
            outs[j], wall = [], 0.0
            for p in ids:
                t0 = time.perf_counter()
                outs[j].append(gen(p, new))
                wall += time.perf_counter() - t0
            walls[j].append(wall)
            if on_call:
                on_call(j)
    return walls, outs


def run(ckpt: Path, prompts: list[Prompt], a: Namespace) -> Report:
    ckpt = Path(ckpt)
    if a.prompt_lookup_tokens < 1:
        raise BenchError(f"--prompt-lookup-tokens must be >= 1, got {a.prompt_lookup_tokens}")
    shapes = parse_shapes(a.chains, a.trees)
    with contextlib.ExitStack() as stack:
        path = ckpt
        fp8 = is_fp8(ckpt)
        if fp8:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="specdec-peers-")))
            path = float32_copy(ckpt, tmp / "float32")
        eng = Engine.from_pretrained(path, device=a.device, dtype=torch.float32, max_seq_len=a.max_seq_len)
        compiled = (Engine.from_pretrained(path, device=a.device, dtype=torch.float32, max_seq_len=a.max_seq_len,
                                           compile=True) if a.compile else None)
        hf = load_transformers(path, eng.device)
    ids = eng.encode([p.prompt for p in prompts])
    eos = sorted(eng.eos_ids)
    pad = hf.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)

    def specdec(spec, engine=eng):
        return lambda p, new: engine.generate([p], max_new_tokens=new, seed=a.seed, spec=spec).token_ids[0]

    decoders: list[tuple[str, str, object]] = [("specdec plain", "specdec", specdec(None))]
    auto_reports = {}
    resolved = []
    for shape in shapes:
        if shape.kind == "auto":
            shape, auto_reports["batch 1"] = resolve_auto(eng, ids[:1], 0.0, 1.0, a.seed, draft_vocab=shape.draft_vocab)
        resolved.append(shape)
        decoders.append((f"specdec MTP {shape.label}", "specdec-mtp", specdec(shape.spec())))
    if compiled is not None:  # greedy outputs are checked against eager plain decoding like the MTP rows
        decoders.append(("specdec plain, compiled", "specdec-mtp", specdec(None, compiled)))
        for shape in resolved:
            decoders.append((f"specdec MTP {shape.label}, compiled", "specdec-mtp", specdec(shape.spec(), compiled)))
    cls = type(hf).__name__
    decoders.append((f"transformers {cls}.generate", "transformers", _hf_generate(hf, eos, pad)))
    decoders.append((f"transformers prompt lookup (K={a.prompt_lookup_tokens}, n-gram {a.max_matching_ngram})",
                     "transformers-pld", _hf_generate(hf, eos, pad, prompt_lookup_num_tokens=a.prompt_lookup_tokens,
                                                      max_matching_ngram_size=a.max_matching_ngram)))

    rows: list[dict] = []
    failures: list[str] = []
    bar = progress(len(decoders) * (max(a.repeats, 1) + 1), "peers")

    def done(j: int) -> None:
        bar.update(1)
        bar.set_postfix_str(f"done: {decoders[j][0]}")

    walls, all_outs = _time_rounds([gen for _, _, gen in decoders], ids, a.max_new_tokens, a.repeats, done)
    bar.close()
    reference = all_outs[0]
    base_rates = [sum(map(len, reference)) / w for w in walls[0]]
    for (name, kind, _), outs, round_walls in zip(decoders, all_outs, walls):
        wall = statistics.median(round_walls)
        cmp = compare_outputs(outs, reference)
        tokens = sum(map(len, outs))
        if kind == "specdec-mtp" and not cmp["equal"]:
            row_i, tok_i = cmp["first_mismatch"]
            failures.append(f"MISMATCH: {name} differs from specdec plain greedy output in "
                            f"{cmp['rows'] - cmp['identical_rows']}/{cmp['rows']} prompts "
                            f"(first at prompt {row_i}, token {tok_i})")
        rows.append({"decoder": name, "kind": kind, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                     "tokens_per_s_repeats": [tokens / w for w in round_walls],
                     "equal_to_specdec_greedy": cmp["equal"], "identical_outputs": cmp["identical_rows"],
                     "prompts": cmp["rows"], "identical_token_share": cmp["identical_token_share"],
                     "first_mismatch": cmp["first_mismatch"]})
    hf_rates = next(r["tokens_per_s_repeats"] for r in rows if r["kind"] == "transformers")
    for r in rows:  # ratios: the median over rounds of the ratio within a round
        rates = r["tokens_per_s_repeats"]
        r["ratio_to_specdec_plain"] = paired_ratio(rates, base_rates)
        r["ratio_to_transformers_generate"] = paired_ratio(rates, hf_rates)

    body = [[r["decoder"], fmt(r["tokens_per_s"], 1), f"{r['ratio_to_specdec_plain']:.2f}x",
             f"{r['ratio_to_transformers_generate']:.2f}x",
             "(reference)" if i == 0 else f"{fmt(r['equal_to_specdec_greedy'])} ({r['identical_outputs']}/{r['prompts']})",
             "" if i == 0 else f"{100 * r['identical_token_share']:.1f}%"]
            for i, r in enumerate(rows)]
    where = "CPU" if eng.device.type == "cpu" else str(eng.device)
    notes = [f"{len(prompts)} prompts, one per call (batch 1), greedy, up to {a.max_new_tokens} new tokens, "
             f"{where} float32, {'a float32 copy of the FP8 checkpoint' if fp8 else 'the checkpoint as stored'} "
             "loaded by both libraries; tokens/s = new tokens / summed wall seconds of the calls (median of "
             f"{max(a.repeats, 1)} rounds, each running every decoder in turn); ratios: the median over rounds of "
             "the ratio within a round",
             "identical tokens: share of specdec plain's tokens that come before each prompt's first divergence"]
    settings = {"checkpoint": str(ckpt), "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
                "batch_size": 1, "device": str(eng.device), "dtype": "float32", "float32_copy_of_fp8": fp8,
                "prompt_lookup_num_tokens": a.prompt_lookup_tokens, "max_matching_ngram_size": a.max_matching_ngram,
                "shapes": [s.key for s in shapes], "seed": a.seed, "quick": a.quick, "compiled_rows": a.compile}
    table = Table("", ["decoder", "tokens/s", "vs specdec plain", "vs transformers generate",
                       "= specdec greedy (prompts)", "identical tokens"], body)
    report = Report("peers", "specdec vs transformers (same weights, same prompts)", settings, rows, [table], notes,
                    failures, extra={"auto_reports": auto_reports})
    report.plots = [("tokens_per_s", lambda: plots.peers_tokens_per_s(rows))]
    return report
