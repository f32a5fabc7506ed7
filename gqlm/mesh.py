"""Device mesh from config, and logical-axis -> mesh-axis sharding.

Parameters carry logical axis names (`nnx.Param(..., sharding_names=("embed", "mlp"))`); the
rules table in `config.mesh.rules` maps each logical name to mesh axes. Nothing else in gqlm
names a mesh axis for a parameter.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gqlm.config import MESH_AXES, ConfigDict, resolve_mesh_shape
from gqlm.distributed import multislice_device_grid

Rules = Sequence[tuple[str, Any]]


def make_mesh(mesh_config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor, expert) mesh with Auto axis types (GSPMD propagation)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
    grid = multislice_device_grid(shape, devices)  # Several TPU slices: `data` spans them over DCN.
    if grid is not None:
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Rules, mesh: Mesh) -> P:
    """PartitionSpec for one array; mesh axes of size 1 or already used are dropped."""
    if logical_axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide the dimension they shard (e.g. a 3-row bias)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, size = [], 1
        for a in names:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        fitted.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return P(*fitted)


def param_logical_axes(abstract_state: nnx.State) -> Any:
    """Pure-dict tree of each parameter's logical axis names (None where unannotated)."""
    def axes(v):
        return v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    return nnx.to_pure_dict(jax.tree.map(axes, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(abstract_state: nnx.State, rules: Rules, mesh: Mesh) -> Any:
    """Pure-dict tree of NamedShardings matching `nnx.to_pure_dict(abstract_state)`."""
    def shard(v):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        spec = fit_spec(logical_to_spec(names, rules, mesh), value.shape, mesh)
        return NamedSharding(mesh, spec)
    tree = jax.tree.map(shard, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a [B, T] batch array: batch over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_like(tree: Any, shardings: Any) -> Any:
    """Applies a sharding constraint tree inside jit (a no-op outside a mesh context)."""
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, shardings)


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Bytes each device holds for a tree of ShapeDtypeStructs under the given shardings."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shard_shape = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
    return total
