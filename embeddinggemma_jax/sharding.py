"""Logical axis names and their mapping onto a device mesh.

Model code names *logical* axes only (``("batch", "length", "embed")``); a rules table maps each
logical name to a mesh axis (or ``None`` = replicated). ``use_rules(mesh, rules)`` makes a mapping
current; outside it, ``constrain`` is a no-op, so single-device code pays nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical names used by parameters (see weights.PARAM_TABLE) and activations.
LOGICAL_AXES = ("batch", "length", "embed", "vocab", "mlp", "q_heads", "kv_heads", "head_dim", "layers",
                "dense_hidden", "dense_out")

# Inference: data parallel only, every parameter replicated.
DATA_PARALLEL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
)

# Training with parameter sharding (FSDP-style): the largest axis of each weight is split over
# the `fsdp` mesh axis, activations over both axes; XLA all-gathers the weights per layer.
FSDP_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "fsdp"),
    ("mlp", "fsdp"),
    ("dense_hidden", "fsdp"),
)


@dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

    def spec(self, names: Sequence[str | None]) -> PartitionSpec:
        return logical_to_spec(names, self.rules, self.mesh)

    def sharding(self, names: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))


_current: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar("sharding", default=None)


def logical_to_spec(names: Sequence[str | None], rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once per array.

    With ``shape``, a dimension the mesh axes do not divide evenly stays replicated (tiny test
    models have prime sizes; the real model's sizes divide every v5e mesh).
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        if shape is not None and mesh is not None and shape[dim] % int(np.prod([mesh.shape[a] for a in axes])):
            axes = ()
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


def current() -> ShardingContext | None:
    return _current.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, when a rules context is active."""
    ctx = _current.get()
    if ctx is None:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.sharding(names))


def make_mesh(shape: tuple[int, int] | None = None, devices=None, axis_names=("data", "fsdp")) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (all devices by default); shape defaults to (n, 1)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = shape or (len(devices), 1)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), axis_names)


def param_shardings(state, mesh: Mesh, rules) -> dict[tuple[str, ...], NamedSharding]:
    """{parameter path: NamedSharding} from the logical axes in ``weights.PARAM_TABLE``."""
    from embeddinggemma_jax.weights import iter_params, logical_axes_tree

    shapes = {path: var.get_value().shape for path, var in iter_params(state)}
    return {path: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shapes[path]))
            for path, axes in logical_axes_tree(state).items()}


def state_shardings(state, mesh: Mesh, rules):
    """A pytree of NamedSharding with the structure of ``state`` (for jit, device_put, Orbax restore)."""
    from flax import nnx

    by_path = param_shardings(state, mesh, rules)
    flat = [(path, var.replace(by_path[tuple(str(p) for p in path)])) for path, var in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def shard_state(state, mesh: Mesh, rules):
    """Place every parameter of ``state`` on ``mesh`` according to its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))
