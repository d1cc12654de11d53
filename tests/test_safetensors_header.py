"""The safetensors header is validated as strictly as the `safetensors` library validates it.

Every malformed header built here is refused by phi3_jax's reader AND by the library (its own
refusal is asserted, so a case the reference accepts cannot sneak in as "malformed"); every valid
one is accepted by both, with the same tensors.
"""

import json
import re
import struct

import numpy as np
import pytest
import safetensors

from phi3_jax.safetensors_io import MAX_HEADER_BYTES, SafetensorsError, SafetensorsFile


def blob(header, data: bytes = b"", *, raw: bytes | None = None, pad: bool = True) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(name="a", shape=(2,), begin=0, **extra):
    n = int(np.prod(shape)) * 4
    return {name: {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n],
                   **extra}}


def library_refuses(path) -> bool:
    try:
        with safetensors.safe_open(str(path), "numpy") as f:
            list(f.keys())
    except safetensors.SafetensorError:
        return True
    return False


DEEP = 126  # extra nesting inside a tensor entry: 2 + 126 = 128 levels, one past the limit

MALFORMED = {
    # the three
    "overlapping offsets": ({**f32("a"), **f32("b")}, bytes(8), "overlaps the tensor before it"),
    "negative dimension": ({"a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}},
                           b"", "not a list of non-negative integers"),
    "shape overflowing int64": ({"a": {"dtype": "F32", "shape": [2**32, 2**32],
                                       "data_offsets": [0, 0]}}, b"", "more elements than 2**64"),
    # offsets and sizes
    "gap before a tensor": (f32("a", (1,), begin=4), bytes(8), "leaves a gap before it"),
    "overflow despite a zero dim": ({"a": {"dtype": "F32", "shape": [2**32, 2**32, 0],
                                           "data_offsets": [0, 0]}}, b"", "more elements"),
    "bits overflow": ({"a": {"dtype": "F64", "shape": [2**62], "data_offsets": [0, 0]}}, b"",
                      "overflows 2**64 bits"),
    "dim past u64": ({"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 0]}}, b"",
                     "non-negative integers"),
    "size not dtype x elements": ({"a": {"dtype": "F32", "shape": [3],
                                         "data_offsets": [0, 8]}}, bytes(8), "(12 expected)"),
    "end before begin": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}},
                         bytes(8), "(0 expected)"),
    "trailing bytes": (f32("a", (1,)), bytes(8), "4 bytes after the last tensor"),
    "data section too short": (f32("a", (2,)), bytes(4), "truncated"),
    "zero-size tensor past the end": ({**f32("a", (1,)), "b": {
        "dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}, bytes(4), "leaves a gap"),
    "sub-byte dtype, odd count": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}},
                                  bytes(1), "not a whole number of bytes"),
    "negative offset": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [-4, -4]}}, b"",
                        "not two non-negative integers"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}},
                      bytes(4), "not two non-negative integers"),
    # types
    "float dim": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8),
                  "non-negative integers"),
    "bool dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4),
                 "non-negative integers"),
    "string dim": ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, bytes(8),
                   "non-negative integers"),
    "float offset": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}},
                     bytes(4), "not two non-negative integers"),
    "null shape": ({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 4]}}, bytes(4),
                   "non-negative integers"),
    "unknown dtype": ({"a": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, bytes(4),
                      "unknown dtype 'F31'"),
    "missing data_offsets": ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4),
                             "no 'data_offsets'"),
    "entry not an object": ({"a": [1]}, b"", "expected an object, got an array"),
    "header not an object": ([1], b"", "not a JSON object"),
    "metadata value not a string": ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map"),
    "metadata a string": ({"__metadata__": "x"}, b"", "__metadata__ must map"),
}

RAW_MALFORMED = {
    "invalid UTF-8": (b'{"\xff":1}', b"", "not valid UTF-8 (byte 0xff at offset 2)"),
    "lone surrogate in a name": (b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                                 bytes(4), "lone surrogate U+D800"),
    "minus zero dim": (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"",
                       "non-negative integers"),
    "NaN literal": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":NaN}}', bytes(4),
                    "not valid JSON (NaN is not JSON)"),
    "trailing characters": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x',
                            bytes(4), "not valid JSON (Extra data"),
    "empty header": (b"", b"", "not valid JSON (Expecting value"),
    "nested 128 levels": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":'
                          + b"[" * DEEP + b"]" * DEEP + b"}}", bytes(4),
                          "nested more than 127 levels"),
    "nested 100000 levels": (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"",
                             "nested more than 127 levels"),
}

