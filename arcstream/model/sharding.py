"""Logical-axis sharding (MaxText style): layers name axes, one table maps them to the mesh.

Every parameter and every constrained activation names its dimensions with
*logical* axes ("embed", "mlp", "q_heads", "activation_batch", ...).  The
single table `LOGICAL_AXIS_RULES` maps each logical axis to a mesh axis of the
('data', 'model') mesh or to None (replicated).  Changing the parallelism of
the whole model is editing this table, never a layer.

Data parallel: activations' batch over 'data'.  Tensor parallel: attention
heads, MLP hidden units and the vocabulary over 'model'.

Divisibility: `jax.device_put` refuses a dimension that does not split evenly
over its mesh axis, so `logical_to_spec` replicates such a dimension instead;
GSPMD keeps the result identical, only the layout (and speed) changes.  For
attention heads that is not left to chance: `params.check_head_sharding`
refuses a 'model' axis that does not divide the query heads, and allows one
larger than the KV heads only as a multiple of them (Qwen2.5-0.5B's 2 KV heads
on a 4-way axis: each device keeps both KV heads).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (or None = replicated). Grouped by subsystem.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    # --- parameters -------------------------------------------------------
    ("vocab", "model"),  # embedding rows / LM head columns
    ("embed", None),  # residual width D: replicated (activations carry it whole)
    ("q_heads", "model"),  # N*H query projection outputs: tensor parallel over heads
    ("kv_heads", "model"),  # K*H key/value projection outputs
    ("head_dim", None),  # per-head norms (Qwen3 q/k norm)
    ("mlp", "model"),  # SwiGLU hidden F
    ("norm", None),  # RMSNorm scales over D
    # --- activations --------------------------------------------------------
    ("activation_batch", "data"),  # B: data parallel
    ("activation_length", None),  # T: whole sequence on each device
    ("activation_embed", None),  # D of the residual stream
    ("activation_heads", "model"),  # N or K of [B, T, N, H] attention tensors
    ("activation_head_dim", None),
    ("activation_mlp", "model"),  # F of the MLP hidden
    ("activation_vocab", "model"),  # V of the logits
    ("cache_length", None),  # S of the KV cache
)


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    """The `mesh` section of every job that runs a model: the ('data', 'model') mesh's shape."""

    data: int = -1  # batch (data-parallel) axis size; -1 = all devices the other axis leaves
    model: int = 1  # tensor-parallel axis size (heads, MLP, d_sae)

    def make(self) -> Mesh:
        return make_mesh(data=self.data, model=self.model)


def make_mesh(data: int = -1, model: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh with *Auto* axis types.

    `-1` for one axis means "all remaining devices".  Auto (not the new
    Explicit default of `jax.make_mesh`) because Explicit rejects matmuls whose
    contracting dimension is sharded, which tensor parallelism needs.
    """
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    if data == -1 and model == -1:
        raise ValueError("make_mesh(data=-1, model=-1): at most one axis may be -1.")
    if data == -1:
        if model <= 0 or n % model:
            raise ValueError(f"make_mesh(model={model}): must divide the {n} devices.")
        data = n // model
    elif model == -1:
        if data <= 0 or n % data:
            raise ValueError(f"make_mesh(data={data}): must divide the {n} devices.")
        model = n // data
    if data * model != n and devices is None:
        # A sub-mesh on the first data*model devices (tests compare against 1 device).
        if data * model > n:
            raise ValueError(f"make_mesh(data={data}, model={model}) needs {data * model} devices; "
                             f"{n} are visible.")
        devs = devs[: data * model]
    elif data * model != len(devs):
        raise ValueError(f"make_mesh(data={data}, model={model}) needs {data * model} devices; "
                         f"{len(devs)} were given.")
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devs)


def _rules_dict(rules: Sequence[tuple[str, str | None]] | None) -> dict[str, str | None]:
    return dict(LOGICAL_AXIS_RULES if rules is None else rules)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: Sequence[tuple[str, str | None]] | None = None,
) -> PartitionSpec:
    """PartitionSpec for a value whose dimensions have logical names `axes`.

    A dimension whose size is not a multiple of its mesh axis's size, and a
    mesh axis already used by an earlier dimension, are replicated (see the
    module docstring).  Unknown logical names raise, naming the axis.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}.")
    table = _rules_dict(rules)
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}.")
        mesh_axis = table[name]
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.axis_names:
            spec.append(None)
            continue
        if size % mesh.shape[mesh_axis]:
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def logical_sharding(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] | None = None,
) -> NamedSharding:
    """NamedSharding on `mesh` for logical `axes` (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def constrain(x: jax.Array, axes: Sequence[str | None],
              rules: Sequence[tuple[str, str | None]] | None = None) -> jax.Array:
    """`with_sharding_constraint` by logical axes, under the mesh set by `jax.set_mesh`.

    A no-op outside a mesh context (single-device runs), so the same model code
    runs everywhere.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))
