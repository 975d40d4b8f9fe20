"""The sharded encode step: parameters replicated, the global batch split over the data axes.

``ShardedEncoder`` jits the model's forward with explicit ``in_shardings``/``out_shardings`` built
from logical names (``sharding.logical_to_spec``): the rules table decides which mesh axes carry
``batch``; nothing here names a mesh axis. Each process passes only its own rows; the global
array is assembled with ``jax.make_array_from_process_local_data`` and each process reads back
the rows it owns. One compiled executable per batch shape, compiled ahead of time and timed.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from embeddinggemma_jax.sharding import logical_to_spec, state_shardings, use_rules


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """``jax.distributed.initialize``: explicit on CPU/GPU clusters, auto-detected on TPU pods.
    On the CPU backend, cross-process collectives need gloo."""
    if jax.config.jax_platforms in (None, "", "cpu") or coordinator is not None:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # noqa: BLE001 - option absent on builds without CPU collectives
            pass
    kw = {}
    if coordinator is not None:
        kw = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kw)


def place_state(state, shardings):
    """Put every parameter onto its sharding from host values; works when the sharding spans
    devices of other processes (each process supplies the slices its devices hold)."""
    def put(x, s):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, state, shardings)


class ShardedEncoder:
    """``model``: anything with ``graphdef``, ``state`` and ``attention_impl`` (an ``EmbeddingGemma``).
    ``place=False`` keeps the state abstract (``ShapeDtypeStruct``s carrying their shardings): the
    step can then only be compiled, e.g. for a TPU slice that is not there (``tpu_compile``)."""

    def __init__(self, model, mesh, rules, *, place: bool = True):
        self.mesh, self.rules = mesh, tuple(rules)
        self.state_shardings = state_shardings(model.state, mesh, self.rules)
        if place:
            self.state = place_state(model.state, self.state_shardings)
        else:
            self.state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      model.state, self.state_shardings)
        self.batch_sharding = NamedSharding(mesh, logical_to_spec(("activation_batch", "activation_length"),
                                                                  self.rules, mesh))
        self.out_sharding = NamedSharding(mesh, logical_to_spec(("activation_batch", None), self.rules, mesh))
        spec0 = self.batch_sharding.spec[0]
        axes = () if spec0 is None else (spec0,) if isinstance(spec0, str) else tuple(spec0)
        self.batch_split = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if self.batch_split % jax.process_count():
            raise ValueError(f"the batch is split {self.batch_split} ways, not a multiple of the "
                             f"{jax.process_count()} processes; use a mesh whose data axes span every host")
        self.local_split = self.batch_split // jax.process_count()
        graphdef, impl = model.graphdef, model.attention_impl

        def forward(state, ids, mask):
            return nnx.merge(graphdef, state)(ids, mask, impl=impl)

        self._jit = jax.jit(forward, in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
                            out_shardings=self.out_sharding)
        self._compiled: dict[tuple[int, int], object] = {}
        self.compile_seconds = 0.0

    def compiled(self, global_shape: tuple[int, int]):
        exe = self._compiled.get(global_shape)
        if exe is None:
            t = time.perf_counter()
            arg = jax.ShapeDtypeStruct(global_shape, jnp.int32, sharding=self.batch_sharding)
            with use_rules(self.mesh, self.rules):
                exe = self._jit.lower(self.state, arg, arg).compile()
            self.compile_seconds += time.perf_counter() - t
            self._compiled[global_shape] = exe
        return exe

    @property
    def num_shapes(self) -> int:
        return len(self._compiled)

    def __call__(self, ids_local: np.ndarray, mask_local: np.ndarray) -> jax.Array:
        """This process's rows [b, L] -> the global output [b * processes, out] (dispatched async)."""
        shape = (ids_local.shape[0] * jax.process_count(), ids_local.shape[1])
        exe = self.compiled(shape)
        ids = jax.make_array_from_process_local_data(self.batch_sharding, ids_local, shape)
        mask = jax.make_array_from_process_local_data(self.batch_sharding, mask_local, shape)
        return exe(self.state, ids, mask)

    @staticmethod
    def local_rows(out: jax.Array) -> np.ndarray:
        """The rows of a batch-sharded global array held by this process, in global order."""
        parts = {}
        for s in out.addressable_shards:
            parts.setdefault(s.index[0].start or 0, s.data)
        return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)], axis=0)


def allgather_ints(values) -> np.ndarray:
    """[processes, n] int32: every process's ``values`` (a no-op stack on one process)."""
    v = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return v[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(v)).reshape(jax.process_count(), -1)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = ["ShardedEncoder", "init_distributed", "place_state", "allgather_ints", "barrier"]
