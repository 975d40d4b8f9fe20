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
from jax.sharding import NamedSharding

from embeddinggemma_jax.distributed import place_state
from embeddinggemma_jax.head import jit_forward
from embeddinggemma_jax.sharding import logical_to_spec, state_shardings, use_rules


class ShardedEncoder:
    """``model``: anything with ``graphdef``, ``state`` and ``attention_impl`` (an ``EmbeddingGemma``).
    ``place=False`` keeps the state abstract (``ShapeDtypeStruct``s carrying their shardings): the
    step can then only be compiled, e.g. for a TPU slice that is not there (``tpu_compile``)."""

    def __init__(self, model, mesh, rules, *, place: bool = True):
        self._build(model.graphdef, model.state, model.attention_impl, mesh, rules, place)

    @classmethod
    def from_parts(cls, graphdef, state, attention_impl: str, mesh, rules, *, place: bool = True) -> "ShardedEncoder":
        """The encoder of a module given as ``nnx.split``'s (graphdef, state) and its attention implementation,
        without an ``EmbeddingGemma`` (``tpu_aot.compile_job``: an abstract module, ``place=False``)."""
        self = cls.__new__(cls)
        self._build(graphdef, state, attention_impl, mesh, rules, place)
        return self

    def _build(self, graphdef, state, impl: str, mesh, rules, place: bool) -> None:
        self.mesh, self.rules = mesh, tuple(rules)
        self.state_shardings = state_shardings(state, mesh, self.rules)
        if place:
            self.state = place_state(state, self.state_shardings)
        else:
            self.state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      state, self.state_shardings)
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
        self._jit = jit_forward(graphdef, call_kw={"impl": impl},
                                in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
                                out_shardings=self.out_sharding)
        self._compiled: dict[tuple[int, int], object] = {}
        self.compile_seconds = 0.0

    def compiled(self, global_shape: tuple[int, int]):
        exe = self._compiled.get(global_shape)
        if exe is None:
            t = time.perf_counter()
            arg = jax.ShapeDtypeStruct(global_shape, jnp.int32, sharding=self.batch_sharding)
            with use_rules(self.mesh, self.rules):
                exe = self._jit.lower(self.state, arg, arg).compile()  # every process compiles its own, as JAX does
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


__all__ = ["ShardedEncoder"]
