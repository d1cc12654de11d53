"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Tensor parallelism is Megatron-style over the `model` mesh axis: attention by whole KV-head
groups (the fused qkv weight [D, K, G+2, H] on K, o_proj [N, H, D] on N), the MLP by its hidden
width F (gate_up [D, 2, F] and down [F, D] on F); the embedding and head [V, D] are
vocab-parallel; the batch is data-parallel over `data`. Everything else is replicated.

Decisions are made once per model, per logical axis, so every tensor carrying that axis agrees:
- An axis whose size the mesh axis does not divide is kept whole (replicated), in every tensor
  at once: Phi-3-medium's and Phi-4's 10 KV heads on model=4 or 8 replicate attention while
  the MLP and vocab stay split. Correct, just not split; `check_mesh_fits(strict=True)` refuses
  it instead, and `describe` says what was kept whole.
- Query heads follow KV heads (FOLLOWS): when the K groups cannot be split, o_proj's N is not
  split either, even where N alone would divide. Splitting it anyway makes GSPMD propagate the
  N split back into attention and all-gather the whole KV cache on every decode step (measured
  on 8 CPU devices: K=2, N=8, model=4 compiles to 2 all-gathers of the cache plus 3
  collective-permutes per layer; with heads following, only the two usual all-reduces).
- The batch must divide over `data`: that is an error (`check_mesh_fits`), never a silent
  replication, because a batch that does not split means a mesh that was chosen wrongly.

Many hosts: the same code runs under `jax.distributed` (`initialize_distributed`); meshes span
the global devices, weights are placed with make_array_from_callback (each process builds only
its addressable shards), inputs with `shard_batch` (the same host value on every process), and
`to_host` gathers a global result onto every process.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi3_jax.cache import KVCache
from phi3_jax.config import Phi3Config

# logical axis -> mesh axis (None: replicated).
RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "norm": None,
    "kv_heads": "model",
    "heads": "model",
    "head_dim": None,
    "mlp": "model",
    "cache_seq": None,
}

# follower -> leader: the follower is kept whole whenever its leader is (see the module doc).
FOLLOWS: Mapping[str, str] = {"heads": "kv_heads"}

# The KV cache's k and v, [B, S, K, H] (rows, slots, kv heads, head dim); cache.py carries no
# metadata, so they are named here.
CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")

MESH_AXES = ("data", "model")


class MeshError(ValueError):
    """A mesh spec or axis size that does not fit the devices, batch or heads."""


# ---------------------------------------------------------------------------- meshes

