"""File checksums for the checkpoints phi3-jax writes, verified before anything is restored.

A record lists every file of a checkpoint folder at the moment the write completes: its size
and the sha256 of each 256 MiB block of it (a file up to 256 MiB has one, its own sha256).
Verifying re-reads every file once, streaming (a 1 MiB buffer per thread, never a whole file in
memory), blocks of all files in parallel threads (hashlib and file reads release the GIL; an
Orbax training checkpoint is mostly one multi-GB file, so files alone would not parallelise).
Sizes are compared first, so a truncated file is reported before any hashing. Orbax's and
TensorStore's own formats check almost nothing: a flipped byte in an array chunk restores
silently.

Why sha256: measured at 1.0 GB/s per core on this project's CI machine (AMD EPYC with SHA-NI),
against 1.4 GB/s for zlib's crc32, 0.6 for blake2b and 0.5 for md5: a faster checksum would
save little, and none ships with our dependencies. A file up to a block can be checked by hand
with `sha256sum`.
Why files: the files are what gets damaged (copies, disks, truncated downloads); one record
covers the arrays, Orbax's metadata and the config and tokenizer files alike, whatever Orbax's
layout. The price is a full read of the checkpoint on load (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import posixpath
import threading
from collections.abc import Callable, Mapping
from typing import Any

ALGORITHM = "sha256"
BLOCK_BYTES = 2**28
# Enough threads to keep a fast disk or the page cache busy; each holds one 1 MiB buffer.
WORKERS = min(8, os.cpu_count() or 1)
_BUFFER = 2**20


class ChecksumError(ValueError):
    """A file of a checkpoint is missing, truncated, or not the bytes that were written."""


def record(root: str | os.PathLike, skip: Callable[[str], bool] = lambda rel: False,
           ) -> dict[str, Any]:
    """{"algorithm": "sha256", "block_bytes": 2**28, "files": {relative path: {"bytes": n,
    "sha256": [hex per block]}}} for every regular file under `root` whose relative path
    `skip` does not select."""
    root = os.fspath(root)
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if not skip(rel):
                paths.append(rel)
    sizes = {rel: os.path.getsize(os.path.join(root, rel)) for rel in paths}
    digests = _digests(root, sizes)
    return {"algorithm": ALGORITHM, "block_bytes": BLOCK_BYTES,
            "files": {rel: {"bytes": sizes[rel], ALGORITHM: digests[rel]} for rel in paths}}


def verify(root: str | os.PathLike, checksums: Any, name: str,
           cancelled: threading.Event | None = None) -> None:
    """Raises ChecksumError, naming `name` (the checkpoint) and the first bad files, unless
    every file in the record exists under `root` with its recorded size and digests. Setting
    `cancelled` stops it between blocks (it then returns)."""
    root = os.fspath(root)
    files = _files(checksums, name)
    problems = []
    for rel, entry in files.items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != entry["bytes"]:
            size = os.path.getsize(path)
            problems.append(f"{rel} has {size} bytes, {entry['bytes']} were written"
                            + (" (truncated)" if size < entry["bytes"] else ""))
    if not problems:
        digests = _digests(root, {rel: e["bytes"] for rel, e in files.items()}, cancelled)
        problems = [f"{rel} does not match its {ALGORITHM} (the file changed after it was "
                    f"written)" for rel, entry in files.items()
                    if rel in digests and digests[rel] != entry[ALGORITHM]]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ChecksumError(f"{name} is corrupt: {problems[0]}{more}")


def json_digest(value: Mapping[str, Any]) -> str:
    """The digest of a JSON record's content (key order and whitespace aside)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.new(ALGORITHM, text.encode()).hexdigest()


def _files(checksums: Any, name: str) -> dict[str, dict[str, Any]]:
    """The record's files, checked for shape: a record may come from a stranger's folder."""
    if (not isinstance(checksums, dict) or checksums.get("algorithm") != ALGORITHM
            or checksums.get("block_bytes") != BLOCK_BYTES
            or not isinstance(checksums.get("files"), dict)):
        raise ChecksumError(f"{name} is corrupt: its checksum record is malformed or of an "
                            f"unknown kind")
    files = checksums["files"]
    for rel, entry in files.items():
        inside = (isinstance(rel, str) and rel and not posixpath.isabs(rel)
                  and posixpath.normpath(rel) == rel and not rel.startswith(".."))
        well_formed = (isinstance(entry, dict) and type(entry.get("bytes")) is int
                       and entry["bytes"] >= 0 and isinstance(entry.get(ALGORITHM), list)
                       and len(entry[ALGORITHM]) == _blocks(entry["bytes"]))
        if not (inside and well_formed):
            raise ChecksumError(f"{name} is corrupt: bad checksum entry {rel!r}")
    return files


def _blocks(size: int) -> int:
    return max(1, -(-size // BLOCK_BYTES))


def _digests(root: str, sizes: Mapping[str, int],
             cancelled: threading.Event | None = None) -> dict[str, list[str]]:
    """{path: [digest per block]}, for the paths whose blocks were all reached before
    `cancelled` was set."""
    # Largest first, so that one big file does not start last and run alone.
    tasks = sorted(((rel, k) for rel, size in sizes.items() for k in range(_blocks(size))),
                   key=lambda task: -sizes[task[0]])

    def digest(task: tuple[str, int]) -> str | None:
        if cancelled is not None and cancelled.is_set():
            return None
        rel, k = task
        return _block_digest(os.path.join(root, rel), k * BLOCK_BYTES,
                             min(BLOCK_BYTES, sizes[rel] - k * BLOCK_BYTES))

    with concurrent.futures.ThreadPoolExecutor(max(1, min(WORKERS, len(tasks)))) as pool:
        found = dict(zip(tasks, pool.map(digest, tasks), strict=True))
    out: dict[str, list[str]] = {}
    for rel, size in sizes.items():
        blocks = [found[rel, k] for k in range(_blocks(size))]
        if None not in blocks:
            out[rel] = blocks
    return out


def _block_digest(path: str, offset: int, length: int) -> str:
    """sha256 of `length` bytes of the file from `offset` (fewer if the file is shorter)."""
    h = hashlib.new(ALGORITHM)
    buffer = memoryview(bytearray(min(_BUFFER, max(length, 1))))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(buffer[:min(len(buffer), length)])
            if not n:
                break
            h.update(buffer[:n])
            length -= n
    return h.hexdigest()
