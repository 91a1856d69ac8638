"""Device mesh, logical-axis rules, and placement of models and activations on the mesh.

Parameters carry logical axis names (`nnx.Param(..., logical_axes=("embed", "mlp"))`); the rules
below turn them into `PartitionSpec`s over the mesh axes ('data', 'fsdp', 'tensor'). A dim whose
size does not divide its mesh axes is replicated instead, so any model fits any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
}


def make_mesh(
    data: int, fsdp: int, tensor: int, devices: Sequence | None = None
) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all). One size may be -1.

    Axes are `Auto` so XLA propagates shardings from params and `constrain` calls (the default in
    this JAX version is `Explicit`, which would make every op spell out its output sharding).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    named = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis size may be -1, got {named}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh axis sizes must be positive (or one -1), got {named}.")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(
                f"Cannot infer the -1 mesh axis: {len(devices)} devices are not divisible by the "
                f"product of the other sizes ({known}) in {named}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh sizes {named} multiply to {math.prod(sizes)}, but there are {len(devices)} "
            "devices; the product must equal the device count."
        )
    return jax.make_mesh(
        tuple(sizes),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def _axis_size(mesh, mesh_axes: str | tuple[str, ...]) -> int:
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None) -> P:
    """PartitionSpec for logical `axes` (None entries stay replicated).

    With `shape` and `mesh`, a dim whose size is not a multiple of its mesh axes' size is
    replicated. A mesh axis already used by an earlier dim is not reused (JAX forbids it).
    """
    if shape is not None and len(shape) != len(axes):
        raise ValueError(
            f"Logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}."
        )
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise ValueError(
                f"Unknown logical axis {name!r}; known axes: {', '.join(LOGICAL_RULES)}."
            )
        target = LOGICAL_RULES[name]
        names = () if target is None else (target,) if isinstance(target, str) else target
        if mesh is not None:
            names = tuple(n for n in names if n in mesh.shape)
        if not names or used.intersection(names):
            spec.append(None)
            continue
        if shape is not None and mesh is not None and shape[i] % _axis_size(mesh, names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return P(*spec)


def _variable_spec(variable: nnx.Variable, mesh) -> P:
    shape = variable.shape
    if not variable.has_metadata("logical_axes"):
        return P()  # e.g. RNG state or counters: small, replicate.
    axes = variable.get_metadata("logical_axes")
    return logical_to_spec(axes, shape, mesh)


def param_shardings(model_or_state, mesh) -> nnx.State:
    """NamedShardings for every variable of an NNX model (or its state), same tree structure.

    The result can be passed to `jax.device_put(state, ...)` or as jit in/out shardings.
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, _variable_spec(v, mesh))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
    """Moves the model's state onto `mesh` per the rules, in place; returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def constrain(x: jax.Array, axes: Sequence[str | None], mesh=None) -> jax.Array:
    """`with_sharding_constraint` by logical axes; a no-op when there is no mesh.

    Uses `mesh` if given, else the mesh set with `jax.set_mesh`, so model code can call it
    unconditionally and still run unsharded.
    """
    if mesh is not None:
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh))
        )
    context_mesh = jax.sharding.get_abstract_mesh()
    if context_mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, context_mesh))


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process run reaches the barrier `name`; a no-op with
    one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
