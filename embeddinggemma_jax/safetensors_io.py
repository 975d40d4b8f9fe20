"""safetensors files: a memory-mapped reader and an atomic writer (the ``safetensors`` library), bf16 included.

Reading: the format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}``, then the raw little-endian tensor bytes. ``SafeTensorsFile`` checks every header entry on
open and returns numpy views of a memory map, whose pages the loader releases tensor by tensor
(``release_pages``). This stays hand-written on purpose: loading the real weights through the library's
``safe_open`` (numpy) peaks about 1.6 GB higher than with this reader (the library's reads are copies and its
map stays resident until the file is closed; ``python benchmarks/load_memory.py``, results in
``benchmarks/load_memory.json``).
Writing uses the library's ``save_file``, which streams the tensors to a temporary file renamed into place.
numpy has no bfloat16, hence ``ml_dtypes``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file as _save_file

from embeddinggemma_jax.errors import WeightsError
from embeddinggemma_jax.io_utils import atomic_path

DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafeTensorsFile:
    """``keys()``, ``shape(key)``, ``dtype(key)`` without reading data; ``get(key)`` is a memmap view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit in a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise WeightsError(f"{self.path} is not a readable safetensors file ({e}); re-download or re-export it")
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path} is not a readable safetensors file (its header is not a JSON object); "
                               "re-download or re-export it")
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self.data_start = 8 + n
        for key in header:
            self._check_entry(key, size)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.data_start + end > size:
            raise WeightsError(f"{self.path} is truncated: its header needs {self.data_start + end} bytes, "
                               f"the file has {size}; re-download or re-export it")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self.data_start else None

    def _check_entry(self, key: str, size: int) -> None:
        """The header entry of ``key`` is consistent: known dtype, offsets in order and inside the
        file, and as many bytes as its shape and dtype need."""
        v = self.header[key]
        try:
            start, end = (int(x) for x in v["data_offsets"])
            shape = [int(x) for x in v["shape"]]
            itemsize = DTYPES[v["dtype"]].itemsize if v["dtype"] in DTYPES else None
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{self.path}: the header entry of tensor {key} is malformed; re-download or "
                               "re-export the file") from None
        if itemsize is None:
            raise WeightsError(f"{self.path}: tensor {key} has unsupported dtype {v['dtype']}")
        need = int(np.prod(shape, dtype=np.int64)) * itemsize
        if not 0 <= start <= end or end - start != need:
            raise WeightsError(f"{self.path}: tensor {key} has shape {shape} ({v['dtype']}, {need} bytes) but its "
                               f"offsets span {end - start} bytes; the file is damaged: re-download or re-export it")

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, key: str) -> bool:
        return key in self.header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self.header[key]["dtype"]
        if name not in DTYPES:
            raise WeightsError(f"{self.path}: tensor {key} has unsupported dtype {name}")
        return DTYPES[name]

    def release_pages(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache, and a later
        read faults them back in): a loader that copies tensors out one at a time then holds about
        one copy of the weights, not the copies plus the file."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def get(self, key: str) -> np.ndarray:
        start, end = self.header[key]["data_offsets"]
        dt = self.dtype(key)
        buf = self._mm[self.data_start + start:self.data_start + end] if self._mm is not None else np.zeros(0, np.uint8)
        return buf.view(dt).reshape(self.shape(key))


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write with the library (tensors C-contiguous, little-endian; it streams them to the file) under a
    temporary name, renamed into place when complete."""
    arrays = {}
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        if a.dtype not in NAMES:
            raise WeightsError(f"cannot write tensor {key} of dtype {a.dtype} to safetensors")
        arrays[key] = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
    with atomic_path(path) as tmp:
        _save_file(arrays, str(tmp), metadata=dict(metadata or {"format": "pt"}))
