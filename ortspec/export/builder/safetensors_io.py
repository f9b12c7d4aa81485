"""Read safetensors checkpoints with numpy alone (bf16 included), single-file or sharded."""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ortspec.runtime.package.json_file import parse_json, read_json

DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


class SafetensorsError(ValueError):
    """A .safetensors file that is not one: truncated, random bytes, or a header that does not fit the file."""


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the upper half of a float32: widen by shifting the bits."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file; each tensor is read when asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            (header_size,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
            if not 0 < header_size <= min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{path} is not a safetensors file (its header size does not fit the file)")
            header = parse_json(f.read(header_size), str(path), SafetensorsError)
        self._header = _checked_header(path, header, size - 8 - header_size)
        self._start = 8 + header_size

    def names(self) -> list[str]:
        return list(self._header)

    def dtype(self, name: str) -> str:
        return self._header[name]["dtype"]

    def shape(self, name: str) -> list[int]:
        return list(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (floating types) or its own integer type."""
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]) if shape else self._read(name, 0, 1).reshape(shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (along its first axis), read alone from the file: a large table
        can be taken a slice at a time, never held whole."""
        shape = self.shape(name)
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path.name}: tensor {name} of shape {shape} has no rows [{start}, {stop})")
        row = math.prod(shape[1:])
        return self._read(name, start * row, (stop - start) * row).reshape(stop - start, *shape[1:])

    def _read(self, name: str, first: int, count: int) -> np.ndarray:
        """`count` elements of the tensor from its `first`, flat, as `get` returns them."""
        info = self._header[name]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(DTYPES[info["dtype"]])
        offset = self._start + info["data_offsets"][0] + first * dtype.itemsize
        # read, not memory-mapped: mapped pages stay resident as the export goes through the file
        raw = np.fromfile(self.path, dtype, count, offset=offset)
        if info["dtype"] == "BF16":
            return _bf16_to_f32(raw)
        if info["dtype"] in ("F16", "F64"):
            return raw.astype(np.float32)
        return raw


def _checked_header(path: Path, header: Any, data_bytes: int) -> dict[str, dict[str, Any]]:
    """The header's tensors, each checked: a shape of sizes >= 0, and offsets inside the data that hold exactly
    that many elements of its dtype (so reading a tensor cannot reach past the file or misshape it)."""
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    header = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        known = isinstance(dtype, str) and dtype in DTYPES  # others are refused when read
        itemsize = np.dtype(DTYPES[dtype]).itemsize if isinstance(dtype, str) and known else None
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(n) is int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
            or (itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize)
        ):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry (dtype, shape, data_offsets)")
    return header


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory: model.safetensors or shards listed by an index file."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f'{index} has no "weight_map" of tensor names to file names')
            shards = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
            self._where = {tensor: shards[shard] for tensor, shard in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{directory} holds no .safetensors weights (the builder reads only safetensors)"
                )
            self._where = {name: f for f in map(SafetensorsFile, files) for name in f.names()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"the checkpoint has no tensor {name}")
        return self._where[name].get(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"the checkpoint has no tensor {name}")
        return self._where[name].rows(name, start, stop)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def shape(self, name: str) -> list[int]:
        return self._where[name].shape(name)