def make_mesh(spec: str | Mapping[str, int] | Mesh | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh from "data=2,model=4", a dict, or an existing Mesh.

    A missing axis gets size 1, except that with no spec at all every device goes to "model".
    Devices default to all global devices (every process's, under jax.distributed), ordered by
    jax.make_mesh for the interconnect; `model`, the chattier axis, is the inner one.
    """
    if isinstance(spec, Mesh):
        return spec
    devices = list(devices if devices is not None else jax.devices())
    if spec is None:
        sizes = {"data": 1, "model": len(devices)}
    else:
        sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
        sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
        bad = {a: s for a, s in sizes.items() if s < 1}
        if bad:
            raise MeshError(f"mesh axis sizes must be >= 1, got {_fmt(bad)}")
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(f"mesh {_fmt(sizes)} needs {total} devices but {len(devices)} are "
                        f"available; meshes that fit: {_mesh_options(len(devices))}")
    shape = [sizes[a] for a in MESH_AXES]
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # Auto axes: GSPMD propagates shardings from the weights (explicit-sharding mode would
    # require annotating every activation, which the model deliberately does not do).
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4}."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise MeshError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4'")
        sizes[name.strip()] = int(value)
    if not sizes:
        raise MeshError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4'")
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _mesh_options(n_devices: int, ok: Any = lambda data, model: True) -> str:
    options = [f"data={d},model={n_devices // d}" for d in _divisors(n_devices)
               if ok(d, n_devices // d)]
    return ", ".join(options) if options else "none"


def axis_size(mesh: Mesh, axis: str | None) -> int:
    """The size of a mesh axis; 1 for None or an axis the mesh does not have."""
    return int(mesh.shape[axis]) if axis is not None and axis in mesh.shape else 1


# ---------------------------------------------------------------------------- the rules

def config_axis_sizes(config: Phi3Config) -> dict[str, int]:
    """The size of every logical axis a Phi-3 weight or cache carries (batch aside)."""
    return {
        "vocab": config.vocab_size, "embed": config.hidden_size, "norm": config.hidden_size,
        "kv_heads": config.num_key_value_heads, "heads": config.num_attention_heads,
        "head_dim": config.head_dim, "mlp": config.intermediate_size,
    }


def state_axis_sizes(abstract_state: nnx.State) -> dict[str, set[int]]:
    """logical axis -> the sizes it has across the state's parameters (from logical_axes)."""
    sizes: dict[str, set[int]] = {}
    for _, var in nnx.to_flat_state(abstract_state):
        for name, size in zip(var.get_metadata()["logical_axes"], var.shape, strict=True):
            if name is not None:
                sizes.setdefault(name, set()).add(int(size))
    return sizes


def kept_whole(sizes: Mapping[str, int | Iterable[int]], mesh: Mesh,
               rules: Mapping[str, str | None] = RULES) -> frozenset[str]:
    """The logical axes replicated on this mesh although the rules split them: those the mesh
    axis does not divide, and the followers of such axes (FOLLOWS)."""
    whole = set()
    for name, size in sizes.items():
        n = axis_size(mesh, rules.get(name))
        if n > 1 and any(s % n for s in ([size] if isinstance(size, int) else size)):
            whole.add(name)
    whole |= {f for f, leader in FOLLOWS.items() if leader in whole}
    return frozenset(whole)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping[str, str | None] = RULES,
                   whole: Iterable[str] = ()) -> PartitionSpec:
    """Maps one tensor's logical axes to mesh axes.

    Names in `whole` are replicated (the model-wide decisions of `kept_whole`); so is any
    dimension the mesh axis does not divide. Two names of one tensor mapping onto one mesh
    axis is a bug in the rules table, and refused.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    unknown = [name for name in axes if name is not None and name not in rules]
    if unknown:
        raise MeshError(f"logical axes {unknown} have no entry in the sharding rules "
                        f"({sorted(rules)}); add them to phi3_jax.sharding.RULES")
    mapped = [rules[name] for name in axes if name is not None and rules[name] is not None]
    clash = sorted({a for a in mapped if mapped.count(a) > 1})
    if clash:
        raise MeshError(f"logical axes {tuple(axes)} map more than one dimension onto mesh "
                        f"axis {clash[0]!r}; a tensor can be split only once per mesh axis")
    whole = set(whole)
    out: list[str | None] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules[name] if name is not None else None
        n = axis_size(mesh, mesh_axis)
        out.append(mesh_axis if n > 1 and name not in whole and size % n == 0 else None)
    return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, str | None] = RULES) -> nnx.State:
    """A NamedSharding for every parameter, from its logical_axes metadata.

    The keep-whole decisions are taken over the whole state first, so that every tensor
    carrying a logical axis splits it, or not, together.
    """
    whole = kept_whole(state_axis_sizes(abstract_state), mesh, rules)

    def one(var):
        axes = var.get_metadata()["logical_axes"]
        return NamedSharding(mesh, partition_spec(axes, var.shape, mesh, rules, whole))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_shardings(cache_or_config: KVCache | Phi3Config, mesh: Mesh,
                    rows: int | None = None) -> KVCache:
    """A KVCache of NamedShardings from the rules table: k and v [B, S, K, H] are named
    CACHE_AXES, so rows split over `data` and KV heads over `model`, kept whole where the qkv
    weights keep them whole. Given a cache (concrete or abstract), or a config and the number
    of rows; the rows must divide over `data`."""
    if isinstance(cache_or_config, Phi3Config):
        config = cache_or_config
        layers, kv_heads, head_dim = (config.num_hidden_layers, config.num_key_value_heads,
                                      config.head_dim)
        if rows is None:
            raise ValueError("cache_shardings(config, mesh, rows): rows is needed with a config")
        shape = (rows, 1, kv_heads, head_dim)
    else:
        layers = len(cache_or_config.k)
        shape = tuple(cache_or_config.k[0].shape)
    check_batch(shape[0], mesh)
    whole = kept_whole({"kv_heads": shape[2]}, mesh)
    kv = NamedSharding(mesh, partition_spec(CACHE_AXES, shape, mesh, RULES, whole))
    return KVCache(k=(kv,) * layers, v=(kv,) * layers)


def heads_split(config_or_kv_heads: Phi3Config | int, mesh: Mesh) -> bool:
    """Whether the KV heads (and with them the KV cache) are split over a mesh axis."""
    kv_heads = (config_or_kv_heads.num_key_value_heads
                if isinstance(config_or_kv_heads, Phi3Config) else config_or_kv_heads)
    return (axis_size(mesh, RULES["kv_heads"]) > 1
            and "kv_heads" not in kept_whole({"kv_heads": kv_heads}, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Arrays whose leading axis is the batch ([B, T] tokens, [B] lengths): B over `data`."""
    batch_axis = RULES["batch"] if axis_size(mesh, RULES["batch"]) > 1 else None
    return NamedSharding(mesh, PartitionSpec(batch_axis, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, sampling state, results read on every host)."""
    return NamedSharding(mesh, PartitionSpec())


def put_batch(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host array [B, ...] on the device(s): split on B over `data` when there is a mesh."""
    # device_put, not jnp.asarray: in jax 0.10 the latter compiles a copy program per new shape.
    return jax.device_put(array) if mesh is None else shard_batch(array, mesh)


def shard_batch(array: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
    """A host array [B, ...] as a global array split on B over `data`.

    Multi-host safe: every process passes the same full value and builds only the shards its
    own devices hold.
    """
    array = np.asarray(array)
    check_batch(array.shape[0], mesh)
    return jax.make_array_from_callback(array.shape, batch_sharding(mesh, array.ndim),
                                        lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ---------------------------------------------------------------------------- validation

def check_batch(batch: int, mesh: Mesh) -> None:
    """The batch must split evenly over the `data` axis."""
    data = axis_size(mesh, RULES["batch"])
    if batch % data:
        n = mesh.size
        fits = _mesh_options(n, lambda d, m: batch % d == 0)
        raise MeshError(
            f"batch size {batch} does not divide over the mesh's data axis (data={data}); "
            f"use a batch that is a multiple of {data} (e.g. {-(-batch // data) * data}), or a "
            f"mesh whose data axis divides {batch}: {fits}")


def check_mesh_fits(config: Phi3Config, mesh: Mesh, batch: int | None = None, *,
                    strict: bool = False) -> None:
    """Raises MeshError, naming what does not divide what and the meshes that would fit, when
    the batch does not divide over `data`, or (strict) when any weight axis the rules split
    would be kept whole on this mesh instead (e.g. 10 KV heads on model=4)."""
    missing = [a for a in mesh.axis_names if a not in MESH_AXES]
    if missing:
        raise MeshError(f"mesh axes {missing} are unknown; phi3-jax meshes have axes "
                        f"{MESH_AXES}")
    if batch is not None:
        check_batch(batch, mesh)
    if strict:
        problems = [note for note, own in _kept_whole_notes(config, mesh) if own]
        if problems:
            sizes = config_axis_sizes(config)
            fits = _mesh_options(mesh.size, lambda d, m: all(
                sizes[name] % m == 0 for name, axis in RULES.items()
                if axis == "model" and name in sizes))
            raise MeshError("; ".join(problems) + f"; meshes on {mesh.size} devices that split "
                            f"every one: {fits}")


def _kept_whole_notes(config: Phi3Config, mesh: Mesh) -> list[tuple[str, bool]]:
    """(why, own) for each logical axis kept whole; own is False for a follower that would
    divide and is kept whole only with its leader."""
    sizes = config_axis_sizes(config)
    notes = []
    # Leaders first: "kv_heads does not divide" reads before "heads follows kv_heads".
    for name in sorted(kept_whole(sizes, mesh), key=lambda name: (name in FOLLOWS, name)):
        axis = RULES[name]
        n = axis_size(mesh, axis)
        if sizes[name] % n:
            notes.append((f"{name} ({sizes[name]}) does not divide over {axis}={n} "
                          f"(sizes that divide it: {_divisors(sizes[name])})", True))
        else:
            notes.append((f"{name} ({sizes[name]}) follows {FOLLOWS[name]}", False))
    return notes


def describe(config: Phi3Config, mesh: Mesh) -> str:
    """One line: the mesh, and which logical axes are kept whole (replicated) on it and why."""
    head = f"mesh {_fmt(dict(mesh.shape))} over {mesh.size} devices"
    notes = _kept_whole_notes(config, mesh)
    if not notes:
        return head + ": every split axis divides"
    return head + "; replicated: " + "; ".join(note for note, _ in notes)


# ---------------------------------------------------------------------------- memory

def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds for a pytree of arrays (or ShapeDtypeStructs) under these
    shardings: each leaf's shard, replicated leaves counted whole. Shardings here are even,
    so every device holds the same."""
    leaves = jax.tree.leaves(abstract)
    targets = jax.tree.leaves(shardings)
    if len(leaves) != len(targets):
        raise ValueError(f"{len(leaves)} arrays but {len(targets)} shardings")
    return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, targets, strict=True))


# ---------------------------------------------------------------------------- many hosts

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins this process to a multi-process JAX job; a no-op when already joined.

    Call it before anything touches a device. With no arguments, jax.distributed detects
    Cloud TPU pod slices, SLURM and Open MPI; elsewhere (several GPU nodes, or CPU processes)
    pass the arguments or set JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    """Adds --mesh and the --distributed options to a subcommand; read them with
    `mesh_from_args`."""
    group = parser.add_argument_group("devices")
    group.add_argument(
        "--mesh", default=None, metavar="SPEC",
        help="device mesh, e.g. 'data=2,model=4' (tensor parallel over model, batch over data); "
             "default: one device, or every device on model with --distributed")
    group.add_argument(
        "--distributed", action="store_true",
        help="join a multi-process job first (run the same command on every host): "
             "auto-detected on TPU pod slices, SLURM and Open MPI; elsewhere give "
             "--coordinator, --num-processes, --process-id (or JAX_COORDINATOR_ADDRESS, "
             "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="with --distributed: the address of process 0")
    group.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="with --distributed: how many processes in all")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="with --distributed: this process's index, 0 .. N-1")


def mesh_from_args(args: argparse.Namespace) -> Mesh | None:
    """The mesh the --mesh/--distributed options ask for (None: a single device)."""
    if getattr(args, "distributed", False):
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        return make_mesh(args.mesh)
    return make_mesh(args.mesh) if getattr(args, "mesh", None) else None
