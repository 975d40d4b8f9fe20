"""Watching a run: TensorBoard event files, Weights & Biases, and ``jax.profiler`` traces.

- ``TensorBoardWriter``: scalars as TensorBoard event files (``RUN/tb/events.out.tfevents.*``), written
  with TensorBoard's own record format and protos (``tensorboard`` package: the writer needs no
  TensorFlow, and the same package is the reader). Files are written through ``etils.epath``, so a
  ``gs://`` run folder works as a local one: a local file is appended to and flushed per logged step; an
  object store cannot append, so there the file's bytes are rewritten whole per flush (one atomic object
  write) and a new file is started every ``ROTATE_BYTES``. A resumed run first writes a
  ``SessionLog(START)`` at the step it resumes at, so TensorBoard drops the steps that the killed run
  logged after its last checkpoint (as ``metrics.jsonl`` drops them).
- ``WandbWriter``: ``wandb.init(project=...)``; the run id is kept in ``RUN/wandb-run-id`` so a resumed run
  continues the same W&B run; ``WANDB_MODE=offline`` writes ``RUN/wandb/offline-run-*`` with no network.
- ``Monitor``: both behind one ``scalars(step, {...})``; only process 0 writes.
- ``StepWindow`` / ``ProfileWindow``: ``A:B`` step ranges and a ``jax.profiler`` trace around them, written
  where TensorBoard's profile plugin and XProf look (``LOGDIR/plugins/profile/<run>/<host>.xplane.pb``).
"""

from __future__ import annotations

import io
import os
import secrets
import socket
import tempfile
import time
from typing import Any, Mapping

from embeddinggemma_jax.errors import InputError

ROTATE_BYTES = 8 << 20


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def epath(path):
    from etils import epath as _epath

    return _epath.Path(os.fspath(path))


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"eval": {768: {"recall@10": x}}} -> {"eval/768/recall@10": x}; numbers only (others dropped by name
    in the caller's record, not here: a non-number is an error)."""
    out = {}
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "/"))
        else:
            out[name] = float(v)
    return out


class TensorBoardWriter:
    """Scalar summaries in TensorBoard's event-file format, local or through ``epath`` (``gs://``)."""

    def __init__(self, logdir, resume_step: int | None = None):
        self.dir = epath(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remote = is_remote(logdir)
        self._open()
        if resume_step:
            from tensorboard.compat.proto.event_pb2 import SessionLog

            # TensorBoard purges every event at a step >= this one that was written before it.
            self._write(step=resume_step, session_log=SessionLog(status=SessionLog.START))
        self.flush()

    def _open(self):
        from tensorboard.summary.writer.record_writer import RecordWriter

        # TensorBoard reads a folder's event files in name order: the microsecond clock first.
        name = f"events.out.tfevents.{time.time_ns() // 1000:016d}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.dir / name
        self._buf = io.BytesIO()  # records not yet on disk (local) / the whole file (remote)
        self._flushed = 0
        self._records = RecordWriter(self._buf)
        self._write(file_version="brain.Event:2")

    def _write(self, **fields):
        from tensorboard.compat.proto.event_pb2 import Event

        self._records.write(Event(wall_time=time.time(), **fields).SerializeToString())

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._write(step=int(step), summary=summary)

    def flush(self) -> None:
        data = self._buf.getvalue()
        if self.remote:
            if len(data) > self._flushed:
                self.path.write_bytes(data)  # one object write: readers see the old or the new file
                self._flushed = len(data)
            if len(data) >= ROTATE_BYTES:
                self._open()
            return
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
        self._buf.seek(0)
        self._buf.truncate()

    def close(self) -> None:
        self.flush()


class WandbWriter:
    """A Weights & Biases run (``wandb`` extra); offline mode (``WANDB_MODE=offline``) needs no network."""

    def __init__(self, project: str, run_dir, config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise InputError("--wandb needs the wandb package: pip install 'embeddinggemma-jax[wandb]'") from None
        id_file = epath(run_dir) / "wandb-run-id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)  # W&B run ids: letters and digits
            epath(run_dir).mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        # W&B keeps its files in a local folder: the run folder when it is local, else a temporary one
        # (its files are synced to W&B, not to the bucket).
        local = os.fspath(run_dir) if not is_remote(run_dir) else tempfile.mkdtemp(prefix="wandb-")
        kw = dict(project=project, id=run_id, resume="allow", dir=local, config=config,
                  name=os.path.basename(os.fspath(run_dir).rstrip("/")))
        self.run = wandb.init(**kw)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=int(step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class Monitor:
    """Every enabled writer behind one call; ``enabled=False`` (not process 0): writes nothing."""

    def __init__(self, run_dir, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, resume_step: int | None = None, enabled: bool = True, say=print):
        self.writers: list = []
        if not enabled:
            return
        if tensorboard:
            try:
                import tensorboard as _  # noqa: F401
            except ImportError:
                say("TensorBoard event files are not written: the tensorboard package is missing; pip install "
                    "'embeddinggemma-jax[tensorboard]' (or pass --no-tensorboard)")
            else:
                self.writers.append(TensorBoardWriter(epath(run_dir) / "tb", resume_step))
        if wandb_project:
            self.writers.append(WandbWriter(wandb_project, run_dir, config))

    def scalars(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        if not self.writers:
            return
        values = flatten(metrics, prefix)
        for w in self.writers:
            w.scalars(step, values)
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


def parse_window(text: str | None, flag: str) -> tuple[int, int] | None:
    """``"A:B"`` -> (A, B), steps A through B (1-based, both included); None -> None."""
    if text is None or text == "":
        return None
    try:
        a, b = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected A:B, the first and last step to profile (e.g. 10:12)") from None
    if not 1 <= a <= b:
        raise InputError(f"{flag} {text!r}: need 1 <= A <= B (steps are counted from 1)")
    return a, b


class ProfileWindow:
    """A ``jax.profiler`` trace around steps ``window[0]..window[1]``: call ``before(n)`` before step ``n``
    runs and ``after(n, result)`` when it is done (``result`` is waited for, so the trace holds its
    device work). The trace goes to ``logdir/plugins/profile/<run>/`` (TensorBoard's profile plugin,
    XProf); a ``gs://`` logdir is traced to a local folder, then copied."""

    def __init__(self, window: tuple[int, int] | None, logdir, enabled: bool = True):
        self.window, self.logdir, self.enabled = window, logdir, enabled and window is not None
        self.active = False
        self._local = None

    def before(self, n: int) -> None:
        import jax

        if self.enabled and not self.active and self.window[0] <= n <= self.window[1]:
            if is_remote(self.logdir):
                self._local = tempfile.mkdtemp(prefix="profile-")
            else:
                os.makedirs(self.logdir, exist_ok=True)
            jax.profiler.start_trace(self._local or os.fspath(self.logdir))
            self.active = True

    def after(self, n: int, result=None) -> None:
        if self.active and n >= self.window[1]:
            self.stop(result)

    def stop(self, result=None) -> None:
        import jax

        if not self.active:
            return
        if result is not None:
            jax.block_until_ready(result)
        jax.profiler.stop_trace()
        self.active = False
        if self._local is not None:
            _copy_tree(self._local, self.logdir)
            self._local = None


def _copy_tree(src: str, dst) -> None:
    import shutil

    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = epath(dst) / rel if rel != "." else epath(dst)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            (target / f).write_bytes(open(os.path.join(root, f), "rb").read())
    shutil.rmtree(src, ignore_errors=True)
