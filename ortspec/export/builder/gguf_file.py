"""Parse a GGUF file's header, metadata and tensor table with bounds, and read its tensors one at a time.

A GGUF header is a list of counts and lengths that the file claims (items in an array, bytes in a
string, dimensions of a tensor, where its data lies). A reader that allocates what a claim asks
before checking it can be made to allocate without bound by a 100-byte file, so every count,
length, offset and dimension here is checked against the bytes left in the file and against sane
limits first, and a bad one stops the parse with one line naming the file and the key (or tensor).

The format (version 2 and 3, little-endian): magic "GGUF", version u32, tensor count u64, metadata
count u64; each metadata entry a string key, a value type u32 and the value (an array: item type
u32, count u64, items); each tensor a string name, n_dims u32, the dims u64 (innermost first), a
GGML type u32 and an offset u64 into the data section, which starts at the next multiple of
`general.alignment` (default 32) after the table. Strings are a u64 length and UTF-8 bytes.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_TENSORS = 1 << 16  # an 8B model has ~300, a large mixture of experts a few thousand
MAX_KEYS = 1 << 16
MAX_KEY_BYTES = 1 << 12
MAX_STRING_BYTES = 1 << 24  # a chat template is tens of kB; a single 16 MB string is not metadata
MAX_ARRAY_ITEMS = 1 << 21  # 8x the largest vocabularies (Gemma's 262,144 tokens)
MAX_ELEMENTS = 1 << 40  # elements in one tensor

# GGUF value type -> (struct format, bytes); 8 is a string, 9 an array
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file cannot be read or lacks what export needs."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: its name, shape in numpy (row-major) order, GGML type and data bytes."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, int(np.prod(self.shape[:-1], dtype=np.int64)))


class _Cursor:
    """Reads the header front to back, refusing any read past the end of the file."""

    def __init__(self, buffer: mmap.mmap, size: int, name: str) -> None:
        self.buffer, self.size, self.name, self.at = buffer, size, name, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.name}: {what}; not a valid GGUF file")

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.at + count > self.size:
            raise self.fail(f"{what} needs {count} bytes at offset {self.at}, past the end of the file ({self.size})")

    def scalar(self, kind: int, what: str) -> Any:
        fmt, width = _SCALARS[kind]
        self.need(width, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.at)
        self.at += width
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar(4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(10, what))

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        length = self.u64(f"the length of {what}")
        if length > limit:
            raise self.fail(f"{what} claims {length} bytes (at most {limit} are accepted)")
        self.need(length, what)
        raw = self.buffer[self.at : self.at + length]
        self.at += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def strings(self, count: int, key: str) -> StringArray:
        """`count` strings, their lengths checked now and their bytes decoded when read (`StringArray`)."""
        first, at, end, buffer = self.at, self.at, self.size, self.buffer
        length, starts = struct.Struct("<Q").unpack_from, array("Q")
        for i in range(count):  # the checks inline: a vocabulary has up to MAX_ARRAY_ITEMS of them
            (size,) = length(buffer, at) if at + 8 <= end else (-1,)
            if not 0 <= size <= MAX_STRING_BYTES or at + 8 + size > end:
                self.at = at
                self.string(f"item {i} of metadata {key}")  # raises, naming what is wrong
            starts.append(at + 8 - first)
            at += 8 + size
        self.at = at
        return StringArray(buffer[first:at], starts, f"{self.name}: metadata {key}")

    def value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            value = self.scalar(kind, f"metadata {key}")
            return value if kind != 6 else float(value)
        if kind == STRING:
            return self.string(f"metadata {key}")
        if kind != ARRAY:
            raise self.fail(f"metadata {key} has unknown value type {kind}")
        item = self.u32(f"the item type of metadata {key}")
        count = self.u64(f"the item count of metadata {key}")
        if count > MAX_ARRAY_ITEMS:
            raise self.fail(f"metadata {key} claims an array of {count} items (at most {MAX_ARRAY_ITEMS} are accepted)")
        if item == STRING:
            self.need(8 * count, f"the {count} strings of metadata {key}")  # each at least its length
            return self.strings(count, key)
        if item not in _SCALARS:
            kind_name = "nested arrays" if item == ARRAY else f"unknown item type {item}"
            raise self.fail(f"metadata {key} is an array of {kind_name}")
        width = _SCALARS[item][1]
        self.need(width * count, f"the {count} items of metadata {key}")
        values = np.frombuffer(self.buffer, np.dtype(_SCALARS[item][0]), count, self.at).tolist()
        self.at += width * count
        return values  # Python ints, floats and bools (no view keeps the map open)


class StringArray(Sequence[str]):
    """A metadata array of strings kept as its bytes and where each item starts, each decoded when read:
    a vocabulary costs its bytes until used (2M tokens as Python strings were ~150 MB, a header that is
    then refused included)."""

    def __init__(self, raw: bytes, starts: array, what: str) -> None:
        self._raw, self._starts, self._what = raw, starts, what

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start = self._starts[index]  # IndexError past the end, as a list's
        (size,) = struct.unpack_from("<Q", self._raw, start - 8)
        try:
            return self._raw[start : start + size].decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self._what}: item {index % len(self)} is not UTF-8; not a valid GGUF file") from None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Sequence)
            and len(other) == len(self)
            and all(a == b for a, b in zip(self, other, strict=True))
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, as a list

    def __repr__(self) -> str:
        return f"StringArray({len(self)} items)"


def _tensor_type(code: int, name: str, cursor: _Cursor) -> Any:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(code)
    except ValueError:
        raise cursor.fail(f"tensor {name} has unknown GGML type {code}") from None
    if kind not in GGML_QUANT_SIZES:
        raise cursor.fail(f"tensor {name} has GGML type {kind.name} of unknown block size")
    return kind


class GGUFFile:
    """The metadata (a dict of Python values) and tensor table of one GGUF file, its data memory-mapped.

    Opening parses the header only (mapped: only its pages are touched); `data(name)` reads a tensor's
    bytes ([rows..., bytes per row], as `gguf.quants.dequantize` reads them).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFError(f"{self.path.name}: {size} bytes is too short for a GGUF header; not a valid GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                self._parse(_Cursor(buffer, size, self.path.name))

    def _parse(self, cursor: _Cursor) -> None:
        if cursor.buffer[:4] != MAGIC:
            raise GGUFError(f"{cursor.name} does not start with the GGUF magic bytes; not a GGUF file")
        cursor.at = 4
        version = cursor.u32("the version")
        if version not in VERSIONS:
            raise cursor.fail(f"GGUF version {version} (ortspec reads versions {' and '.join(map(str, VERSIONS))})")
        tensor_count, key_count = cursor.u64("the tensor count"), cursor.u64("the metadata count")
        if tensor_count > MAX_TENSORS or key_count > MAX_KEYS:
            raise cursor.fail(
                f"the header claims {tensor_count} tensors and {key_count} metadata entries "
                f"(at most {MAX_TENSORS} and {MAX_KEYS} are accepted)"
            )
        self.metadata: dict[str, Any] = {}
        for index in range(key_count):
            key = cursor.string(f"metadata key {index}", MAX_KEY_BYTES)
            if key in self.metadata:
                raise cursor.fail(f"metadata {key} appears twice")
            self.metadata[key] = cursor.value(cursor.u32(f"the value type of metadata {key}"), key)
        table = [self._tensor_entry(cursor, index) for index in range(tensor_count)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment is {alignment!r}, not a power of two")
        data_start = -(-cursor.at // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for tensor_name, shape, kind, offset in table:
            if tensor_name in self.tensors:
                raise cursor.fail(f"tensor {tensor_name} appears twice")
            self.tensors[tensor_name] = self._place(cursor, tensor_name, shape, kind, offset, data_start, alignment)

    def _tensor_entry(self, cursor: _Cursor, index: int) -> tuple[str, tuple[int, ...], Any, int]:
        name = cursor.string(f"the name of tensor {index}", MAX_KEY_BYTES)
        n_dims = cursor.u32(f"the dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} are accepted)")
        dims = [cursor.u64(f"dimension {i} of tensor {name}") for i in range(n_dims)]
        if any(d == 0 or d > MAX_ELEMENTS for d in dims) or np.prod(dims, dtype=np.float64) > MAX_ELEMENTS:
            raise cursor.fail(f"tensor {name} has dimensions {dims}")
        kind = _tensor_type(cursor.u32(f"the type of tensor {name}"), name, cursor)
        return name, tuple(reversed(dims)), kind, cursor.u64(f"the offset of tensor {name}")

    def _place(
        self, cursor: _Cursor, name: str, shape: tuple[int, ...], kind: Any, offset: int, data_start: int,
        alignment: int,
    ) -> TensorInfo:  # fmt: skip
        from gguf.constants import GGML_QUANT_SIZES

        block, block_bytes = GGML_QUANT_SIZES[kind]
        if shape[-1] % block:
            raise cursor.fail(f"tensor {name} ({kind.name}) has rows of {shape[-1]}, not a multiple of {block}")
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * block_bytes
        start = data_start + offset
        if offset % alignment or start + nbytes > cursor.size:
            raise cursor.fail(
                f"tensor {name} claims {nbytes} bytes at data offset {offset}, past the end of the file "
                f"or off its {alignment}-byte alignment"
            )
        return TensorInfo(name, shape, kind, start, nbytes)

    def data(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The raw bytes of tensor `name`, [rows..., bytes per row], read from the file (not mapped: mapped
        pages would stay resident as an export goes through the whole file); `rows` (start, stop) reads
        only those along the first axis, so a large table can be read a slice at a time."""
        info = self.tensors[name]
        first = info.shape[0] if len(info.shape) > 1 else 1
        start, stop = rows or (0, first)
        if not 0 <= start <= stop <= first:
            raise ValueError(f"{self.path.name}: tensor {name} of shape {info.shape} has no rows [{start}, {stop})")
        step = info.nbytes // first  # bytes per row of the first axis
        raw = np.fromfile(self.path, np.uint8, (stop - start) * step, offset=info.start + start * step)
        if raw.size != (stop - start) * step:
            raise GGUFError(f"{self.path.name}: tensor {name} was cut short (the file changed while read)")
        if rows is None:
            return raw.reshape(*info.shape[:-1], info.row_bytes)
        return raw.reshape(stop - start, *info.shape[1:-1], info.row_bytes)
