"""What every benchmark shares: draft shapes, timed runs, the machine description, and reports
(JSON + Markdown + plots, each written atomically).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdec.bench.stats import pool
from specdec.kernels.machine_cache import cpu_model
from specdec.model.errors import ConfigError
from specdec import Engine, SpecConfig

REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


# ----------------------------------------------------------------------------- draft shapes


@dataclass(frozen=True)
class Shape:
    """One decoding configuration: plain, a chain, a tree (depth x topk x nodes) or `auto`.

    `auto` is resolved per run by `specdec.auto_tree.choose_tree` into a tree with concrete
    dimensions; `key` stays "auto" so rows of different runs line up.
    """

    kind: str  # "plain" | "chain" | "tree" | "auto" | "adaptive" (depth: the most it may draft)
    depth: int = 0
    topk: int = 1
    nodes: int = 0
    draft_vocab: int | None = None  # `@N` suffix: draft among the N lowest token ids (SpecConfig.draft_vocab)

    @property
    def key(self) -> str:
        vocab = f" @{self.draft_vocab}" if self.draft_vocab else ""
        if self.kind == "plain":
            return "plain"
        if self.kind == "chain":
            return f"chain {self.depth}{vocab}"
        if self.kind == "adaptive":
            return f"adaptive {self.depth}{vocab}"
        if self.kind == "auto":
            return f"auto{vocab}"
        return f"tree {self.depth}x{self.topk}x{self.nodes}{vocab}"

    @property
    def dims(self) -> str:
        """`DxKxN` (depth x topk x verified nodes), '-' for plain or unresolved auto."""
        return f"{self.depth}x{self.topk}x{self.nodes}" if self.depth else "-"

    @property
    def label(self) -> str:
        vocab = f" @{self.draft_vocab}" if self.draft_vocab else ""
        return f"auto ({self.dims}){vocab}" if self.kind == "auto" and self.depth else self.key

    def spec(self, draft_mode: str = "onehot") -> SpecConfig | None:
        if self.kind == "plain":
            return None
        if not self.depth:
            raise ValueError("resolve an auto shape before decoding with it")
        return SpecConfig(depth=self.depth, topk=self.topk, nodes=self.nodes if self.topk > 1 else None,
                          draft_mode=draft_mode, draft_vocab=self.draft_vocab, adaptive=self.kind == "adaptive")


PLAIN = Shape("plain")


def parse_int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < minimum for v in values):
        raise BenchError(f"{flag}: values must be >= {minimum}, got {text!r}")
    return values


def parse_float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise BenchError(f"{flag}: values must be finite and >= 0, got {text!r}")
    return values


def _split_vocab(item: str, flag: str) -> tuple[str, int | None]:
    """`SHAPE@N` → (SHAPE, N): N is the draft vocabulary (`SpecConfig.draft_vocab`)."""
    if "@" not in item:
        return item, None
    shape, _, vocab = item.partition("@")
    if not vocab.isdigit() or int(vocab) < 1:
        raise BenchError(f"{flag}: {item!r}: the draft vocabulary after @ must be a positive integer")
    return shape, int(vocab)


def parse_shapes(chains: str, trees: str) -> list[Shape]:
    """`--chains a3,1,2,3@2048` and `--trees 3x2x6,4x2,auto@2048` (depth x topk [x nodes], `@N`: draft
    among the N lowest token ids; `aK`: adaptive speculation up to depth K, the engine's default)
    → shapes, in that order; fixed chains and trees are pinned (`SpecConfig.adaptive` False)."""
    shapes = []
    for item in (c.strip() for c in chains.split(",")):
        if item:
            text, vocab = _split_vocab(item, "--chains")
            kind = "adaptive" if text.startswith("a") else "chain"
            shapes += [Shape(kind, d, 1, d, vocab) for d in parse_int_list(text.lstrip("a"), "--chains")]
    for item in (t.strip() for t in trees.split(",")):
        if not item:
            continue
        item, vocab = _split_vocab(item, "--trees")
        if item == "auto":
            shapes.append(Shape("auto", draft_vocab=vocab))
            continue
        try:
            dims = [int(x) for x in item.split("x")]
        except ValueError:
            raise BenchError(f"--trees: {item!r} is not DEPTHxTOPK[xNODES] or auto") from None
        if len(dims) not in (2, 3):
            raise BenchError(f"--trees: {item!r} is not DEPTHxTOPK[xNODES] or auto")
        try:
            spec = SpecConfig(depth=dims[0], topk=dims[1], nodes=dims[2] if len(dims) == 3 else None, adaptive=False)
        except ConfigError as e:
            raise BenchError(f"--trees {item}: {e}") from None
        shapes.append(Shape("tree" if spec.topk > 1 else "chain", spec.depth, spec.topk, spec.n_nodes, vocab))
    seen, unique = set(), []
    for s in shapes:
        if s.key not in seen:
            seen.add(s.key)
            unique.append(s)
    return unique


def resolve_auto(eng: Engine, ids: list[list[int]], temperature: float, top_p: float, seed: int,
                 draft_mode: str = "onehot", draft_vocab: int | None = None) -> tuple[Shape, str]:
    """Calibrate `--tree auto` on `ids` (one batch); the chosen shape and choose_tree's report."""
    from specdec.auto_tree import choose_tree

    choice = choose_tree(eng, ids, temperature, top_p, seed, draft_mode)
    nodes = choice.nodes if choice.topk > 1 else choice.depth
    return Shape("auto", choice.depth, choice.topk, nodes, draft_vocab), choice.report


# ----------------------------------------------------------------------------- timed runs


def batches(ids: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Calls of `batch_size` rows covering every prompt once; the last call is filled up by cycling
    through the prompts from the start, so every call has exactly `batch_size` rows."""
    n_calls = math.ceil(len(ids) / batch_size)
    rows = [ids[i % len(ids)] for i in range(n_calls * batch_size)]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


@dataclass
class Run:
    """A configuration decoded over all calls: pooled stats and every row's tokens (call order)."""

    shape: Shape
    stats: dict
    token_ids: list[list[int]]


def timed_runs(eng: Engine, groups: list[list[list[int]]], shapes: Sequence[Shape], *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               draft_mode: str | Sequence[str] = "onehot", warmup: bool = True, repeats: int = 1,
               on_call: Callable[[str], None] | None = None, max_batch: int | None = None) -> list[Run]:
    """Every shape decoded over all `groups`, interleaved call by call: a warm-up per shape, then
    `repeats` rounds, each decoding every batch with every shape in turn before the next batch. So
    plain decoding and the drafts share each stretch of machine time, seconds apart: on a shared or
    throttled CPU speeds drift over minutes, and configurations timed one after another (all repeats
    of one, then the next) were seen to swing their ratio by ±0.3x between runs; interleaved by
    round (every call of one shape, then every call of the next: a minute apart at batch 1), a
    2-core VM's per-round ratio of two identical workloads still ranged 0.68–1.28.

    The warm-up decodes the first batch with 8 new tokens; with `--compile`, every batch with the
    full `max_new_tokens`, so that the graphs of each call's shrinking pool are compiled before
    timing (a warm-up of the first batch alone left a later call compiling: 30 tokens/s in a round
    of ~950).

    Call i of round r starts with shape r + i (mod the number of shapes), so that no configuration
    always runs right after the same one. Call i is seeded with `seed + i`, the same for every configuration
    and round (so rounds decode the same tokens). `draft_mode`: one for every shape, or one per shape. Per run: rates and
    latency samples are pooled over all rounds; tokens/s and decode tokens/s (new tokens over wall
    seconds after prefill) are the medians of the rounds', and every round's value is kept
    (`tokens_per_s_repeats`, `decode_tokens_per_s_repeats`) for `paired_speedup`. `on_call(label)`
    is told after each configuration's warm-up or round. `max_batch`: rows each call decodes at once
    (`Engine.generate`; None: all of its prompts).
    """
    modes = [draft_mode] * len(shapes) if isinstance(draft_mode, str) else list(draft_mode)
    specs = [shape.spec(mode) for shape, mode in zip(shapes, modes, strict=True)]
    if warmup:
        compiled = eng.compiled is not None
        for shape, spec in zip(shapes, specs):
            for i, g in enumerate(groups if compiled else groups[:1]):
                eng.generate(g, max_new_tokens=max_new_tokens if compiled else min(8, max_new_tokens),
                             temperature=temperature, top_p=top_p, seed=seed + i, spec=spec, max_batch=max_batch)
            if on_call:
                on_call(f"{shape.key} warm-up")
    rounds = max(repeats, 1)
    stats: list[list] = [[] for _ in shapes]
    per_round: list[list[dict]] = [[] for _ in shapes]
    outs: list[list] = []
    for r in range(rounds):
        outs = [[] for _ in shapes]
        for i, g in enumerate(groups):
            for j in [(r + i + k) % len(shapes) for k in range(len(shapes))]:  # each call starts one later
                outs[j].append(eng.generate(g, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed + i, spec=specs[j], max_batch=max_batch))
        for j in [(r + k) % len(shapes) for k in range(len(shapes))]:
            call_stats = [o.stats for o in outs[j]]
            per_round[j].append(pool(call_stats))
            stats[j] += call_stats
            if on_call:
                on_call(f"{shapes[j].key} round {r + 1}/{rounds}")
    runs = []
    for j, shape in enumerate(shapes):
        pooled = pool(stats[j])
        for key in ("tokens_per_s", "decode_tokens_per_s"):
            pooled[f"{key}_repeats"] = [p[key] for p in per_round[j]]
            pooled[key] = statistics.median(pooled[f"{key}_repeats"])
        pooled["calls"], pooled["repeats"] = len(groups), rounds
        runs.append(Run(shape, pooled, [t for o in outs[j] for t in o.token_ids]))
    return runs


def paired_speedup(run: Run, base: Run, key: str = "tokens_per_s") -> float:
    """`run`'s speed over `base`'s (`key`: tokens_per_s or decode_tokens_per_s): the median over
    rounds of the ratio within each round (`timed_runs` interleaves them), so a slow stretch of the
    machine slows both sides of a ratio instead of one."""
    return paired_ratio(run.stats[f"{key}_repeats"], base.stats[f"{key}_repeats"])


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median over rounds of `ours[i] / theirs[i]` (rates of the same rounds)."""
    if len(ours) != len(theirs):
        raise ValueError(f"paired ratio: {len(ours)} rounds against {len(theirs)}")
    return statistics.median(a / b for a, b in zip(ours, theirs))


def greedy_mismatch(what: str, got: list[list[int]], want: list[list[int]]) -> str | None:
    """None when `got` equals the plain-decoding reference `want` row for row, else the failure line."""
    from specdec.bench.stats import compare_outputs

    cmp = compare_outputs(got, want)
    if cmp["equal"]:
        return None
    row_i, tok_i = cmp["first_mismatch"]
    return (f"MISMATCH: {what} differs from plain greedy decoding in {cmp['rows'] - cmp['identical_rows']}/"
            f"{cmp['rows']} rows (first at row {row_i}, token {tok_i})")


def progress(total: int, desc: str):
    """A tqdm bar on stderr over the configurations of a sweep."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- machine


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device | str | None = None) -> dict:
    """Where the numbers come from: platform, CPU, cores, library versions, threads, git commit."""
    try:
        import transformers

        transformers_version = transformers.__version__
    except Exception:  # noqa: BLE001 - a broken install still leaves the rest worth reporting
        transformers_version = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    device = torch.device(device) if device is not None else torch.device("cpu")
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "torch": torch.__version__,
        "transformers": transformers_version,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit is not None and dirty is not None else None,
    }
    return info


