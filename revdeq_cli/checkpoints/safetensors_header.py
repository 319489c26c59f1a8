"""Read a safetensors file's header (tensor names, dtypes, shapes) without loading any tensor.

The format: 8 bytes little-endian u64 `N`, then `N` bytes of JSON
`{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}`,
then the raw tensor bytes; offsets count from the end of the header. Reading the header is exact and
costs one small read, whatever the file's size. Everything is checked against the file's real size so a
truncated or foreign file is refused with one line naming it (`CheckpointError`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from revdeq_cli.errors import CheckpointError

# Bytes per element of each safetensors dtype tag (sub-byte float formats are not written by us).
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

# The torch names users know, for display.
DTYPE_NAMES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it. `dtype` is the torch name ("float32"), `nbytes` exact."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file: tensors in file order, and the free-form metadata."""

    path: Path
    tensors: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    file_bytes: int = 0

    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def dtypes(self) -> dict[str, int]:
        """dtype name -> number of elements stored in it."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return counts


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of `path`; never reads tensor data. Raises `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected a .safetensors weights file)")
    size = path.stat().st_size
    expected = "expected a safetensors file"
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit the file's {size} bytes; "
                                  f"the file is truncated or not a safetensors file ({expected})")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: header is not valid JSON ({expected})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object ({expected})")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object ({expected})")
    data_bytes = size - 8 - n
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        tensors.append(_tensor_info(path, name, entry, data_bytes))
    tensors.sort(key=lambda t: header[t.name]["data_offsets"][0])
    end = max((header[t.name]["data_offsets"][1] for t in tensors), default=0)
    if end != data_bytes:
        raise CheckpointError(f"{path}: tensor data ends at byte {end} but the file holds {data_bytes} "
                              f"data bytes; the file is truncated or corrupt")
    return SafetensorsHeader(path=path, tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()},
                             file_bytes=size)


def _tensor_info(path: Path, name: str, entry: object, data_bytes: int) -> TensorInfo:
    bad = f"{path}: entry {name!r} in the header"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad} is not an object (expected a safetensors file)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{bad} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{bad} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise CheckpointError(f"{bad} has data offsets {offsets!r} outside the file's {data_bytes} data bytes; "
                              f"the file is truncated or corrupt")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{bad} spans {offsets[1] - offsets[0]} bytes but its shape and dtype need {nbytes}")
    return TensorInfo(name=name, dtype=DTYPE_NAMES[dtype], shape=tuple(shape), nbytes=nbytes)
