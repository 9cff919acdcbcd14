"""`python -m specdec.bench {acceptance,latency,peers,serve,soak,compile,all}`: the benchmark suite.

  acceptance  MTP draft acceptance (tau, per-position unconditional/conditional, draft acceptance
              rate) over draft shapes x temperatures x draft modes
  latency     tokens/s, TPOT p50/p90, TTFT and speedup by batch size, plain vs MTP; greedy outputs
              checked token-equal to plain decoding
  peers       specdec plain / MTP vs transformers generate and its prompt-lookup decoding, same weights
  serve       the OpenAI server under load (closed-loop clients, Poisson arrivals): tokens/s,
              TTFT and TPOT p50/p99, adaptive MTP against plain, continuous against static batching
  soak        many concurrent streams for minutes against the server: errors, cache blocks back
              to zero, resident memory flat
  compile     what --compile costs on a first and a second run (inductor's on-disk caches) against
              the default eager path, and the job size from which it pays
  all         acceptance, latency and peers, one after another (one model load for the first two)

Each writes `<name>.json` (machine, settings, rows), `<name>.md` (also printed) and PNG plots
(with matplotlib: `pip install -e '.[bench]'`) into `--out` (default bench/results/).
Exit status: 0; 1 when an output that must equal plain greedy decoding does not; 2 on bad input
(one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from specdec.bench.common import (BenchError, machine_info, parse_float_list, parse_int_list, parse_shapes,
                          write_report)
from specdec.bench.prompt_set import PromptFileError, select_prompts
from specdec.kernels.fp8_cache import KV_CACHE_DTYPES
from specdec.model.errors import SpecdecError

PROG = "python -m specdec.bench"

DEFAULTS = {
    "common": {"num_prompts": 16, "max_new_tokens": 64, "repeats": 3},
    "acceptance": {"chains": "a3,1,2,3,4", "trees": "3x2x6,4x2x8,3x3x9,auto", "temperatures": "0,0.7,1.0",
                   "draft_modes": "onehot,sample", "batch_size": 8},
    "latency": {"chains": "a3,1,2,3,4,a3@2048,2@2048,3@2048", "trees": "3x2x6,3x2x6@2048,auto",
                "batch_sizes": "1,4,8,16"},
    "peers": {"chains": "2,2@2048", "trees": "auto"},
    "serve": {"clients": "8", "rates": "", "max_batch": 16, "chains": "", "trees": ""},
    "compile": {"batch_size": 1, "chains": "", "trees": ""},
    "soak": {"streams": 64, "minutes": 10.0, "cache_tokens": 8192, "sample_s": 10.0, "chains": "", "trees": ""},
}
QUICK = {
    "common": {"num_prompts": 4, "max_new_tokens": 16, "repeats": 1},
    "acceptance": {"chains": "1,2", "trees": "2x2x4,auto", "temperatures": "0,1.0", "draft_modes": "onehot,sample",
                   "batch_size": 4},
    "latency": {"chains": "a2,1,2", "trees": "2x2x4,auto", "batch_sizes": "1,2"},
    "peers": {"chains": "2", "trees": "", "num_prompts": 2},
    "serve": {"clients": "2", "rates": "", "max_batch": 2, "requests": 4, "chains": "", "trees": ""},
    "compile": {"num_prompts": 1, "max_new_tokens": 8},
    "soak": {"streams": 4, "minutes": 0.2, "cache_tokens": 512, "sample_s": 1.0},
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--ckpt-path", help="checkpoint directory (HF layout); default: the embedded model")
    g.add_argument("--prompt-file", help="prompts: .jsonl with a \"prompt\" field, or text with one prompt per line "
                                         "(default: the shipped held-out set bench/prompts/heldout.jsonl)")
    g.add_argument("--num-prompts", type=int, help="use the first N prompts (default 16; --quick 4)")
    g.add_argument("--max-new-tokens", type=int, help="new tokens per prompt at most (default 64; --quick 16)")
    g.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory (default bench/results)")
    g.add_argument("--repeats", type=int, help="time every configuration this many times, in rounds that each time "
                   "every configuration in turn (acceptance: per temperature); tokens/s is the median "
                   "(default 3; --quick 1)")
    g.add_argument("--quick", action="store_true", help="a tiny sweep (smoke test); explicit flags still win")
    g.add_argument("--seed", type=int, default=0, help="seed of call i is seed + i (default 0)")
    g.add_argument("--device", help="cpu or cuda[:N] (default: CUDA when available)")
    g.add_argument("--max-seq-len", type=int, default=1024, help="engine cache/RoPE length (default 1024)")
    g.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="latent cache format: auto (the compute dtype) or fp8 (e4m3 + one scale per token, "
                        "about half of bf16's bytes; changes logits slightly, see README)")
    g.add_argument("--compile", action="store_true",
                   help="specdec compiled (`--compile` of specdec.generate: whole greedy steps, else the "
                        "decode-step forwards; CPU): "
                        "acceptance/latency use the compiled engine, peers adds compiled rows beside the eager ones")
    g.add_argument("--chains", help="chain draft depths, comma-separated; aK: adaptive speculation up to depth K "
                                    "(the engine's default); @N: draft among the N lowest ids "
                                    "(acceptance default a3,1,2,3,4)")
    g.add_argument("--trees", help="tree shapes DEPTHxTOPKxNODES or auto, comma-separated "
                                   "(acceptance default 3x2x6,4x2x8,3x3x9,auto)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus for sampled runs (default 1)")

    acc = argparse.ArgumentParser(add_help=False)
    g = acc.add_argument_group("acceptance")
    g.add_argument("--temperatures", help="comma-separated (default 0,0.7,1.0)")
    g.add_argument("--draft-modes", help="onehot and/or sample (sample only at T > 0; default both)")
    g.add_argument("--batch-size", type=int, help="rows per call in the acceptance sweep (default 8)")

    lat = argparse.ArgumentParser(add_help=False)
    g = lat.add_argument_group("latency")
    g.add_argument("--batch-sizes", help="comma-separated (default 1,4,8,16)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 skips the equality check")
    g.add_argument("--continuous", action="store_true",
                   help="decode all prompts in one call per configuration with B rows at once, the next prompt "
                        "taking a finished row's place (continuous batching), instead of calls of B prompts "
                        "whose rows start together and wait for the slowest")
    g.add_argument("--ceiling", action="store_true",
                   help="also time one verifier forward over 1 and W tokens per row and report each shape's "
                        "verify cost t(W)/t(1) and ceiling tau/cost (the speedup with free drafting), and each "
                        "chain's and adaptive row's whole-step cost and step bound tau/step cost")

    peers = argparse.ArgumentParser(add_help=False)
    g = peers.add_argument_group("peers")
    g.add_argument("--prompt-lookup-tokens", type=int, default=10, help="transformers prompt_lookup_num_tokens (10)")
    g.add_argument("--max-matching-ngram", type=int, default=2, help="transformers max_matching_ngram_size (2)")

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                epilog="definitions and examples: the Benchmarks section of README.md")
    srv = argparse.ArgumentParser(add_help=False)
    g = srv.add_argument_group("serve")
    g.add_argument("--clients", help="closed-loop concurrencies, comma-separated (default 8)")
    g.add_argument("--rates", help="Poisson arrival rates in requests/s, comma-separated (default none)")
    g.add_argument("--requests", type=int, help="requests per load point (default: twice --num-prompts)")
    g.add_argument("--max-batch", type=int, help="server rows (default: 16, at least the largest --clients)")
    g.add_argument("--long-prompt", type=int, default=0,
                   help="also time the streams while a prompt of this many tokens is prefilled (default: off)")

    soak = argparse.ArgumentParser(add_help=False)
    g = soak.add_argument_group("soak")
    g.add_argument("--streams", type=int, help="concurrent client streams (default 64; --quick 4)")
    g.add_argument("--minutes", type=float, help="how long the clients keep sending (default 10; --quick 0.2)")
    g.add_argument("--cache-tokens", type=int,
                   help="slots in the server's paged cache: small enough to preempt now and then (default 8192)")
    g.add_argument("--sample-s", type=float, help="seconds between samples of memory and cache (default 10)")
    g.add_argument("--max-batch", type=int, help="server rows (default: --streams)")
    g.add_argument("--rss-slack", type=float, default=0.05,
                   help="allowed growth of resident memory after the first quarter (default 0.05)")

    sub = p.add_subparsers(dest="command", required=True, metavar="{acceptance,latency,peers,serve,soak,compile,all}")
    sub.add_parser("acceptance", parents=[common, acc], help="draft acceptance sweep")
    sub.add_parser("latency", parents=[common, lat], help="tokens/s, TPOT, TTFT by batch size")
    sub.add_parser("peers", parents=[common, peers], help="specdec vs transformers generate / prompt lookup")
    sub.add_parser("serve", parents=[common, srv], help="the OpenAI server under load")
    sub.add_parser("soak", parents=[common, soak], help="concurrent streams for minutes against the server")
    comp = argparse.ArgumentParser(add_help=False)
    g = comp.add_argument_group("compile")
    g.add_argument("--batch-size", type=int, help="prompts per generate call (default 1)")
    sub.add_parser("compile", parents=[common, comp], help="--compile's cost, first and second run, against eager")
    sub.add_parser("all", parents=[common, acc, lat, peers], help="acceptance, latency and peers")
    return p


def resolve(a: argparse.Namespace, bench: str) -> argparse.Namespace:
    """A copy of the arguments with this benchmark's defaults (or --quick's) where a flag was not given."""
    table = QUICK if a.quick else DEFAULTS
    out = argparse.Namespace(**vars(a))
    for key, value in {**table["common"], **DEFAULTS.get(bench, {}), **(table.get(bench, {}))}.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    return out


def check(a: argparse.Namespace) -> None:
    for flag, value, minimum in (("--num-prompts", a.num_prompts, 1), ("--max-new-tokens", a.max_new_tokens, 1),
                                 ("--repeats", a.repeats, 1),
                                 ("--threads", a.threads, 1), ("--max-seq-len", a.max_seq_len, 2)):
        if value is not None and value < minimum:
            raise BenchError(f"{flag} must be >= {minimum}, got {value}")
    if not 0.0 < a.top_p <= 1.0:
        raise BenchError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.device is not None:
        try:
            torch.device(a.device)
        except RuntimeError:
            raise BenchError(f"--device: not a device: {a.device!r}") from None
    if a.out.exists() and not a.out.is_dir():
        raise BenchError(f"--out {a.out}: exists and is not a directory")


def check_bench(s: argparse.Namespace, name: str) -> None:
    """Parse this benchmark's lists before any model loads (errors name the flag)."""
    if s.num_prompts < 1:
        raise BenchError(f"--num-prompts must be >= 1, got {s.num_prompts}")
    shapes = parse_shapes(s.chains, s.trees)
    if s.compile and any(shape.kind == "auto" for shape in shapes):
        raise BenchError("--trees auto calibrates eager forwards; with --compile give explicit shapes")
    if name == "acceptance":
        if not shapes:
            raise BenchError("acceptance: no draft shapes (--chains and --trees are both empty)")
        if not parse_float_list(s.temperatures, "--temperatures"):
            raise BenchError("--temperatures: no temperatures given")
        modes = [m.strip() for m in s.draft_modes.split(",") if m.strip()]
        if not modes or any(m not in ("onehot", "sample") for m in modes):
            raise BenchError(f"--draft-modes: expected onehot and/or sample, got {s.draft_modes!r}")
        if s.batch_size < 1:
            raise BenchError(f"--batch-size must be >= 1, got {s.batch_size}")
    if name == "latency":
        if not parse_int_list(s.batch_sizes, "--batch-sizes"):
            raise BenchError("--batch-sizes: no batch sizes given")
        if s.temperature < 0:
            raise BenchError(f"--temperature must be >= 0, got {s.temperature}")
    if name == "serve":
        parse_int_list(s.clients, "--clients")
        if s.rates:
            parse_float_list(s.rates, "--rates")
        if s.requests is not None and s.requests < 1:
            raise BenchError(f"--requests must be >= 1, got {s.requests}")
        if s.max_batch < 1:
            raise BenchError(f"--max-batch must be >= 1, got {s.max_batch}")
    if name == "peers" and (s.prompt_lookup_tokens < 1 or s.max_matching_ngram < 1):
        raise BenchError("--prompt-lookup-tokens and --max-matching-ngram must be >= 1")