VALID = {
    "one tensor": (f32("a", (2,)), np.arange(2, dtype=np.float32).tobytes()),
    "no tensors": ({}, b""),
    "listed out of offset order": ({**f32("b", (1,), begin=4), **f32("a", (1,))},
                                   np.arange(2, dtype=np.float32).tobytes()),
    "zero-size tensors": ({"z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
                           **f32("a", (1,)), "e": {"dtype": "I8", "shape": [0],
                                                  "data_offsets": [4, 4]}},
                          np.ones(1, np.float32).tobytes()),
    "scalar": ({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
               np.float32(7).tobytes()),
    "extra keys and null metadata": ({"__metadata__": None, **f32("a", (1,), note=[[1]])},
                                     np.ones(1, np.float32).tobytes()),
    "metadata": ({"__metadata__": {"format": "pt"}, **f32("a", (1,))},
                 np.ones(1, np.float32).tobytes()),
    "other dtypes": ({"u": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]},
                      "c": {"dtype": "C64", "shape": [1], "data_offsets": [4, 12]},
                      "q": {"dtype": "F4", "shape": [2], "data_offsets": [12, 13]}}, bytes(13)),
    "nested 127 levels": (None, bytes(4)),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_header_refused_by_both(tmp_path, case):
    header, data, message = MALFORMED[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob(header, data))
    assert library_refuses(path)
    with pytest.raises(SafetensorsError, match=rf"^{path}: .*{re.escape(message)}"):
        SafetensorsFile(path)


@pytest.mark.parametrize("case", RAW_MALFORMED)
def test_malformed_header_text_refused_by_both(tmp_path, case):
    raw, data, message = RAW_MALFORMED[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob(None, data, raw=raw, pad=False))
    assert library_refuses(path)
    with pytest.raises(SafetensorsError, match=rf"^{path}: header.*{re.escape(message)}"):
        SafetensorsFile(path)


@pytest.mark.parametrize("case", VALID)
def test_valid_header_accepted_by_both(tmp_path, case):
    header, data = VALID[case]
    path = tmp_path / "x.safetensors"
    if header is None:  # 2 + 125 = 127 levels: the deepest the library takes
        raw = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":'
               + b"[" * 125 + b"]" * 125 + b"}}")
        path.write_bytes(blob(None, data, raw=raw))
    else:
        path.write_bytes(blob(header, data, pad=case != "one tensor"))  # unpadded is valid too
    ours = SafetensorsFile(path)
    with safetensors.safe_open(str(path), "numpy") as theirs:
        names = theirs.keys()
        assert sorted(ours.keys()) == sorted(names)
        for name in names:
            if ours.dtype_name(name) in ("F4", "U16", "C64"):
                continue  # the numpy backend reads none of these
            np.testing.assert_array_equal(ours[name], theirs.get_tensor(name))
            assert ours[name].dtype == theirs.get_tensor(name).dtype


def test_unreadable_dtype_is_named_on_access(tmp_path):
    header, data = VALID["other dtypes"]
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob(header, data))
    st = SafetensorsFile(path)
    assert st["u"].dtype == np.uint16 and st["c"].dtype == np.complex64
    with pytest.raises(SafetensorsError, match="tensor 'q' is F4, a packed sub-byte dtype"):
        st["q"]


def test_header_size_limit_is_the_librarys(tmp_path):
    """A header over 100,000,000 bytes is refused before it is read; exactly 100,000,000 gets to
    the JSON parser in both (sparse files: nothing is written)."""
    for n, message in ((MAX_HEADER_BYTES + 1, "larger than the format's limit of 100000000"),
                       (MAX_HEADER_BYTES, "not valid JSON")):
        path = tmp_path / f"big{n}.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", n) + b"{}")
            f.truncate(8 + n + 8)
        assert library_refuses(path)
        with pytest.raises(SafetensorsError, match=message):
            SafetensorsFile(path)
