"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Tensor parallelism is Megatron-style over the `model` mesh axis (attention by KV-head group,
the MLP by its hidden width F), the embedding and head are vocab-parallel, and the batch is
data-parallel over `data`. An axis that a dimension's size does not divide falls back to
replication (Phi-3-medium's 10 KV heads on 4 or 8 devices): correct, just not split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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

MESH_AXES = ("data", "model")


class MeshError(ValueError):
    """A mesh spec or axis size that does not fit the devices, batch or heads."""


def make_mesh(spec: str | Mapping[str, int] | Mesh | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh from "data=2,model=4", a dict, or an existing Mesh.

    A missing axis gets size 1, except that with no spec at all every device goes to "model".
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
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        options = ", ".join(f"data={d},model={len(devices) // d}"
                            for d in range(1, len(devices) + 1) if len(devices) % d == 0)
        raise MeshError(f"mesh {_fmt(sizes)} needs {total} devices but {len(devices)} are "
                        f"available; meshes that fit: {options}")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise MeshError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4'")
        sizes[name.strip()] = int(value)
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Maps logical axes to mesh axes, replicating any dimension the mesh axis does not divide."""
    out: list[str | None] = []
    used: set[str] = set()
    for name, size in zip(axes, shape, strict=False):
        mesh_axis = RULES.get(name) if name is not None else None
        if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
                or size % mesh.shape[mesh_axis]):
            out.append(None)
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every parameter, from its logical_axes metadata."""
    def one(var):
        axes = var.get_metadata()["logical_axes"]
        return NamedSharding(mesh, partition_spec(axes, var.shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