def machine_line(m: dict) -> str:
    where = m["gpu"] or f"{m['cpu']}, {m['cores_usable'] or m['cores']} cores"
    commit = (m["git_commit"] or "unknown")[:10] + (" (dirty)" if m.get("git_dirty") else "")
    return (f"{where}; torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}; "
            f"Python {m['python']}; commit {commit}")


# ----------------------------------------------------------------------------- reports


@dataclass
class Table:
    heading: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    """Everything one benchmark writes: `<name>.json`, `<name>.md` and `<name>_<plot>.png`."""

    name: str
    title: str
    settings: dict
    rows: list[dict] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    plots: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)  # (suffix, () -> Figure)
    extra: dict = field(default_factory=dict)


def fmt(x: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, None as '-', booleans as yes/NO."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_list(xs: Sequence[float | None], digits: int = 2) -> str:
    return " ".join(fmt(x, digits) for x in xs) if xs else "-"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Report, machine: dict) -> str:
    def value(v: Any) -> str:
        return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

    settings = ", ".join(f"{k}={value(v)}" for k, v in report.settings.items() if k != "checkpoint")
    parts = [f"## {report.title}", "",
             f"Machine: {machine_line(machine)}.", "",
             f"Checkpoint `{report.settings.get('checkpoint')}`; {settings}."]
    for t in report.tables:
        parts += ["", f"### {t.heading}" if t.heading else "", "", markdown_table(t.headers, t.rows)]
    if report.notes:
        parts += [""] + [f"- {n}" for n in report.notes]
    if report.failures:
        parts += ["", "**FAILURES:**", ""] + [f"- {f}" for f in report.failures]
    return "\n".join(p for p in _squeeze_blank(parts)) + "\n"


