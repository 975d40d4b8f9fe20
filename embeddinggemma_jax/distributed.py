"""Multi-process JAX, shared by ``embed`` and ``train``: the flags, ``jax.distributed`` start-up
(auto-detected on TPU pods, explicit with gloo collectives elsewhere), host -> global array
placement, and the few host-side collectives the jobs need."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from embeddinggemma_jax.options import option


@dataclass(frozen=True)
class Distributed:
    """How this process joins a multi-process run; each field is a flag of ``embed`` and ``train``."""

    multihost: bool = option(False, "call jax.distributed.initialize() (auto-detected on TPU pods); run on every "
                                    "worker")
    coordinator: str | None = option(None, "HOST:PORT of process 0, for clusters without auto-detection")
    num_processes: int | None = option(None, "number of processes (with --coordinator)")
    process_id: int | None = option(None, "this process's index (with --coordinator)")

    def __post_init__(self):
        if self.coordinator and (self.num_processes is None or self.process_id is None):
            raise ValueError("--coordinator needs --num-processes N and --process-id I (0..N-1) on every process")
        if self.coordinator and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id {self.process_id} is outside 0..{self.num_processes - 1}")

    def start(self) -> None:
        """Join the run (once per process, before any device is touched); nothing for a single process."""
        if (self.multihost or self.coordinator) and not jax.distributed.is_initialized():
            init_distributed(self.coordinator, self.num_processes, self.process_id)


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
    """Put every array onto its sharding from host values (the same on every process); works when the
    sharding spans devices of other processes (each process supplies the slices its devices hold)."""
    def put(x, s):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, state, shardings)


def allgather_ints(values) -> np.ndarray:
    """[processes, n] int32: every process's ``values`` (a no-op stack on one process)."""
    v = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return v[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(v)).reshape(jax.process_count(), -1)


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """[processes, *x.shape]: every process's ``x`` (same shape and dtype everywhere)."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def allgather_ragged(values) -> list[np.ndarray]:
    """Every process's 1-D int32 ``values`` (lengths may differ): two collectives (sizes, then the
    values padded to the longest, rounded up to a power of two: every new shape is a new compiled
    program, and on CPU only process 0 finds it in the persistent cache)."""
    v = np.asarray(values, np.int32).ravel()
    if jax.process_count() == 1:
        return [v]
    sizes = allgather_ints([v.size])[:, 0]
    if sizes.max() == 0:
        return [np.zeros(0, np.int32) for _ in sizes]
    padded = np.zeros(1 << (int(sizes.max()) - 1).bit_length(), np.int32)
    padded[:v.size] = v
    rows = allgather_ints(padded)
    return [rows[h, :int(n)] for h, n in enumerate(sizes)]


def agree_error(message: str | None, max_bytes: int = 2048) -> str | None:
    """Every host calls this with its error message (or None); all get back the same answer: the
    message of the lowest-numbered host that has one, or None when no host has. One collective, so a
    host that meets an error stops together with the others instead of leaving them in the next one."""
    data = (message or "").encode("utf-8")[:max_bytes]
    row = np.zeros(max_bytes + 1, np.int32)
    row[0] = message is not None
    row[1:1 + len(data)] = np.frombuffer(data, np.uint8)
    rows = allgather_ints(row)
    for r in rows:
        if r[0]:
            body = r[1:].astype(np.uint8).tobytes().rstrip(b"\0")
            return body.decode("utf-8", errors="ignore")
    return None


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """Process 0: the one that writes shared files (metrics, the exported folder)."""
    return jax.process_index() == 0
