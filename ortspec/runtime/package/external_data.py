"""The external-data files an ONNX graph names, read from its protobuf without onnx and without the data.

ONNX Runtime opens every `location` that a tensor of the graph names (relative to the graph's
directory), so the package loader must check those files against the manifest before it makes a
session. The runtime may not import onnx, and needs only this: the walk below descends into the few
messages that can hold tensors (graphs, nodes, attributes, functions, sparse tensors) and skips every
other field by its length. The file is memory-mapped, so the weights are never read.
"""

from __future__ import annotations

import mmap
from collections.abc import Collection, Iterator
from pathlib import Path

# message kind -> {field number: kind of the message in that field}, from onnx.proto
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},  # external_data: StringStringEntryProto key/value pairs
    "entry": {},
}
_MAX_DEPTH = 64  # subgraphs nest; a hostile file must not exhaust the stack
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or malformed varint")


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        wire = tag & 7
        if wire == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _BYTES:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            yield tag >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("a field runs past the end of its message")


def _walk(buf: mmap.mmap, kind: str, start: int, end: int, depth: int, found: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"messages nest deeper than {_MAX_DEPTH}")
    if kind == "entry":
        parts = {number: bytes(buf[s:e]) for number, s, e in _fields(buf, start, end)}
        if parts.get(1) == b"location":
            found.add(parts.get(2, b"").decode("utf-8"))
        return
    children = _CHILDREN[kind]
    for number, s, e in _fields(buf, start, end):
        if number in children:
            _walk(buf, children[number], s, e, depth + 1, found)


def external_data_locations(path: Path) -> set[str]:
    """Every external-data `location` the ONNX model at `path` names; ValueError if it is not protobuf."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return set()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            found: set[str] = set()
            _walk(buf, "model", 0, len(buf), 0, found)
            return found


def _tensor_name_and_dims(buf: mmap.mmap, start: int, end: int) -> tuple[str, list[int]]:
    """A TensorProto's name (field 8) and dims (field 1, packed or not), its data skipped."""
    name, dims, pos = "", [], start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            if number == 1:
                dims.append(value)
        elif wire == _BYTES:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message")
            if number == 8:
                name = bytes(buf[pos : pos + length]).decode("utf-8", errors="replace")
            elif number == 1:  # packed dims
                at = pos
                while at < pos + length:
                    value, at = _varint(buf, at, pos + length)
                    dims.append(value)
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return name, dims


def initializer_dims(path: Path, wanted: Collection[str]) -> dict[str, list[int]]:
    """The dims of the main graph's initializers named in `wanted` (their data is never read)."""
    found: dict[str, list[int]] = {}
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, start, end in _fields(buf, 0, len(buf)):
                if number != 7:  # ModelProto.graph
                    continue
                for field, s, e in _fields(buf, start, end):
                    if field == 5:  # GraphProto.initializer
                        name, dims = _tensor_name_and_dims(buf, s, e)
                        if name in wanted:
                            found[name] = dims
    return found
