"""Read safetensors checkpoints with numpy alone (bf16 included), single-file or sharded."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

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


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the upper half of a float32: widen by shifting the bits."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors are read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        self._header = header
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)

    def names(self) -> list[str]:
        return list(self._header)

    def dtype(self, name: str) -> str:
        return self._header[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (floating types) or its own integer type."""
        info = self._header[name]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{self.path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return _bf16_to_f32(raw)
        if info["dtype"] in ("F16", "F64"):
            return raw.astype(np.float32)
        return np.array(raw)


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory: model.safetensors or shards listed by an index file."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
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

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)
