"""Atomic file and folder writes: a reader never sees a half-written result."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder next to ``target``; rename it onto ``target`` only on success.

    An exception (or a kill) leaves at most a hidden ``.tmp-<name>-<pid>-*`` folder, never a ``target``
    that looks complete; the next write of the same target removes such leftovers of processes that
    are gone. An existing ``target`` is replaced (callers check first that it may be).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-{os.getpid()}-"))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private; the result is an ordinary folder
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}-{staging.name[-8:]}"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove ``.tmp-<name>-*`` / ``.old-<name>-*`` folders left next to ``target`` by killed writers
    (their process id is in the name; a name without one predates it and is stale too). A live
    writer's staging folder is left alone."""
    target = Path(target)
    removed = []
    for kind in (".tmp-", ".old-"):
        prefix = f"{kind}{target.name}-"
        for p in target.parent.glob(prefix + "*"):
            pid = p.name[len(prefix):].split("-", 1)[0]
            if p.is_dir() and not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def check_local_folder(path: str | os.PathLike | None, flag: str) -> None:
    """Refuse a URL (``gs://...``, any ``scheme://``) where a folder is written through the local filesystem:
    ``Path("gs://b/run")`` would silently become a local folder named ``gs:``."""
    from embeddinggemma_jax.errors import InputError

    text = os.fspath(path) if path is not None else ""
    if "://" in text:
        raise InputError(f"{flag} {text}: this folder is written through the local filesystem, not a "
                         f"{text.split('://', 1)[0]}:// URL; on a pod use a folder every host mounts (Cloud Storage "
                         "FUSE: gcsfuse BUCKET /gcs/BUCKET, then /gcs/BUCKET/run) or a shared disk")


def check_replaceable(out_dir: str | os.PathLike, is_kind, kind: str) -> None:
    """Refuse to replace an existing, non-empty folder that is not of the kind being written: a
    folder of the user's own files is never wiped."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder; choose another output path")
        if any(out_dir.iterdir()) and not is_kind(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not {kind}; refusing to replace it, choose a new folder "
                                  "(or empty it yourself)")


@contextlib.contextmanager
def stdout_for_one_document() -> Iterator[list]:
    """For a command whose standard output is one machine-read document (``--json``): while the body runs,
    file descriptor 1 points at stderr, so what libraries print there (Gloo's "[Gloo] Rank 0 is connected
    to 1 peer ranks" on a multi-process run, in C++, past Python's sys.stdout) lands on stderr. The body
    appends its document's text to the yielded list; it goes to the real stdout once fd 1 is restored."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    texts: list[str] = []
    try:
        yield texts
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    for t in texts:
        sys.stdout.write(t if t.endswith("\n") else t + "\n")
    sys.stdout.flush()


def _read_umask() -> int:
    """The process umask without changing it: Linux reports it in /proc/self/status; elsewhere it is read
    (set and restored) once, here, at import, before any writer thread exists."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK_AT_IMPORT = _read_umask()


def umask() -> int:
    """The process umask. Never sets it: ``os.umask`` is process-wide, and writer and Orbax threads create
    files concurrently."""
    if Path("/proc/self/status").is_file():
        return _read_umask()
    return _UMASK_AT_IMPORT


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that wants a file name (a library's ``save_file``);
    on success the file is fsync'd, given the usual umask-respecting mode (temporary files are created
    private) and renamed onto ``path``. On an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.filename:
            # "No space left on device" alone does not say which disk: name the file being written.
            raise OSError(e.errno, f"{e.strerror} while writing {path}; free space there (the next run "
                                   f"resumes)") from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file object for ``path``, written under a temporary name and renamed into place on success
    (``atomic_path``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def parse_json(data: bytes | str, where: str, expect: type | None = None, hint: str = "fix or replace the file"):
    """``json.loads(data)``; what is not valid JSON (or, with ``expect``, not of that JSON type) is a
    one-line ``FileFormatError`` that starts with ``where`` (a file, or a file and line) and ends with
    ``hint``, what to do."""
    from embeddinggemma_jax.errors import FileFormatError

    try:
        value = json.loads(data)
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); {hint}") from None
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                              f"{hint}") from None
    if expect is not None and not isinstance(value, expect):
        names = {dict: "an object", list: "a list"}
        raise FileFormatError(f"{where} holds a JSON {type(value).__name__}, not {names.get(expect, expect.__name__)}; "
                              f"{hint}")
    return value


def read_json(path: str | os.PathLike, expect: type | None = None):
    """The JSON in ``path`` (see ``parse_json``: errors name the file)."""
    with open(path, "rb") as f:
        return parse_json(f.read(), str(path), expect)
