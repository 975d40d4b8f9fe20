"""Logical axis names and their mapping onto a device mesh.

Model code names *logical* axes only. Parameters carry theirs as NNX sharding metadata (set where
each ``nnx.Param`` is made: ``("vocab", "embed")``, ``("layers", "embed", "mlp")``, ...), so
``nnx.get_partition_spec`` reads them off any model state; activations name theirs in
``constrain(x, ("activation_batch", "activation_length", "activation_embed"))``. The two sets of
names are kept apart, so a rule can split a weight's axis without touching the activations that
happen to have the same size. A rules table maps each logical name to mesh axes (or nothing:
replicated); ``use_rules(mesh, rules)`` makes a mapping current, and outside it ``constrain`` is a
no-op, so single-device code pays nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]

# Parameter axes (NNX metadata on every nnx.Param) and activation axes (``constrain``).
PARAM_AXES = ("vocab", "embed", "mlp", "q_heads", "kv_heads", "head_dim", "layers", "dense_hidden", "dense_out")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed", "activation_mlp",
                   "activation_kv_heads", "activation_head_dim")

# Inference: data parallel only, every parameter replicated. ``slice``: the axis over the slices of
# a multi-slice job (data parallel over the data-centre network); absent from single-slice meshes.
DATA_PARALLEL_RULES: Rules = (
    ("activation_batch", ("slice", "data", "fsdp")),
)

# Training with parameter sharding (FSDP-style): the largest axis of each weight is split over
# the `fsdp` mesh axis, activations over both axes; XLA all-gathers the weights per layer.
FSDP_RULES: Rules = (
    ("activation_batch", ("slice", "data", "fsdp")),
    ("vocab", "fsdp"),
    ("mlp", "fsdp"),
    ("dense_hidden", "fsdp"),
)


@dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: Rules

    def sharding(self, names: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(names, self.rules, self.mesh))


_current: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar("sharding", default=None)


def logical_to_spec(names: Sequence[str | None], rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once per array.

    With ``shape`` (and a mesh), a dimension the mesh axes it maps to do not divide evenly is an
    error: it is never replicated behind the caller's back.
    """
    unknown = [n for n in names if n is not None and n not in PARAM_AXES + ACTIVATION_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis {unknown[0]!r}; parameters use {', '.join(PARAM_AXES)}, "
                         f"activations {', '.join(ACTIVATION_AXES)}")
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        if shape is not None and mesh is not None and axes:
            split = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[dim] % split:
                raise ValueError(f"axis {name!r} of size {shape[dim]} cannot be split {split} ways over mesh axes "
                                 f"{'x'.join(axes)} {dict(mesh.shape)}; choose a mesh whose "
                                 f"{'x'.join(axes)} size divides {shape[dim]}")
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules) -> Iterator[ShardingContext]:
    token = _current.set(ShardingContext(mesh, tuple(rules)))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def per_batch_shard(f, nargs: int, replicated: int = 0):
    """``f`` applied to each device's rows (the leading ``activation_batch`` axis of its first ``nargs``
    arguments and of its result; the ``replicated`` arguments after them whole on every device) through
    ``shard_map``, when a mesh of more than one device is current; ``f`` itself otherwise. For Mosaic
    (Pallas TPU) kernels, which XLA cannot partition."""
    ctx = _current.get()
    if ctx is None or ctx.mesh.size == 1:
        return f
    spec = PartitionSpec(logical_to_spec(("activation_batch",), ctx.rules, ctx.mesh)[0])
    return jax.shard_map(f, mesh=ctx.mesh, in_specs=(spec,) * nargs + (PartitionSpec(),) * replicated,
                         out_specs=spec, check_vma=False)


def current_platform() -> str | None:
    """The platform ("tpu", "cpu", ...) of the mesh made current by ``use_rules``, else None: a step
    compiled for a TPU slice from a CPU host (``tpu_compile``) is a TPU program."""
    ctx = _current.get()
    return None if ctx is None else ctx.mesh.devices.flat[0].platform


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, when a rules context is active."""
    ctx = _current.get()
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.sharding(names))


def num_slices(devices=None) -> int:
    """How many TPU slices ``devices`` (all devices by default) span (1 off multi-slice TPU jobs)."""
    devices = list(devices if devices is not None else jax.devices())
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(shape: tuple[int, int] | None = None, devices=None, axis_names=("data", "fsdp")) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (all devices by default); shape defaults to (n, 1).

    Devices of several slices (multi-slice TPU jobs) get a leading ``slice`` axis, as JAX's
    multi-slice meshes do: (slice, data / slices, fsdp), each slice's devices in one row, so only
    the data-parallel ``slice`` axis crosses the data-centre network."""
    devices = list(devices if devices is not None else jax.devices())
    shape = shape or (len(devices), 1)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    slices = num_slices(devices)
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(f"mesh shape {shape}: the data axis {shape[0]} must be a multiple of the {slices} "
                             "slices the devices span")
        order = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))
        return Mesh(np.asarray(order).reshape((slices, shape[0] // slices) + tuple(shape[1:])),
                    ("slice",) + tuple(axis_names))
    return Mesh(np.asarray(devices).reshape(shape), axis_names)


def param_axes(state) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """{parameter path: logical axes} from the NNX metadata of every parameter of ``state``."""
    from flax import nnx

    out = {}
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    for path, var in nnx.to_flat_state(state):
        names = tuple(specs[path].get_value())
        key = tuple(str(p) for p in path)
        if len(names) != len(var.get_value().shape):
            raise ValueError(f"parameter {'/'.join(key)} carries no logical axes for its shape "
                             f"{tuple(var.get_value().shape)}; create it with layers.param(..., axes)")
        out[key] = tuple(names)
    return out


def state_shardings(state, mesh: Mesh, rules):
    """A pytree of NamedSharding with the structure of ``state`` (for jit, device_put, Orbax restore),
    from each parameter's logical axes and ``rules``."""
    from flax import nnx

    axes = param_axes(state)
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        spec = logical_to_spec(axes[key], rules, mesh, var.get_value().shape)
        flat.append((path, var.replace(NamedSharding(mesh, spec))))
    return nnx.from_flat_state(flat)


def param_shardings(state, mesh: Mesh, rules) -> dict[tuple[str, ...], NamedSharding]:
    """{parameter path: NamedSharding} (the loader places each tensor as it reads it)."""
    from flax import nnx

    return {tuple(str(p) for p in path): var.get_value()
            for path, var in nnx.to_flat_state(state_shardings(state, mesh, rules))}