def _squeeze_blank(parts: list[str]) -> list[str]:
    out: list[str] = []
    for p in parts:
        if p == "" and out and out[-1] == "":
            continue
        out.append(p)
    return out


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` through a temp file in the same directory, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(x: Any):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _finite(x: Any) -> Any:
    """NaN/inf → None so the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def write_report(report: Report, out_dir: Path, machine: dict, log=print) -> list[Path]:
    """Write the JSON, the Markdown (also printed) and the plots; return the paths written."""
    out_dir = Path(out_dir)
    payload = {
        "benchmark": report.name,
        "title": report.title,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": report.settings,
        "rows": report.rows,
        "failures": report.failures,
        "notes": report.notes,
        **report.extra,
    }
    md = render_markdown(report, machine)
    json_path, md_path = out_dir / f"{report.name}.json", out_dir / f"{report.name}.md"
    write_atomic(json_path, json.dumps(_finite(payload), indent=2, default=_json_default, allow_nan=False) + "\n")
    write_atomic(md_path, md)
    log(md)
    written = [json_path, md_path]
    if report.plots:
        if not matplotlib_available():
            print(f"bench: matplotlib is not installed (pip install -e '.[bench]'); no plots for {report.name}, "
                  "JSON and Markdown written", file=sys.stderr)
        else:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            for suffix, draw in report.plots:
                fig = draw()
                if fig is None:
                    continue
                path = out_dir / f"{report.name}_{suffix}.png"
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir)
                os.close(fd)
                try:
                    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                finally:
                    plt.close(fig)
                written.append(path)
    return written

