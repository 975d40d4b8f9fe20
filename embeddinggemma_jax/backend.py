"""Which JAX platform this host runs on, decided before JAX starts its backends.

The ``tpu`` and ``test`` extras install libtpu. On a host with no TPU, JAX then tries the TPU
backend first and libtpu prints several lines of warnings (``TPU_ACCELERATOR_TYPE``,
``TPU_WORKER_HOSTNAMES``) on stderr before falling back to the CPU. ``keep_cpu_host_quiet`` sets
``JAX_PLATFORMS=cpu`` in exactly that case: JAX_PLATFORMS unset, libtpu installed, no TPU chip on the
PCI bus (Google's vendor id, as ``jax._src.hardware_utils`` checks) and no JAX GPU plugin. A TPU
VM, a GPU host and an explicit JAX_PLATFORMS are left alone.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GOOGLE_PCI_VENDOR_ID = "0x1ae0"
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def tpu_present(pci: str | Path = "/sys/bus/pci/devices") -> bool:
    """A TPU chip on this host's PCI bus (what libtpu itself looks for)."""
    try:
        return any((d / "vendor").read_text().strip() == GOOGLE_PCI_VENDOR_ID
                   for d in Path(pci).iterdir() if (d / "vendor").is_file())
    except OSError:
        return False


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def keep_cpu_host_quiet() -> bool:
    """Set JAX_PLATFORMS=cpu when libtpu is installed on a host without a TPU (see the module
    docstring); True when it did."""
    if os.environ.get("JAX_PLATFORMS") or not installed("libtpu") or tpu_present():
        return False
    if any(installed(p) for p in GPU_PLUGINS):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True


def quiet_topology_env(accelerator_type: str) -> None:
    """Environment libtpu reads when it builds a topology description on a host without a TPU:
    without it libtpu prints warnings about the accelerator type and worker hostnames. Never set on
    a host with a TPU (there libtpu reads the real values)."""
    if tpu_present():
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compiling touches no chip: several compiling processes may load libtpu at once (its lockfile
    # guards a TPU's devices, of which this host has none).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
