"""Paths that may be local or on an object store (``gs://``): one home for reaching them.

``epath(p)`` is ``etils.epath.Path(p)`` after ``prepare_object_store()``, which makes the three GCS
clients this package uses (gcsfs under etils for files, TensorStore under Orbax for checkpoint arrays)
reach a local GCS emulator from ``STORAGE_EMULATOR_HOST`` alone, the variable gcsfs and Google's own
clients honour. With that variable set, and only then, it sets in this process (never over a value the
user set):

- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs otherwise asks every bucket for its layout over
  gRPC first, which the emulator does not speak: a 60 s timeout per file system instance. The emulator
  has no zonal or hierarchical buckets to find, so nothing is lost.
- ``TENSORSTORE_GCS_HTTP_URL``: TensorStore ignores ``STORAGE_EMULATOR_HOST`` and has its own endpoint
  variable.
- ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: TensorStore otherwise looks for Google credentials and then waits on
  the GCE metadata server, which does not exist off Google Cloud (it hangs); the emulator checks no token.

``is_object_store(p)``: a ``scheme://`` path (gs://, s3://): uploads are atomic per object and rename is
copy + delete, so writers put each object under its final name instead of renaming (``batch.shards``).
"""

from __future__ import annotations

import os
import sys

EMULATOR = "STORAGE_EMULATOR_HOST"


def prepare_object_store() -> None:
    host = os.environ.get(EMULATOR)
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url.rstrip("/"))
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "storage-emulator")
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"].lower() in ("false", "0"):
        # gcsfs read the variable when it was imported (before this call): register its plain file system
        from gcsfs.core import GCSFileSystem

        if gcsfs.GCSFileSystem is not GCSFileSystem:
            import fsspec

            for protocol in ("gs", "gcs"):
                fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)


def is_object_store(path) -> bool:
    return "://" in str(path)


def epath(p):
    from etils import epath as _ep

    if is_object_store(p):
        prepare_object_store()
    return _ep.Path(p)


def upload_folder(local, remote: str, last: str):
    """Copy the local folder ``local`` to the object-store folder ``remote``, each file one atomic upload
    under its final name, ``last`` (the file whose presence says the folder is complete) after all the
    others. What ``remote`` held is deleted first, ``last`` before anything else, so a kill midway
    leaves no folder that looks complete."""
    from pathlib import Path

    dst = epath(remote)
    if dst.exists():
        if (dst / last).exists():
            (dst / last).unlink()
        dst.rmtree()
    files = sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: p.name == last)
    for p in files:
        target = dst / p.relative_to(local).as_posix()
        target.write_bytes(p.read_bytes())
    return dst


__all__ = ["upload_folder", "epath", "is_object_store", "prepare_object_store", "EMULATOR"]
