"""Reading and writing safetensors files, tensor by tensor, with bf16 through ml_dtypes.

The format is an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}} (plus an optional "__metadata__" of strings), then the raw
bytes. Reading memory-maps the file and hands out views, so loading or converting a model never
holds more than the tensors in flight. (The `safetensors` package's numpy backend cannot
represent bfloat16, the dtype every Phi checkpoint is stored in.)

Headers come from strangers, so they are validated as strictly as the `safetensors` library
does (safetensors/src/tensor.rs), and its tests check each refusal against it: a header of at
most 100 MB, valid UTF-8 JSON nested at most 127 levels, no NaN/Infinity literals; each entry a
known dtype, a shape of non-negative integers and two non-negative integer offsets, all within
an unsigned 64-bit range, with element and bit counts computed in Python ints and refused past
2**64 as the library's checked arithmetic does (so [2**32, 2**32] with zero bytes is refused);
bytes exactly dtype size x elements; and the tensors, in offset order, tiling the data section
from its first byte to the file's last, with no gap, overlap or trailing bytes. Every refusal
names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from phi3_jax import textio

# Every dtype the format defines, with its size in bits (the library's Dtype::bitsize).
BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}
# The dtypes a numpy view can show (the sub-byte F4/F6 are packed, so they cannot).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "C64": np.dtype(np.complex64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the library's MAX_HEADER_SIZE
_USIZE = 2**64 - 1  # the library's integers are u64 (usize on 64-bit machines)
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or not what the index says."""


def _parse_int(literal: str) -> Any:
    # serde_json reads "-0" as a float, which no shape or offset accepts; other negative
    # integers are refused by the range checks below.
    return -0.0 if literal == "-0" else int(literal)


def _refuse_constant(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")  # NaN, Infinity: Python accepts them, JSON not


def _is_usize(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _USIZE


def _strings(value: Any) -> Iterator[str]:
    """Every string in a parsed JSON value, keys included (iteratively: no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            yield from item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


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
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{self.path}: header of {n} bytes is larger than the "
                                       f"format's limit of {MAX_HEADER_BYTES}")
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: corrupt or truncated header "
                                       f"(claims {n} bytes, file has {size})")
            blob = f.read(n)
        header = self._parse_header(blob)
        self._start = 8 + n
        data_size = size - self._start
        self.metadata: dict[str, str] = self._check_metadata(header.pop("__metadata__", None))
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            name: self._check_entry(name, entry) for name, entry in header.items()}
        self._check_layout(data_size)
        self._map = (np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._start,
                               shape=(data_size,)) if data_size else np.zeros(0, np.uint8))

    def _parse_header(self, blob: bytes) -> dict[str, Any]:
        where = f"{self.path}: header"
        text = textio.decode_utf8(blob, where, error=SafetensorsError)
        header = textio.parse_json(text, where, error=SafetensorsError,
                                   parse_int=_parse_int, parse_constant=_refuse_constant)
        if not isinstance(header, dict):
            raise SafetensorsError(f"{where} is {textio.json_type(header)}, not a JSON object")
        if _LONE_SURROGATE_ESCAPE.search(text):  # JSON allows "\ud800"; UTF-8 (and serde) not
            for string in _strings(header):
                textio.check_utf8(string, f"{where} string {string!r:.60}",
                                  error=SafetensorsError)
        return header

    def _check_metadata(self, metadata: Any) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(
                isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(f"{self.path}: header's __metadata__ must map strings to "
                                   f"strings, got {metadata!r:.200}")
        return metadata

    def _check_entry(self, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
        def bad(why: str) -> SafetensorsError:
            return SafetensorsError(f"{self.path}: header entry for tensor {name!r}: {why}")

        if not isinstance(entry, dict):
            raise bad(f"expected an object, got {textio.json_type(entry)}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise bad(f"no {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in BITS:
            raise bad(f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_usize(d) for d in shape):
            raise bad(f"shape {shape!r:.200} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_usize(o) for o in offsets)):
            raise bad(f"data_offsets {offsets!r:.200} is not two non-negative integers")
        elements = 1
        for d in shape:  # checked arithmetic, as the library's
            elements *= d
            if elements > _USIZE:
                raise bad(f"shape {shape} has more elements than 2**64")
        bits = elements * BITS[dtype]
        if bits > _USIZE:
            raise bad(f"shape {shape} of {dtype} overflows 2**64 bits")
        if bits % 8:
            raise bad(f"shape {shape} of {dtype} is not a whole number of bytes")
        begin, end = offsets
        if end < begin or end - begin != bits // 8:
            raise bad(f"{end - begin} bytes for shape {shape} {dtype} ({bits // 8} expected)")
        return dtype, tuple(shape), begin, end

    def _check_layout(self, data_size: int) -> None:
        """The tensors, in offset order, must tile the data section exactly."""
        at = 0
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda e: e[1][2:]):
            if begin != at:
                what = "overlaps the tensor before it" if begin < at else "leaves a gap before it"
                raise SafetensorsError(f"{self.path}: tensor {name!r} starts at data byte "
                                       f"{begin}, but the tensors before it end at {at}: it "
                                       f"{what}")
            if end > data_size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                       f"{end} of a {data_size}-byte data section")
            at = end
        if at != data_size:
            raise SafetensorsError(f"{self.path}: {data_size - at} bytes after the last tensor "
                                   f"(tensors cover {at} of {data_size} data bytes)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._numpy_dtype(name)

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def dtype_name(self, name: str) -> str:
        """The tensor's dtype as the header names it ("BF16", "F4", ...)."""
        return self._entries[name][0]

    def _numpy_dtype(self, name: str) -> np.dtype:
        dtype = self._entries[name][0]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is {dtype}, a packed "
                                   f"sub-byte dtype that cannot be read as a numpy array")
        return DTYPES[dtype]

    def __getitem__(self, name: str) -> np.ndarray:
        _, shape, begin, end = self._entries[name]
        return self._map[begin:end].view(self._numpy_dtype(name)).reshape(shape)

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
        nbytes = math.prod(array.shape) * dtype.itemsize
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
