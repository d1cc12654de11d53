"""phi3-jax Orbax checkpoints: the folder layout, a streaming parameter writer, a sharded loader.

A checkpoint folder (made by `phi3-jax convert`) holds:

    phi3_jax.json   the metadata record (format, source, dtype, versions, tensor count, and
                    for a quantized checkpoint its "quantization": scheme, group_size,
                    embeddings; phi3_jax.quantize), with
                    the size and sha256 of every other file of the folder (phi3_jax.checksums)
                    and a digest of the record itself. It is written last, so a folder that has
                    it is complete; `is_orbax_checkpoint` looks for it, and `verify_checkpoint`
                    checks every file against it before anything is restored.
    config.json, generation_config.json, tokenizer files   as in the Hugging Face folder
    params/         an Orbax PyTree checkpoint (OCDBT, zstd, chunks of <= 16 MiB) holding every
                    parameter in our layout, named by its path in the model
                    ("model.layers.0.self_attn.qkv_proj.weight"), so stock Orbax restores it.

Writing streams. Orbax serializes all the leaves of a tree together, so a tree of arrays would
hold the whole model in memory. Our leaves are `LazyTensor`s instead: a type handler builds each
array only when its turn comes, writes it with Orbax's own numpy writer (so the files are exactly
what an np.ndarray leaf produces), waits for the write and drops the array before the next.

Loading restores every array straight into its target sharding and dtype: each device reads only
the chunks of its own slice; nothing is assembled on one device first.

Every orbax call for model checkpoints lives in this module: its API moves between releases
(0.12.4 and 0.12.8 are both in use), and the one private method we rely on is named below.
(Training-state checkpoints use orbax's stable CheckpointManager in phi3_jax/train/checkpoint.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from phi3_jax import checksums

if TYPE_CHECKING:
    import jax

MARKER = "phi3_jax.json"
PARAMS_DIR = "params"
FORMAT = "phi3-jax-orbax"
FORMAT_VERSION = 1
# Small enough that a device restoring a slice reads little beyond it, and that zstd runs on
# several chunks of one tensor in parallel; large enough to keep the chunk count low.
CHUNK_BYTES = 16 * 2**20

Path = tuple[str | int, ...]

log = logging.getLogger(__name__)


class OrbaxCheckpointError(ValueError):
    """A folder that is not a (complete, supported) phi3-jax Orbax checkpoint."""


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata record of a checkpoint folder, checked for format and version."""
    file = os.path.join(path, MARKER)
    if not os.path.isfile(file):
        raise OrbaxCheckpointError(f"{path} is not a phi3-jax Orbax checkpoint (no {MARKER}; "
                                   f"make one with `phi3-jax convert`)")
    try:
        with open(file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise OrbaxCheckpointError(f"{file} is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OrbaxCheckpointError(f"{file}: format is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise OrbaxCheckpointError(f"{file}: format_version {meta.get('format_version')!r} is "
                                   f"not supported (this phi3-jax reads {FORMAT_VERSION})")
    return meta


def write_metadata(folder: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes the metadata record into a finished checkpoint folder, with the checksums of every
    other file in it and the digest of the record itself; returns the record written."""
    meta = {**meta, "checksums": checksums.record(folder, skip=lambda rel: rel == MARKER)}
    meta["record_sha256"] = checksums.json_digest(meta)
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def verify_checkpoint(path: str | os.PathLike, meta: dict[str, Any] | None = None,
                      cancelled: threading.Event | None = None) -> dict[str, Any]:
    """Checks every file of the checkpoint against the checksums in its metadata record (read
    here unless given), before anything is restored; raises OrbaxCheckpointError naming the
    checkpoint and the file. Returns the metadata record.

    A checkpoint written before phi3-jax recorded checksums has none: it loads unverified, with
    a warning (convert it again to add them)."""
    path = os.fspath(path)
    if meta is None:
        meta = read_metadata(path)
    if "checksums" not in meta:
        log.warning("%s has no checksums (written by an older phi3-jax): loading it unverified; "
                    "`phi3-jax convert` it again to add them", path)
        return meta
    content = {k: v for k, v in meta.items() if k != "record_sha256"}
    if meta.get("record_sha256") != checksums.json_digest(content):
        raise OrbaxCheckpointError(f"checkpoint {path} is corrupt: {MARKER} does not match its "
                                   f"own digest")
    try:
        checksums.verify(path, meta["checksums"], f"checkpoint {path}", cancelled)
    except checksums.ChecksumError as e:
        raise OrbaxCheckpointError(str(e)) from None
    return meta


@contextlib.contextmanager
def verifying(path: str | os.PathLike, meta: dict[str, Any]) -> Iterator[None]:
    """verify_checkpoint, in a background thread while the block restores (reading the same
    files, so the page cache serves the second reader): the block's work stands only once the
    checkpoint has verified. A checksum failure is raised in preference to the error damaged
    files may have caused in the block; an interrupted block stops the verification."""
    if "checksums" not in meta:
        verify_checkpoint(path, meta)  # the warning, now
        yield
        return
    cancelled = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        verification = pool.submit(verify_checkpoint, path, meta, cancelled)
        try:
            yield
        except Exception:
            if verification.exception() is not None:
                raise verification.exception() from None
            raise
        except BaseException:
            cancelled.set()
            raise
        verification.result()


def stored_quantization(meta: dict[str, Any]) -> Any:
    """The phi3_jax.quantize.Quantization a checkpoint's weights were stored in, or None."""
    from phi3_jax.quantize import Quantization

    record = meta.get("quantization")
    return None if record is None else Quantization.from_json(record)


def orbax_version() -> str:
    import orbax.checkpoint as ocp

    return ocp.__version__


def param_name(path: Path) -> str:
    """The name Orbax stores a parameter under: its path joined with dots."""
    return ".".join(map(str, path))


@dataclasses.dataclass
class LazyTensor:
    """A leaf whose array is built only when the writer reaches it, then dropped.

    `produce` returns the array (any layout; it is made C-contiguous); `written` is called once
    its bytes are on disk (to release source pages, advance a progress bar). Tensors are written
    in increasing `order`, so a source can be read front to back.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]
    order: int = 0
    written: Callable[[], None] | None = None

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def materialize(self) -> np.ndarray:
        array = contiguous(self.produce())
        if array.shape != self.shape or array.dtype != self.dtype:
            raise ValueError(f"produced {array.shape} {array.dtype}, declared {self.shape} "
                             f"{self.dtype}")
        return array


def contiguous(x: np.ndarray, block: int = 16) -> np.ndarray:
    """A C-contiguous copy of a transposed view, a few times faster than np.ascontiguousarray.

    Every layout change between checkpoint and model is a 2-D transpose once adjacent axes are
    merged. numpy fills the destination row by row, reading one element from each source row in
    turn; `block` columns at a time keep the source rows in flight few enough to stay in cache.
    """
    x = np.asarray(x)
    if x.flags.c_contiguous:
        return x
    out = np.empty(x.shape, x.dtype)
    shape, strides = _merged_axes(x.shape, x.strides)
    if len(shape) != 2 or strides[0] != x.itemsize:
        out[...] = x  # not a plain transpose: numpy's own order
        return out
    source = np.lib.stride_tricks.as_strided(x, shape, strides, writeable=False)
    target = out.reshape(shape)
    for j in range(0, shape[1], block):
        target[:, j:j + block] = source[:, j:j + block]
    return out


def _merged_axes(shape: tuple[int, ...], strides: tuple[int, ...],
                 ) -> tuple[list[int], list[int]]:
    """The same view with size-1 axes dropped and adjacent axes merged where memory allows."""
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    return [n for n, _ in merged], [s for _, s in merged]


class _Done:
    """A future that is already complete (the streaming handler writes before returning)."""

    def result(self, timeout: float | None = None) -> None:
        return None

    def cancel(self) -> None:
        return None


@functools.cache
def _streaming_handler_class() -> type:
    import orbax.checkpoint as ocp

    class StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
        """Writes LazyTensor leaves one at a time, in the np.ndarray on-disk format."""

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            order = sorted(range(len(values)), key=lambda i: values[i].order)
            # One tensor is built (on a worker thread: numpy copies release the GIL) while the
            # previous one is compressed and written by TensorStore's threads.
            with concurrent.futures.ThreadPoolExecutor(1) as worker:
                pending = worker.submit(values[order[0]].materialize) if order else None
                for k, i in enumerate(order):
                    array = await asyncio.wrap_future(pending)
                    pending = (worker.submit(values[order[k + 1]].materialize)
                               if k + 1 < len(order) else None)
                    # NumpyHandler.serialize would deep-copy every value up front (0.12.4
                    # always does): the whole model. Its write coroutine takes them one by one.
                    # Private, but the same in 0.12.4 and 0.12.8.
                    await self._background_serialize([array], [infos[i]], [args[i]])
                    del array
                    if values[i].written is not None:
                        values[i].written()
            return [_Done()]

    return StreamingNumpyHandler


def _nest(flat: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def _flatten(tree: Mapping, paths: Iterable[Path]) -> dict[Path, Any]:
    out = {}
    for path in paths:
        node = tree
        for key in path:
            node = node[str(key)]
        out[path] = node
    return out


def save_params(directory: str | os.PathLike, tensors: Mapping[Path, LazyTensor]) -> None:
    """Writes the tensors as an Orbax PyTree checkpoint at `directory` (which must not exist),
    holding at most one of them in memory at a time."""
    import jax
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (LazyTensor, _streaming_handler_class()()),
        # Unused here, but without it Orbax warns that array metadata is disabled.
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=True,
                                          use_compression=True)
    save_args = {p: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for p in tensors}
    checkpointer = ocp.Checkpointer(handler)
    try:
        checkpointer.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(
            _nest(tensors), save_args=_nest(save_args)))
    finally:
        checkpointer.close()


def restore_params(directory: str | os.PathLike,
                   targets: Mapping[Path, tuple[tuple[int, ...], Any, jax.sharding.Sharding]],
                   ) -> dict[Path, jax.Array]:
    """Restores every parameter as a jax.Array in the given (shape, dtype, sharding).

    Each device reads only its own slice (converted to `dtype` as it is read); the checkpoint
    must hold exactly these parameters.
    """
    import orbax.checkpoint as ocp

    item = {p: _abstract(shape, dtype) for p, (shape, dtype, _) in targets.items()}
    args = {p: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(shape), dtype=dtype)
            for p, (shape, dtype, sharding) in targets.items()}
    restored = _restore(directory, item, args, partial=False)
    return _flatten(restored, targets)


def restore_host(directory: str | os.PathLike, paths: Sequence[Path],
                 shapes: Mapping[Path, tuple[int, ...]], dtype: Any) -> dict[Path, np.ndarray]:
    """Restores some parameters as host numpy arrays in their stored dtype (for export)."""
    import orbax.checkpoint as ocp

    item = {p: _abstract(shapes[p], dtype) for p in paths}
    args = {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths}
    restored = _restore(directory, item, args, partial=True)
    out = _flatten(restored, paths)
    for p, array in out.items():
        if tuple(array.shape) != tuple(shapes[p]):
            raise OrbaxCheckpointError(f"{directory}: parameter {param_name(p)} has shape "
                                       f"{list(array.shape)}; config.json implies "
                                       f"{list(shapes[p])}")
    return out


def _abstract(shape: tuple[int, ...], dtype: Any) -> Any:
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _restore(directory, item: dict, args: dict, partial: bool) -> dict:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise OrbaxCheckpointError(f"{directory} is missing: the checkpoint is incomplete")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        kwargs = {"partial_restore": True} if partial else {}
        return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=_nest(item), restore_args=_nest(args), **kwargs))
    except Exception as e:
        unreadable = storage_error(e)
        if unreadable is not None:  # TensorStore's error comes wrapped in a dump of its spec
            raise OrbaxCheckpointError(f"{directory}: cannot read the checkpoint (a file is "
                                       f"damaged or truncated): {unreadable}") from None
        if not isinstance(e, KeyError | ValueError):
            raise
        # Orbax reports a tree or shape mismatch deep in its own terms; name the checkpoint.
        raise OrbaxCheckpointError(f"{directory}: the stored parameters do not match "
                                   f"config.json: {e}") from e
    finally:
        checkpointer.close()


# TensorStore's errors start with an absl status code ("OUT_OF_RANGE: Error reading ...").
_STATUS = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|"
                     r"UNKNOWN|INTERNAL): ")


def storage_error(error: BaseException) -> str | None:
    """The first line of the TensorStore read error behind `error` (Orbax wraps it), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        message = str(error)
        if _STATUS.match(message):
            line = message.splitlines()[0]
            return line if len(line) <= 300 else line[:297] + "..."
        error = error.__cause__ or error.__context__
    return None

