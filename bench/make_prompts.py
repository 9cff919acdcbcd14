"""`python -m specdec.bench.make_prompts`: write the fixed held-out prompt set `bench/prompts/heldout.jsonl`.

Prompts are code snippets cut from the standard library's *test suite* (`Lib/test`), which the
default model never saw in training (`mtp.data.split_files` holds that package out). Deterministic:

* held-out files sorted by relative path (as `split_files` returns them); `--count` of them picked at
  evenly spaced indices (when a picked file gives no snippet, the next file in order is tried);
* in each file, the first top-level `def`/`class` line whose snippet qualifies: whole lines from that
  line on, the longest such run of at most `--max-chars` characters (without the trailing newline),
  at least `--min-chars` long, ASCII, and not found verbatim in any training file;
* one JSON object per line: `{"id": "heldout-NN", "source": <path relative to Lib/test>, "prompt": ...}`.

The snippets depend on the standard library that is read (the shipped file was made from
CPython 3.11.7's); run this script again to remake the set for another one (`--out FILE`,
default the shipped path).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from specdec.mtp.data import HELDOUT_PACKAGE, read_texts, split_files, stdlib_root

DEFAULT_OUT = Path(__file__).resolve().parent / "prompts" / "heldout.jsonl"
TOP_LEVEL = re.compile(r"^(def|class) ", re.MULTILINE)


def snippet_at(text: str, start: int, min_chars: int, max_chars: int) -> str | None:
    """Whole lines of `text` from `start`, as many as fit in `max_chars` (trailing blanks dropped), or None."""
    chunk = text[start : start + max_chars + 1]
    lines = chunk.split("\n")
    if len(chunk) > max_chars:  # the last piece may be a line cut short
        lines = lines[:-1]
    piece = "\n".join(lines).rstrip()
    if len(piece) < min_chars or not piece.isascii():
        return None
    return piece


def file_snippet(text: str, min_chars: int, max_chars: int, training: str) -> str | None:
    """The first qualifying snippet of `text` that starts at a top-level def/class line."""
    for m in TOP_LEVEL.finditer(text):
        piece = snippet_at(text, m.start(), min_chars, max_chars)
        if piece is not None and piece not in training:
            return piece
    return None


def make_prompts(count: int = 48, min_chars: int = 200, max_chars: int = 300,
                 root: Path | None = None) -> list[dict]:
    """The prompt records (deterministic for a given standard library)."""
    root = root or stdlib_root()
    train_files, heldout_files = split_files(root)
    training = "\n\0\n".join(read_texts(train_files))
    test_dir = root / HELDOUT_PACKAGE
    picks = sorted({round(i * len(heldout_files) / count) for i in range(count)})
    records: list[dict] = []
    used: set[int] = set()
    for start in picks:
        for index in range(start, len(heldout_files)):
            if index in used:
                continue
            used.add(index)
            path = heldout_files[index]
            texts = read_texts([path])
            piece = file_snippet(texts[0], min_chars, max_chars, training) if texts else None
            if piece is not None:
                records.append({"source": path.relative_to(test_dir).as_posix(), "prompt": piece})
                break
        if len(records) == count:
            break
    return [{"id": f"heldout-{i:02d}", **r} for i, r in enumerate(records)]


def write_jsonl(records: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=True) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specdec.bench.make_prompts", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--count", type=int, default=48)
    p.add_argument("--min-chars", type=int, default=200)
    p.add_argument("--max-chars", type=int, default=300)
    a = p.parse_args(argv)
    records = make_prompts(a.count, a.min_chars, a.max_chars)
    if not records:
        print(f"bench.make_prompts: error: no snippets found under {stdlib_root() / HELDOUT_PACKAGE}",
              file=sys.stderr)
        return 2
    write_jsonl(records, a.out)
    print(f"wrote {len(records)} prompts from {stdlib_root() / HELDOUT_PACKAGE} "
          f"(Python {sys.version.split()[0]}) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
