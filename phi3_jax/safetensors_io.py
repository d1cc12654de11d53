"""Reading and writing safetensors files, tensor by tensor, with bf16 through ml_dtypes.

The format is an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw bytes. Reading memory-maps the file and hands
out views, so loading or converting a model never holds more than the tensors in flight; every
header entry is checked against the file's size first, so a truncated or corrupt file is
reported by name instead of failing deep inside numpy. (The `safetensors` package's numpy
backend cannot represent bfloat16, the dtype every Phi checkpoint is stored in.)
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or not what the index says."""


class SafetensorsFile:
    """A memory-mapped safetensors file; `file[name]` is a read-only numpy view."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise SafetensorsError(f"{self.path}: corrupt or truncated header "
                                       f"(claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt header ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_size = size - self._start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise SafetensorsError(f"{self.path}: corrupt header entry for tensor {name!r} "
                                       f"({e!r})") from e
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes "
                                       f"for shape {shape} {entry['dtype']} ({expected} expected)")
            if end > data_size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                       f"{end} of a {data_size}-byte data section")
            self._entries[name] = (dtype, shape, begin, end)
        self._map = (np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._start,
                               shape=(data_size,)) if data_size else np.zeros(0, np.uint8))

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        return self._map[begin:end].view(dtype).reshape(shape)

    def release(self) -> None:
        """Drops the file's mapped pages from this process's resident set. They stay in the page
        cache (touching them faults them back in), but streaming a model through the map no
        longer shows its whole size as this process's memory."""
        base = self._map
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None)
        if base is not None and hasattr(mmap, "MADV_DONTNEED"):
            base.madvise(mmap.MADV_DONTNEED)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterator,
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes tensors (a mapping or (name, array) pairs) to path; returns the bytes written.

    Tensors are written one after another in the order given, so a caller may pass lazily
    produced arrays. The header needs every shape up front, hence the list of pairs.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, array in items:
        dtype = np.dtype(array.dtype)
        if dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in items:
            # A uint8 view writes through the buffer protocol without a copy (bf16 has no
            # buffer format of its own).
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return 8 + len(blob) + offset
