"""Training data for the default model: the standard library's Python source (its `test` package held out).

* Corpus: every `*.py` under `sysconfig.get_paths()["stdlib"]` except `site-packages` and any
  directory named `test`, `tests` or `idle_test`; held-out set: the `test` package (`Lib/test`).
  Files are sorted by relative POSIX path; files that are not valid UTF-8 are skipped.
* Tokenizer: byte-level BPE (`model.tokenizer_build.train_bpe`) trained on the corpus only.
* Token streams: all documents tokenized once, each followed by EOS, stored as uint16 `.npy`
  under the work dir (reused on resume when the tokenizer and file lists are unchanged).
* Batches: random contiguous windows whose starts are a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from specdec.model.tokenizer_build import EOS, train_bpe

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
HELDOUT_PACKAGE = "test"


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) under `root`, each sorted by relative POSIX path.

    Training: `*.py` outside `site-packages` and outside every `test`/`tests`/`idle_test` dir.
    Held-out: `*.py` in the top-level `test` package.
    """
    train, heldout = [], []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] == HELDOUT_PACKAGE:
            heldout.append(path)
        elif not EXCLUDED_DIRS.intersection(parts[:-1]):
            train.append(path)

    def key(p: Path) -> str:
        return p.relative_to(root).as_posix()

    return sorted(train, key=key), sorted(heldout, key=key)


def read_texts(files: list[Path], max_chars: int | None = None) -> list[str]:
    """UTF-8 texts of `files` in order (undecodable or unreadable files skipped), stopping after `max_chars`."""
    texts: list[str] = []
    total = 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


def encode_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """Concatenate the token ids of `texts`, each document followed by EOS → `[n_tokens]` uint16."""
    eos = tok.token_to_id(EOS)
    if tok.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab size {tok.get_vocab_size()} does not fit uint16")
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


@dataclass(frozen=True)
class Corpus:
    """Tokenizer plus train/held-out token streams (uint16 `[n]`) and what they were built from."""

    tokenizer: Tokenizer
    train: np.ndarray
    heldout: np.ndarray
    n_train_files: int
    n_heldout_files: int


def _fingerprint(root: Path, train: list[Path], heldout: list[Path], vocab_size: int,
                 max_chars: int | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(root), vocab_size, max_chars]).encode())
    for f in train + [Path("--heldout--")] + heldout:
        stat = f.stat() if f.exists() else None
        h.update(f"{f}:{stat.st_size if stat else -1}\n".encode())
    return h.hexdigest()


def build_corpus(work_dir: Path, vocab_size: int, root: Path | None = None, max_chars: int | None = None,
                 heldout_max_chars: int | None = None, log=print) -> Corpus:
    """Train the tokenizer and tokenize both splits, or reuse the cache in `work_dir/data`.

    Args:
        work_dir: cache directory root (files go to `work_dir/data`).
        vocab_size: BPE vocabulary size (special tokens bos/eos/pad are ids 0..2).
        root: standard library directory (default: this interpreter's).
        max_chars / heldout_max_chars: stop reading each split after about this many characters
            (None: everything); for quick runs and tests.
        log: progress printer.
    """
    root = root or stdlib_root()
    train_files, heldout_files = split_files(root)
    cache = Path(work_dir) / "data"
    key = _fingerprint(root, train_files, heldout_files, vocab_size, max_chars) + f":{heldout_max_chars}"
    meta_file = cache / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("key") == key:
        meta = json.loads(meta_file.read_text())
        return Corpus(Tokenizer.from_file(str(cache / "tokenizer.json")), np.load(cache / "train.npy"),
                      np.load(cache / "heldout.npy"), meta["n_train_files"], meta["n_heldout_files"])
    cache.mkdir(parents=True, exist_ok=True)
    train_texts = read_texts(train_files, max_chars)
    heldout_texts = read_texts(heldout_files, heldout_max_chars)
    log(f"training BPE (vocab {vocab_size}) on {len(train_texts)} files, {sum(map(len, train_texts)):,} chars")
    tok = train_bpe(train_texts, vocab_size)
    train = encode_stream(tok, train_texts)
    heldout = encode_stream(tok, heldout_texts)
    log(f"tokens: train {len(train):,}, held-out {len(heldout):,} ({len(heldout_texts)} files)")
    tok.save(str(cache / "tokenizer.json"))
    np.save(cache / "train.npy", train)
    np.save(cache / "heldout.npy", heldout)
    meta = {"key": key, "n_train_files": len(train_texts), "n_heldout_files": len(heldout_texts),
            "train_tokens": int(len(train)), "heldout_tokens": int(len(heldout))}
    meta_file.write_text(json.dumps(meta, indent=2))
    return Corpus(tok, train, heldout, len(train_texts), len(heldout_texts))


def window_starts(n_tokens: int, window: int, count: int, seed: int, step: int) -> np.ndarray:
    """`count` uniform window starts in `[0, n_tokens − window]`, a pure function of (seed, step)."""
    if n_tokens < window:
        raise ValueError(f"token stream of {n_tokens} is shorter than one window of {window}")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - window + 1, size=count)


def gather_windows(stream: np.ndarray, starts: np.ndarray, window: int) -> torch.Tensor:
    """Windows `stream[s : s + window]` for each start → `[len(starts), window]` int64."""
    idx = starts[:, None] + np.arange(window)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))


def train_batch(stream: np.ndarray, batch_size: int, window: int, seed: int, step: int) -> torch.Tensor:
    """The training batch of `step`: `[batch_size, window]` int64 random contiguous windows."""
    return gather_windows(stream, window_starts(len(stream), window, batch_size, seed, step), window)


def heldout_windows(stream: np.ndarray, count: int, window: int, seed: int = 1234) -> torch.Tensor:
    """A fixed evaluation set of `count` held-out windows `[count, window]` int64 (evenly spread, seeded jitter)."""
    n_starts = len(stream) - window + 1
    if n_starts < 1:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than one window of {window}")
    rng = np.random.default_rng(seed)
    stride = n_starts / count
    starts = (np.arange(count) * stride + rng.uniform(0, stride, size=count)).astype(np.int64)
    return gather_windows(stream, np.minimum(starts, n_starts - 1), window)
