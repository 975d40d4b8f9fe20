"""Output layout: one shard per work unit, written atomically, committed by its metadata file.

``DIR/shards/NAME.npy``       embeddings [n, d] float32, rows in input order
``DIR/shards/NAME.ids.jsonl`` one JSON id per line, same order
``DIR/shards/NAME.json``      metadata: unit, line range, counts, bad records, sha256 of both files

On a local (or mounted) disk each file goes to a temporary name and is renamed into place. On an
object store (``gs://``) each object is uploaded under its final name: an upload is atomic there (an
object appears whole or not at all) and a rename is a copy plus a delete (gcsfs first tries the
``moveTo`` API), so renaming would cost two more requests per file and buy nothing. Either way the
metadata is written last, so a shard counts as done only when its metadata exists and both checksums
match. A kill at any point leaves either a done shard or one that the next run redoes.

The metadata also holds ``input_sha256``, the fingerprint of the input unit the shard was made from
(``readers.fingerprint``): a rerun redoes a shard whose input changed, and ``verify`` reports it.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

SHARDS = "shards"
TMP_PREFIX = ".tmp-"


def epath(p):
    from embeddinggemma_jax.storage import epath as _ep

    return _ep(p)


def is_local(path) -> bool:
    from embeddinggemma_jax.storage import is_object_store

    return not is_object_store(path)


def write_atomic(path, data: bytes) -> None:
    """Local: a temporary name in the same folder, fsync'd, then renamed. Object store: one upload under
    the final name (atomic per object there; see the module docstring)."""
    if is_local(path):
        from embeddinggemma_jax.io_utils import atomic_write_bytes

        atomic_write_bytes(str(path), data)
        return
    epath(path).write_bytes(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def ids_bytes(ids) -> bytes:
    return "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids).encode("utf-8")


def paths(out_dir, name: str):
    d = epath(out_dir) / SHARDS
    return d / f"{name}.npy", d / f"{name}.ids.jsonl", d / f"{name}.json"


def write_shard(out_dir, name: str, emb: np.ndarray, ids, meta: dict) -> dict:
    npy_p, ids_p, meta_p = paths(out_dir, name)
    a, b = npy_bytes(emb.astype(np.float32)), ids_bytes(ids)
    write_atomic(npy_p, a)
    write_atomic(ids_p, b)
    meta = dict(meta, name=name, records=int(emb.shape[0]), dimensions=int(emb.shape[1]),
                sha256={"npy": sha256(a), "ids": sha256(b)})
    write_atomic(meta_p, (json.dumps(meta, indent=1) + "\n").encode())  # the commit point
    return meta


def read_meta(out_dir, name: str) -> dict | None:
    p = paths(out_dir, name)[2]
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def check_shard(out_dir, name: str, meta: dict | None = None) -> str | None:
    """None when the shard is complete and intact, else what is wrong with it."""
    meta = meta if meta is not None else read_meta(out_dir, name)
    if meta is None:
        return "no metadata (not finished)"
    npy_p, ids_p, _ = paths(out_dir, name)
    for p, key in ((npy_p, "npy"), (ids_p, "ids")):
        if not p.exists():
            return f"{p.name} is missing"
        if sha256(p.read_bytes()) != meta.get("sha256", {}).get(key):
            return f"{p.name} does not match its checksum"
    return None


def load_shard(out_dir, name: str) -> tuple[np.ndarray, list]:
    npy_p, ids_p, _ = paths(out_dir, name)
    emb = np.load(io.BytesIO(npy_p.read_bytes()), allow_pickle=False)
    ids = [json.loads(line) for line in ids_p.read_text(encoding="utf-8").splitlines()]
    return emb, ids


def list_shard_files(out_dir) -> list[str]:
    d = epath(out_dir) / SHARDS
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def remove_temporaries(out_dir) -> int:
    """Leftovers of killed writes (never renamed into place): shards in shards/, and job.json,
    errors.jsonl or manifest.json in the job folder itself (a run killed while finishing)."""
    n = 0
    for d in (epath(out_dir), epath(out_dir) / SHARDS):
        if d.exists():
            for p in d.iterdir():
                if p.name.startswith(TMP_PREFIX) and p.is_file():
                    p.unlink()
                    n += 1
    return n


def load_all(out_dir) -> tuple[list, np.ndarray]:
    """Every (id, embedding) of a finished job, in manifest order (for tests and small outputs)."""
    manifest = json.loads((epath(out_dir) / "manifest.json").read_text())
    ids, embs = [], []
    for s in manifest["shards"]:
        e, i = load_shard(out_dir, s["name"])
        ids += i
        embs.append(e)
    d = manifest["options"]["dimensions"]
    return ids, (np.concatenate(embs) if embs else np.zeros((0, d), np.float32))


__all__ = ["write_shard", "read_meta", "check_shard", "load_shard", "load_all", "write_atomic", "paths",
           "list_shard_files", "remove_temporaries", "SHARDS"]
