"""The embed job's shard commit on an object store: upload under a temporary name then rename (the protocol a
POSIX disk needs) against upload under the final name, metadata last (what ``batch.shards`` does on gs://).

Both write the same shards (three objects each: .npy, .ids.jsonl, .json) through etils/gcsfs to a local GCS
emulator (``gcp-storage-emulator``, started here on a free port), side by side in one run. gcsfs renames by
trying the ``moveTo`` API first (the emulator answers 501; gcsfs retries with back-off) and then copy + delete,
so the rename protocol is also what a real bucket without that API costs in requests.

    python benchmarks/gcs_commit.py --shards 3 --out benchmarks/gcs_commit.json
    python benchmarks/doc_tables.py                             # the table in docs/batch-job.md, from that JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rename(path, data: bytes) -> None:
    """The old protocol on gs://: temporary object, then rename (copy + delete)."""
    from embeddinggemma_jax.storage import epath

    p = epath(path)
    tmp = p.parent / f".tmp-{p.name}-bench"
    tmp.write_bytes(data)
    tmp.replace(p)


def write_shards(root: str, n: int, write) -> float:
    from embeddinggemma_jax.batch import shards

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for k in range(n):
        emb = rng.standard_normal((64, 768)).astype(np.float32)
        npy_p, ids_p, meta_p = shards.paths(root, f"00000-{k:07d}")
        a, b = shards.npy_bytes(emb), shards.ids_bytes([f"doc-{i}" for i in range(64)])
        write(npy_p, a)
        write(ids_p, b)
        write(meta_p, json.dumps({"sha256": {"npy": shards.sha256(a), "ids": shards.sha256(b)}}).encode())
    return time.perf_counter() - t0


def table(r: dict) -> str:
    return "\n".join([
        "| commit on gs:// (emulator) | seconds for {shards} shards ({objects_per_shard} objects each) |".format(**r),
        "|---|---|",
        f"| temporary name + rename (copy + delete after `moveTo`) | {r['seconds_rename']} |",
        f"| final name, metadata last (now) | {r['seconds_final_name']} |",
        f"| ratio | {r['speedup']}x |",
        "",
        f"CPU: {r['cpu']}; {r['emulator']}, gcsfs {r['gcsfs']}."])


def blocks(result: Path = Path(__file__).resolve().parent / "gcs_commit.json") -> dict[str, dict[str, str]]:
    return {"batch-job.md": {"GCS_COMMIT": table(json.loads(result.read_text()))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("gcs_commit.json"))
    args = ap.parse_args()
    port = free_port()
    emu = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port",
                            str(port), "--in-memory", "--default-bucket", "bench"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        from embeddinggemma_jax.batch import shards

        direct = write_shards("gs://bench/direct", args.shards, shards.write_atomic)
        rename = write_shards("gs://bench/rename", args.shards, write_rename)
    finally:
        emu.terminate()
        emu.wait(timeout=10)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    result = {"shards": args.shards, "objects_per_shard": 3, "seconds_rename": round(rename, 3),
              "seconds_final_name": round(direct, 3), "speedup": round(rename / direct, 1),
              "cpu": cpu, "emulator": "gcp-storage-emulator (in memory)", "gcsfs": __import__("gcsfs").__version__}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
