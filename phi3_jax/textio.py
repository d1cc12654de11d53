"""Reading outside text (checkpoint JSON files, JSONL lines, stdin, arguments) with errors that
say where the fault is.

Python's own errors name neither file nor line (`'utf-8' codec can't decode byte 0xff in
position 8190`), and a deeply nested JSON value raises RecursionError. Everything here turns
such input into one ValueError (or the caller's subclass) naming the file, the line and the
byte, so the command line reports it in one line.
"""

from __future__ import annotations

import json
import os
import re
from typing import IO, Any

import numpy as np

# serde_json's nesting limit, which the `safetensors` library applies to headers (128 levels
# are refused). No checkpoint file, config or training record comes anywhere near it; the bound
# keeps recursive code (the JSON parser, templates, validators) away from Python's stack limit.
MAX_JSON_DEPTH = 127

_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON string (valid JSON only: run after a successful parse) and anything but a bracket.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def decode_utf8(data: bytes, where: str, *, error: type[Exception] = ValueError,
                first_line: int = 1, base_offset: int = 0) -> str:
    """`data` decoded as UTF-8; invalid bytes raise `error` naming `where`, the line and column
    (counted from `first_line`) and the byte's offset (from `base_offset`, e.g. where a line
    starts in its file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - data.rfind(b"\n", 0, e.start)  # 1-based, in bytes
        raise error(f"{where} line {line}, column {column}: not valid UTF-8 (byte "
                    f"0x{data[e.start]:02x} at offset {base_offset + e.start})") from None


def check_utf8(text: str, what: str, *, error: type[Exception] = ValueError) -> str:
    """Returns `text` if it is valid Unicode. Text that arrived as undecodable bytes (command-line
    arguments, and streams read with errors="surrogateescape", keep them as surrogate escapes
    U+DC80..U+DCFF) or holds a lone surrogate raises `error` naming `what` and the byte."""
    match = _SURROGATE.search(text)
    if match is None:
        return text
    char = ord(match.group())
    at = len(text[:match.start()].encode("utf-8", "surrogateescape"))
    if 0xDC80 <= char <= 0xDCFF:
        raise error(f"{what} is not valid UTF-8 (byte 0x{char - 0xDC00:02x} at offset {at})")
    raise error(f"{what} holds a lone surrogate U+{char:04X} at offset {at}, which is not text")


def check_utf8_arguments(args: Any, *names: str) -> None:
    """Refuses text options (attributes `names` of an argparse namespace: a string, a list of
    them, or None) that are not UTF-8. Python keeps undecodable bytes of argv as surrogate
    escapes, which no tokenizer can encode; the error names the option (`--name`)."""
    for name in names:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str):
                check_utf8(value, f"--{name.replace('_', '-')}")


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for kind, name in ((dict, "an object"), (list, "an array"), (str, "a string"),
                       (int, "a number"), (float, "a number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in valid JSON `text` (0 for a scalar)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(text: str, where: str, *, error: type[Exception] = ValueError,
               max_depth: int = MAX_JSON_DEPTH, **loads_kwargs: Any) -> Any:
    """json.loads(text) with every failure (syntax, nesting deeper than `max_depth`, a number
    Python refuses to parse) raised as `error` naming `where`."""
    too_deep = f"{where}: JSON nested more than {max_depth} levels deep"
    try:
        value = json.loads(text, **loads_kwargs)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column "
                    f"{e.colno})") from None
    except RecursionError:
        raise error(too_deep) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits, or a hook's refusal
        raise error(f"{where}: not valid JSON ({e})") from None
    # Counting brackets first keeps the exact measure off every shallow file and line.
    if text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise error(too_deep)
    return value


def read_json_file(path: str | os.PathLike, *, error: type[Exception] = ValueError,
                   expect: type | None = dict) -> Any:
    """The JSON value in file `path` (UTF-8, an optional BOM), checked to be an `expect` (an
    object by default); every fault raises `error` naming the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    text = decode_utf8(data, path, error=error).removeprefix("\ufeff")
    value = parse_json(text, path, error=error)
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                    f"got {json_type(value)}")
    return value


class LineReader:
    """Reads lines from a stream, one at a time, decoding them itself: a line that is not valid
    UTF-8 raises ValueError naming the stream and line, and the next call reads on. (A text
    stream's own decoder fails once for a whole buffer, with neither line nor way to go on.)"""

    def __init__(self, stream: IO, name: str):
        self._stream = getattr(stream, "buffer", stream)  # the bytes under a text stream
        self.name = name
        self.line = 0
        self._offset = 0

    def readline(self) -> str:
        """The next line (with its newline), or "" at the end of the stream."""
        raw = self._stream.readline()
        if not raw:
            return ""
        self.line += 1
        offset, self._offset = self._offset, self._offset + len(raw)
        if isinstance(raw, str):  # a text stream with no bytes below (e.g. io.StringIO)
            return check_utf8(raw, f"{self.name} line {self.line}")
        return decode_utf8(raw, self.name, first_line=self.line, base_offset=offset)
