"""Peak resident memory of loading and saving the real weights: this package's memory-mapped safetensors reader
against the ``safetensors`` library's ``safe_open`` (numpy) in the same loader, each in a fresh process.

    python benchmarks/load_memory.py [--model google/embeddinggemma-300m] [--json benchmarks/load_memory.json]

Why ``safetensors_io.SafeTensorsFile`` is hand-written while writing goes through the library: the loader keeps
the reader whose peak is smaller.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

WORKER = r'''
import json, resource, sys, tempfile, time
import numpy as np
from embeddinggemma_jax import EmbeddingGemma, hub, safetensors_io, weights

if sys.argv[2] == "library":
    from safetensors import safe_open

    class LibraryFile:
        """The library behind the interface the loader uses."""
        def __init__(self, path):
            self._f = safe_open(str(path), framework="numpy")
            self._s = {k: self._f.get_slice(k) for k in self._f.keys()}
        def keys(self): return list(self._s)
        def __contains__(self, k): return k in self._s
        def shape(self, k): return tuple(self._s[k].get_shape())
        def dtype(self, k): return safetensors_io.DTYPES[self._s[k].get_dtype()]
        def get(self, k): return self._f.get_tensor(k)
        def release_pages(self): pass

    weights.SafeTensorsFile = LibraryFile

folder = hub.resolve(sys.argv[1])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
model = EmbeddingGemma.from_pretrained(folder, dtype="float32")
out = {"reader": sys.argv[2], "load_seconds": time.perf_counter() - t, "load_peak_mib": peak()}
t = time.perf_counter()
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d + "/out")
out.update(save_seconds=time.perf_counter() - t, load_and_save_peak_mib=peak())
print(json.dumps(out))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    rows = []
    for reader in ("package", "library"):
        r = subprocess.run([sys.executable, "-c", WORKER, a.model, reader], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{reader:8s} load peak {rows[-1]['load_peak_mib']:,.0f} MiB ({rows[-1]['load_seconds']:.1f} s), "
              f"after save {rows[-1]['load_and_save_peak_mib']:,.0f} MiB")
    if a.json:
        from embeddinggemma_jax.io_utils import atomic_write_json

        atomic_write_json(a.json, {"model": a.model, "machine": platform.processor() or platform.machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
