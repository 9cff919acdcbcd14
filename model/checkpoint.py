"""Reading Hugging Face-layout checkpoints: index + safetensors shards, FP8 block scales, per-rank slices.

A checkpoint directory holds `config.json` and either `model.safetensors.index.json` (+ shards),
a single `model.safetensors`, or the pre-sharded output of `python -m specdec.model.convert`
(`specdec_sharding.json` + `model{rank}-mp{N}.safetensors`). Only safetensors is read: nothing
is unpickled and no code from the directory runs.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from specdec.model.errors import CheckpointError

SHARDING_FILE = "specdec_sharding.json"
SCALE_SUFFIX = "_scale_inv"


class CheckpointReader:
    """Maps tensor names to shard files and reads whole tensors or slices of them.

    Args:
        path: checkpoint directory.
        rank / world_size: for pre-sharded checkpoints, which rank file to read.
    """

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        self.presharded = (self.path / SHARDING_FILE).is_file()
        self._open: dict[str, object] = {}
        self.weight_map = self._read_weight_map(rank, world_size)

    def _read_weight_map(self, rank: int, world_size: int) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if self.presharded:
            meta = _read_json(self.path / SHARDING_FILE)
            if meta.get("world_size") != world_size:
                raise CheckpointError(
                    f"{self.path / SHARDING_FILE}: checkpoint was pre-sharded for world size "
                    f"{meta.get('world_size')}, but {world_size} ranks are running")
            return self._names_in(f"model{rank}-mp{world_size}.safetensors")
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{self.path / shard}: shard named in {index.name} is missing")
            return weight_map
        if (self.path / "model.safetensors").is_file():
            return self._names_in("model.safetensors")
        raise CheckpointError(f"{self.path}: no model.safetensors.index.json or model.safetensors found")

    def _names_in(self, shard: str) -> dict[str, str]:
        if not (self.path / shard).is_file():
            raise CheckpointError(f"{self.path / shard}: shard file is missing")
        return {name: shard for name in self._handle(shard).keys()}

    def _handle(self, shard: str):
        if shard not in self._open:
            try:
                self._open[shard] = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{self.path / shard}: not a readable safetensors file ({e})") from None
        return self._open[shard]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a stored tensor, without reading its data."""
        sl = self._slice(name)
        return tuple(sl.get_shape()), _dtype_of(sl.get_dtype(), name)

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        try:
            return self._handle(self.weight_map[name]).get_slice(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: cannot read tensor {name} ({e})") from None

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Read tensor `name`, or only `[start, start+length)` along `dim` (one rank's share)."""
        sl = self._slice(name)
        try:
            if dim is None:
                return sl[:]
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, start + length)
            return sl[tuple(index)]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: cannot read tensor {name} ({e})") from None

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor this reader sees, whole, by name (for tools that rewrite a checkpoint)."""
        return {name: self.read(name) for name in self.weight_map}

    def shard_of(self, name: str) -> str:
        return self.weight_map[name]


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "I64": torch.int64, "I32": torch.int32}


def _dtype_of(code: str, name: str) -> torch.dtype:
    if code not in _DTYPES:
        raise CheckpointError(f"tensor {name} has unsupported dtype {code}")
    return _DTYPES[code]


def dequant_window(w: torch.Tensor, scale: torch.Tensor, row0: int, col0: int, block: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantise an FP8 window `w` `[m, n]` whose top-left element is (row0, col0) of the full tensor.

    `scale` holds the block scales starting at block (row0 // block, col0 // block).
    """
    r_off, c_off = row0 % block, col0 % block
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
    full = full[r_off : r_off + w.shape[0], c_off : c_off + w.shape[1]]
    return (w.float() * full).to(out_dtype)


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = param_name.rpartition(".")
    return model.get_submodule(mod_name) if mod_name else model, attr


def load_state(model: nn.Module, reader: CheckpointReader, prefix: str, device: torch.device | str,
               show_progress: bool, fp8_block: int = 128) -> None:
    """Fill every parameter of `model` (built on the meta device) from `reader`.

    Parameter `p` of `model` is tensor `prefix + p` in the checkpoint (the module tree mirrors HF
    names). Sharded modules (`shard_dim`, `shard_start`, `shard_full`) read only their slice.
    FP8 tensors go into FP8 parameters with their scales, or are dequantised into the compute
    dtype where the module holds a float weight. Raises CheckpointError naming the tensor on any
    missing tensor, missing scale, or shape/dtype mismatch.
    """
    names = [n for n, _ in model.named_parameters() if not n.endswith(SCALE_SUFFIX)]
    by_shard: dict[str, list[str]] = defaultdict(list)
    for n in names:
        full = prefix + n
        if not reader.has(full):
            raise CheckpointError(f"{reader.path}: tensor {full} is missing from the checkpoint")
        by_shard[reader.shard_of(full)].append(n)
    for shard in tqdm(sorted(by_shard), desc="loading shards", unit="shard", disable=not show_progress):
        for n in by_shard[shard]:
            _load_param(model, reader, prefix, n, device, fp8_block)


def _load_param(model: nn.Module, reader: CheckpointReader, prefix: str, name: str, device, block: int) -> None:
    owner, attr = _owner(model, name)
    target: torch.Tensor = getattr(owner, attr)
    full_name = prefix + name
    shape, dtype = reader.shape_dtype(full_name)
    dim = getattr(owner, "shard_dim", None) if attr == "weight" else None
    sharded = dim is not None and not reader.presharded
    expected = list(target.shape)
    if sharded:
        expected[dim] = owner.shard_full
    if list(shape) != expected:
        raise CheckpointError(
            f"{reader.path}: tensor {full_name} has shape {list(shape)}, config expects {expected}")
    start, length = (owner.shard_start, target.shape[dim]) if sharded else (0, None)
    data = reader.read(full_name, dim if sharded else None, start, length)
    if dtype == torch.float8_e4m3fn:
        data = _fp8_into(owner, attr, target, data, reader, full_name, dim if sharded else None, start, block, device)
    elif target.dtype == torch.float8_e4m3fn:
        raise CheckpointError(f"{reader.path}: tensor {full_name} is {dtype}, expected float8_e4m3fn")
    elif dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CheckpointError(f"{reader.path}: tensor {full_name} has dtype {dtype}, expected a float type")
    setattr(owner, attr, nn.Parameter(data.to(device=device, dtype=target.dtype), requires_grad=False))


def _fp8_into(owner: nn.Module, attr: str, target: torch.Tensor, data: torch.Tensor, reader: CheckpointReader,
              full_name: str, dim: int | None, start: int, block: int, device) -> torch.Tensor:
    """Return the FP8 window `data` as FP8 (setting the owner's scale) or dequantised to target's dtype."""
    scale_name = full_name + SCALE_SUFFIX
    if not reader.has(scale_name):
        raise CheckpointError(f"{reader.path}: FP8 tensor {full_name} has no {scale_name}")
    scale = reader.read(scale_name).float()
    rows, cols = (data.shape[0], data.shape[1])
    if dim == 0:
        rows = owner.shard_full
    elif dim == 1:
        cols = owner.shard_full
    grid = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape) != grid:
        raise CheckpointError(
            f"{reader.path}: tensor {scale_name} has shape {list(scale.shape)}, expected {list(grid)} "
            f"for a [{rows}, {cols}] weight in {block}x{block} blocks")
    row0 = start if dim == 0 else 0
    col0 = start if dim == 1 else 0
    window = scale[row0 // block : -(-(row0 + data.shape[0]) // block), col0 // block : -(-(col0 + data.shape[1]) // block)]
    if target.dtype != torch.float8_e4m3fn:
        return dequant_window(data, window, row0, col0, block, target.dtype)
    if (row0 % block) or (col0 % block):
        raise CheckpointError(
            f"{reader.path}: cannot keep {full_name} in FP8 on this rank: its shard starts at {start}, "
            f"not a multiple of the {block}-block (use a world size that splits it on block boundaries)")
    owner.weight_scale_inv = nn.Parameter(window.contiguous().to(device), requires_grad=False)
    return data


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def mtp_tensor_names(reader: CheckpointReader, n_layers: int) -> list[str]:
    """Names of the MTP module's tensors (`model.layers.{n_layers}.*` and beyond)."""
    return [n for n in reader.weight_map if (m := _LAYER.match(n)) and int(m.group(1)) >= n_layers]