def _default_checkpoint() -> Path:
    from specdec.model.parallel import ParallelContext
    from specdec.defaults import default_model_path

    return default_model_path(ParallelContext())[0]


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    failures: list[str] = []
    try:
        check(a)
        if a.threads:
            torch.set_num_threads(a.threads)
        benches = ["acceptance", "latency", "peers"] if a.command == "all" else [a.command]
        all_prompts = select_prompts(a.prompt_file, None)  # a bad file fails before any model loads
        for name in benches:
            check_bench(resolve(a, name), name)
        eng = None
        for name in benches:
            s = resolve(a, name)
            prompts = all_prompts[: s.num_prompts]
            if name in ("peers", "compile"):  # they load the model themselves
                ckpt = Path(a.ckpt_path) if a.ckpt_path else (eng.checkpoint if eng else _default_checkpoint())
                module = importlib.import_module("specdec.bench.peers" if name == "peers" else "specdec.bench.compile_cost")
                report = module.run(ckpt, prompts, s)
            else:
                if eng is None:
                    from specdec import Engine

                    eng = Engine.from_pretrained(a.ckpt_path, device=a.device, max_seq_len=a.max_seq_len,
                                                 compile=a.compile, kv_cache_dtype=a.kv_cache_dtype)
                    if eng.notice:
                        print(eng.notice, file=sys.stderr)
                report = importlib.import_module(f"bench.{name}").run(eng, prompts, s)
            machine = machine_info(eng.device if eng is not None else (a.device or "cpu"))
            paths = write_report(report, a.out, machine)
            print(f"bench: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
            failures += report.failures
    except (BenchError, PromptFileError, SpecdecError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    for f in failures:
        print(f"bench: FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
