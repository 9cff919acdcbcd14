"""Where measurements of this machine are kept, and what they are keyed by.

Speed choices (`kernels.cpu_gemm`, `specdec.adaptive`) are measured on the machine that runs
them and cached as JSON in `$SPECDEC_CACHE`, else `$XDG_CACHE_HOME/specdec`, else
`~/.cache/specdec`, under a key naming what the measurement depends on.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch


def cache_dir() -> Path:
    """`$SPECDEC_CACHE`, else `$XDG_CACHE_HOME/specdec`, else `~/.cache/specdec`."""
    if os.environ.get("SPECDEC_CACHE"):
        return Path(os.environ["SPECDEC_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "specdec"


def cpu_model() -> str:
    """The CPU (`describe_cpu` of Linux's /proc/cpuinfo; elsewhere platform.processor())."""
    try:
        described = describe_cpu(Path("/proc/cpuinfo").read_text())
    except OSError:
        described = None
    return described or platform.processor() or platform.machine() or "unknown CPU"


def describe_cpu(cpuinfo: str) -> str | None:
    """The first processor of a /proc/cpuinfo text: its model name, then its family and model
    numbers and its widest x86 vector extension, e.g. "AMD EPYC (family 25 model 17, avx512)"
    (None: no model name).

    Virtual machines often report a bare family name: two 2-core VMs both said "AMD EPYC", one an
    AVX2 part, the other a Zen 4 with AVX-512 that decoded 2.7x faster, and timings cached under
    the bare name would have crossed from one to the other."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not fields.get("model name"):
        return None
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    vector = next((isa for isa, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2"))
                   if flag in flags), None)
    if vector:
        details.append(vector)
    return f"{fields['model name']} ({', '.join(details)})" if details else fields["model name"]


def machine_key(dtype: torch.dtype) -> str:
    """What a CPU timing depends on: CPU model, torch version, intra-op threads, dtype."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {dtype}"


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> bool:
    """Write `data` to `path` atomically (temp file, then rename); False when the cache is not
    writable, which is not an error: the measurement is taken again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        return False
    return True
