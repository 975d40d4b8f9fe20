"""A training run: load the base model, stream pairs, step, evaluate, checkpoint, resume, export.

``output_dir`` holds ``checkpoints/`` (Orbax, keep-N), ``metrics.jsonl`` and, at the end,
``final/`` (a sentence-transformers folder). Starting a run whose ``output_dir`` has checkpoints
resumes from the latest one: parameters, optimiser state, step, RNG and data position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from embeddinggemma_jax.batching import TRAIN_LENGTH_BUCKETS
from embeddinggemma_jax.distributed import Distributed, allgather_ints, barrier, is_primary
from embeddinggemma_jax.head import jit_forward
from embeddinggemma_jax.hub import DEFAULT_MODEL
from embeddinggemma_jax.io_utils import check_local_folder
from embeddinggemma_jax.options import differences, flat_dict, ints, option
from embeddinggemma_jax.prompts import prompt_text
from embeddinggemma_jax.storage import epath, is_object_store
from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.checkpointing import TrainCheckpoints
from embeddinggemma_jax.train.data import BatchEncoder, Fields, PairFile, PairStream, Position
from embeddinggemma_jax.train.eval import (
    MetricsLog,
    PairEvaluator,
    StsEvaluator,
    best_value,
    check_best_metric,
    format_metrics,
)
from embeddinggemma_jax.train.losses import check_matryoshka
from embeddinggemma_jax.train.monitor import Monitor, ProfileWindow, parse_window


@dataclass(frozen=True)
class RunConfig:
    """A training run; every field is a ``train`` flag and a ``--config`` key (``options``)."""

    train_file: str = option(None, "JSONL (or parquet) training pairs (query, positive[, negative]): a file, a glob "
                                   "or gs:// paths", required=True)
    output_dir: str = option(None, "run folder, local or gs://: checkpoints/, metrics.jsonl, final/", required=True)
    model: str = option(DEFAULT_MODEL, "base model folder or hub id")
    train: st.TrainConfig = field(default_factory=st.TrainConfig)
    batch_size: int = option(16, "pairs per global batch, over all devices and hosts (the contrastive batch)")
    max_length: int = option(256, "tokens per text, prompt included (truncated)")
    pad_to_max_length: bool = option(False, "one padded shape (one compilation) instead of length buckets")
    eval_file: str | None = option(None, "JSONL held-out pairs for retrieval metrics")
    eval_every: int = option(0, "evaluate every N steps; 0: only before and after training")
    eval_pairs: int | None = option(None, "use the first N held-out pairs")
    eval_batch_size: int = option(32, "texts per evaluation batch")
    eval_dims: tuple[int, ...] | None = option(None, "dimensions to evaluate (default: the Matryoshka dims)",
                                               parse=ints)
    eval_sts: str | None = option(None, "folder of stsb-LANG-SPLIT.csv files: STS Spearman x 100 at every evaluation")
    eval_sts_split: str = option("dev", "the SPLIT of --eval-sts files")
    eval_languages: str = option("all", "--eval-sts languages, comma-separated, or all")
    eval_sts_prompt: str = option("STS", "prompt name for --eval-sts sentences ('' for none)")
    keep_best: str | None = option(None, "METRIC: export the parameters of the best evaluation to OUTPUT/best "
                                         "(sts: the mean Spearman; sts:LANG; or recall@1, recall@10, mrr@10, ndcg@10 "
                                         "at the largest --eval-dims); OUTPUT/final is always the last step")
    save_every: int = option(100, "checkpoint every N steps")
    keep: int = option(3, "checkpoints to keep")
    log_every: int = option(1, "write metrics.jsonl every N steps")
    fields: Fields = field(default_factory=Fields)
    query_prompt: str = option("query", "prompt name for queries ('' for none)")
    document_prompt: str = option("document", "prompt name for documents ('' for none)")
    export: bool = option(True, "write OUTPUT/final (a sentence-transformers folder) at the end")
    export_dtype: str = option("float32", "dtype of the exported folder", choices=["float32", "bfloat16"])
    stop_after: int | None = option(None, "stop after N steps of this process, as if preempted (resume later)")
    deadline: float | None = option(None, "unix time after which no step starts (a time-boxed job slot); resumable")
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "write TensorBoard event files (every metrics.jsonl value) to OUTPUT/tb")
    wandb: str | None = option(None, "also log to this Weights & Biases project (the wandb extra; "
                                     "WANDB_MODE=offline works with no network)", metavar="PROJECT")
    profile_steps: str | None = option(None, "A:B: trace steps A..B with jax.profiler into OUTPUT/tb/plugins/profile "
                                             "(TensorBoard's profile plugin, XProf)", metavar="A:B")
    distributed: Distributed = field(default_factory=Distributed)

    def __post_init__(self):
        for name in ("train_file", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
        parse_window(self.profile_steps, "--profile-steps")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_loss_input(cfg: st.TrainConfig, fields: Fields, pairs: PairFile) -> None:
    """--loss cosent takes scored pairs (no negatives); mnrl takes no scores: one line otherwise."""
    if cfg.loss == "cosent":
        if fields.score is None:
            raise ValueError("--loss cosent needs each pair's gold score: name its JSONL field with --score-field "
                             "(evaluate sts-to-jsonl writes 'score')")
        if pairs.record(0)[2] is not None:
            raise ValueError(f"{pairs.path} has {fields.negative!r} negatives, which --loss cosent does not use; "
                             "pass --negative-field ''")
    elif fields.score is not None:
        raise ValueError(f"--score-field {fields.score} is for --loss cosent; drop it or pass --loss cosent")


@dataclass(frozen=True)
class Base:
    """What a run keeps of its base model besides the parameters: enough to export a folder."""

    source: Path
    encoder_config: Any
    head_config: Any
    tokenizer: Any
    hf_config: dict | None


def load_base(model: str, cfg: st.TrainConfig) -> tuple[Base, nnx.Module]:
    """The base model (any source ``from_pretrained`` takes): its description and its module, with
    float32 master parameters, computing in ``cfg.dtype``."""
    from embeddinggemma_jax.model import EmbeddingGemma

    m = EmbeddingGemma.from_pretrained(model, dtype=cfg.dtype, param_dtype="float32")
    return Base(m.source, m.encoder_config, m.head_config, m.tokenizer, m.hf_config), m.module


def _save_final(base, state: nnx.State, out_dir, dtype: str):
    """The exported folder; on an object store it is written in a local staging folder and uploaded,
    its marker file last (``storage.upload_folder``)."""
    import tempfile

    from embeddinggemma_jax.export import save_folder

    def save(folder):
        return save_folder(folder, state, base.encoder_config, base.head_config, base.tokenizer.path.parent,
                           dtype=dtype, hf_config=base.hf_config)

    if not is_object_store(out_dir):
        return save(out_dir)
    from embeddinggemma_jax.export import MARKER_FILE
    from embeddinggemma_jax.storage import upload_folder

    with tempfile.TemporaryDirectory(prefix="embeddinggemma-final-") as tmp:
        save(Path(tmp) / "final")
        return upload_folder(Path(tmp) / "final", out_dir, last=MARKER_FILE)


def _is_exported(folder) -> bool:
    """``export.is_exported_folder`` for a local or object-store folder."""
    from embeddinggemma_jax.export import MARKER_FILE, WRITER

    try:
        return WRITER in (json.loads((folder / MARKER_FILE).read_text()).get("__version__") or {})
    except (OSError, ValueError, AttributeError):
        return False


class Run:
    """Everything a run needs, built from a RunConfig; ``fit()`` trains, ``export()`` writes."""

    def __init__(self, rc: RunConfig, mesh=None):
        self.rc = rc
        rc.distributed.start()  # before any device is touched
        cfg = rc.train
        self.base, module = load_base(rc.model, cfg)
        self.folder, self.head = self.base.source, self.base.head_config
        self.dims, self.weights = check_matryoshka(cfg.matryoshka_dims, cfg.matryoshka_weights, self.head.out_features)
        self.t, params = st.make_trainable(module, cfg, mesh)
        del module
        self.tx = st.make_optimizer(cfg)
        self.state, self.shardings = st.init_state(self.t, params, cfg, self.tx)
        st.check_batch(self.t, cfg, rc.batch_size)
        self.rows = self.t.local_rows(rc.batch_size)  # this host's rows of every global batch
        self.step_fn = st.make_train_step(self.t, cfg, self.tx, self.shardings, self.dims, self.weights)
        tok = self.base.tokenizer
        buckets = (rc.max_length,) if rc.pad_to_max_length else TRAIN_LENGTH_BUCKETS
        self.encoder = BatchEncoder(tok, self.head.prompts, rc.max_length, buckets,
                                    rc.query_prompt, rc.document_prompt)
        self.out = epath(rc.output_dir)  # local or gs:// (storage.py)
        self.ckpt = TrainCheckpoints(self.out / "checkpoints", keep=rc.keep)
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=is_primary())
        self.position = Position()
        self.pairs: PairFile | None = None  # read (and validated) by fit or resume, before any step
        self.monitor = Monitor(rc.output_dir, enabled=False)  # fit() opens the writers once it knows the step
        self._forward_jit = jit_forward(self.t.graphdef, prepare=self.t.states, out_shardings=self.t.replicated)
        self.evaluator = None
        if rc.eval_file:
            records = PairFile(rc.eval_file, rc.fields).all_records()
            self.evaluator = PairEvaluator(records, self.encoder, rc.eval_dims or self.dims, rc.eval_batch_size,
                                           rc.eval_pairs)
        self.sts_evaluator, self.last_sts, self.best = None, None, None
        if rc.eval_sts:
            prefix = prompt_text(self.head.prompts, rc.eval_sts_prompt or None, what="--eval-sts-prompt") or ""
            self.sts_evaluator = StsEvaluator(rc.eval_sts, rc.eval_sts_split, rc.eval_languages, self.encoder, prefix,
                                              rc.eval_dims or self.dims, rc.eval_batch_size, rc.eval_pairs)
        if rc.keep_best:
            check_best_metric(rc.keep_best, self.evaluator is not None,
                              None if self.sts_evaluator is None else list(self.sts_evaluator.pairs))

    def _forward(self, params, ids, mask):
        """Embeddings of a host batch (the same on every host): rows split over the mesh when they divide,
        replicated otherwise; the result is replicated, so every host reads it."""
        from jax.sharding import NamedSharding, PartitionSpec

        from embeddinggemma_jax.distributed import place_state

        rows = ids.shape[0]
        spec = PartitionSpec(tuple(self.t.mesh.axis_names)) if rows % self.t.mesh.size == 0 else PartitionSpec()
        ids, mask = place_state((np.asarray(ids), np.asarray(mask)), (NamedSharding(self.t.mesh, spec),) * 2)
        return self._forward_jit(params, ids, mask)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def meta(self) -> dict:
        return {"position": self.position.to_dict(), "base_model": str(self.folder),
                "train_config": self.rc.train.to_dict(), "batch_size": self.rc.batch_size,
                "max_length": self.rc.max_length, "pad_to_max_length": self.rc.pad_to_max_length,
                "train_file": str(self.rc.train_file), **self.run_settings(),
                "metrics_bytes": self.log.size()}

    def run_settings(self) -> dict:
        """What a resume must find unchanged besides the train config (``resume``): the data (the pair
        files and their fingerprint), the prompts as text and the field names."""
        if self.pairs is None:
            self.pairs = PairFile(self.rc.train_file, self.rc.fields)
        pairs = self.pairs
        return {"train_files": [p if is_object_store(p) else os.path.abspath(p) for p in pairs.paths],
                "train_sha256": pairs.sha256,
                "query_prompt": self.encoder.query_prefix, "document_prompt": self.encoder.doc_prefix,
                "fields": dataclasses.asdict(self.rc.fields)}

    def resume(self) -> bool:
        """Restore the latest checkpoint of ``output_dir`` if there is one; refuse, naming it, any setting
        that would change the run: the train config (loss, lr, seed, ...), batch, lengths, base model, pair
        files and their content, prompts, field names."""
        if self.ckpt.latest_step() is None:
            return False
        saved = self.ckpt.read_meta()
        keys = ("batch_size", "max_length", "pad_to_max_length")
        old = dict(flat_dict(st.TrainConfig.from_dict(saved["train_config"])), **{k: saved.get(k) for k in keys})
        mine = dict(flat_dict(self.rc.train), **{k: getattr(self.rc, k) for k in keys})
        if "base_model" in saved:
            old["model"], mine["model"] = saved["base_model"], str(self.folder)
        for k, v in self.run_settings().items():
            if k in saved:  # checkpoints written before a setting was recorded are not held to it
                old[k], mine[k] = saved[k], v
        if old.get("train_sha256") != mine.get("train_sha256") and old.get("train_files") == mine.get("train_files"):
            old["train_sha256"] = f"{old['train_sha256'][:12]}... (the pair files' content changed since)"
            mine["train_sha256"] = mine["train_sha256"][:12] + "..."
        diff = differences(json.loads(json.dumps(old)), json.loads(json.dumps(mine)))
        if diff:
            raise ValueError(f"{self.ckpt.directory} was written with other settings ({'; '.join(diff)}); resume "
                             "with the same settings or use a new --output-dir")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
        self.state, meta = self.ckpt.restore(abstract, self.shardings)
        self.position = Position.from_dict(meta["position"])
        self.log.truncate_after(self.step, meta.get("metrics_bytes"))
        return True

    def check_final(self) -> None:
        """Before the first step: an existing, non-empty ``final/`` (or, with ``--keep-best``, ``best/``) that
        this package did not export, or a ``best.json`` that is not this run's, is refused now, not after
        the whole run, and never replaced."""
        folders = (["final"] if self.rc.export else []) + (["best"] if self.rc.keep_best else [])
        for name in folders:
            folder = self.out / name
            if not folder.exists():
                continue
            if not folder.is_dir():
                raise FileExistsError(f"{folder} exists and is not a folder; move it away")
            if any(folder.iterdir()) and not _is_exported(folder):
                raise FileExistsError(f"{folder} exists and is not a model folder written by embeddinggemma-jax; "
                                      "the run would have to replace it: move it away")
        record = self.out / "best.json"
        if self.rc.keep_best and record.exists():
            try:
                ours = json.loads(record.read_text(encoding="utf-8")).get("metric") == self.rc.keep_best
            except (ValueError, AttributeError, UnicodeDecodeError):
                ours = False
            if not ours or self.ckpt.latest_step() is None:
                raise FileExistsError(f"{record} exists and is not the --keep-best record of this run; move it "
                                      "away or use a new --output-dir")

    def evaluate(self) -> dict | None:
        """Retrieval metrics (``--eval-file``; returned) and STS (``--eval-sts``; ``self.last_sts``) of the
        current parameters, logged with the step; ``--keep-best`` exports them when they are the best."""
        if self.evaluator is None and self.sts_evaluator is None:
            return None
        t0 = time.time()
        forward = lambda ids, mask: self._forward(self.state["params"], ids, mask)  # noqa: E731
        m = self.evaluator.evaluate(forward) if self.evaluator is not None else None
        self.last_sts = self.sts_evaluator.evaluate(forward) if self.sts_evaluator is not None else None
        record = {} if m is None else {"eval": {str(k): v for k, v in m.items()}}
        if self.last_sts is not None:
            record["eval_sts"] = {"mean": self.last_sts["mean"], "mean_by_dimension": self.last_sts["mean_by_dimension"],
                                  **{lang: r["by_dimension"] for lang, r in self.last_sts["results"].items()}}
        self.log.write(step=self.step, **record, eval_seconds=time.time() - t0)
        self.monitor.scalars(self.step, {**record, "eval_seconds": time.time() - t0})
        if self.rc.keep_best:
            self._keep_best(best_value(self.rc.keep_best, m, self.last_sts))
        return m

    def _keep_best(self, value: float) -> None:
        """OUTPUT/best (a sentence-transformers folder) and OUTPUT/best.json hold the best evaluation so far."""
        from embeddinggemma_jax.io_utils import atomic_write_json

        path = self.out / "best.json"
        if self.best is None and path.is_file():  # a resumed run continues its own record
            self.best = json.loads(path.read_text(encoding="utf-8"))
        if self.best is not None and value <= self.best["value"]:
            return
        self.export(self.out / "best")
        self.best = {"metric": self.rc.keep_best, "value": value, "step": self.step}
        if is_primary():
            atomic_write_json(path, self.best)

    def eval_line(self, m: dict | None) -> str:
        parts = [] if m is None else [format_metrics(m)]
        if self.last_sts is not None:
            parts.append(f"sts mean={self.last_sts['mean']:.2f} " + " ".join(
                f"{lang}={r['spearman']:.2f}" for lang, r in self.last_sts["results"].items()))
        return "  ".join(parts)

    def fit(self, say=print) -> dict:
        rc, cfg = self.rc, self.rc.train
        self.check_final()
        self.run_settings()  # reads and validates the pair files before any step
        pairs = self.pairs
        check_loss_input(cfg, rc.fields, pairs)
        resumed = self.resume()
        stream = PairStream(pairs, rc.batch_size, cfg.seed, self.position)
        summary = {"resumed_from": self.step if resumed else None, "eval_before": None, "eval_after": None}
        self.monitor = Monitor(rc.output_dir, rc.tensorboard, rc.wandb, config=json.loads(json.dumps(
            rc.to_dict(), default=str)), resume_step=self.step + 1 if resumed else None, enabled=is_primary(),
            say=say)
        profile = ProfileWindow(parse_window(rc.profile_steps, "--profile-steps"),
                                f"{rc.output_dir.rstrip('/')}/tb", enabled=is_primary())
        if not resumed and (self.evaluator is not None or self.sts_evaluator is not None):
            summary["eval_before"] = self.evaluate()
            summary["eval_sts_before"] = self.last_sts
            say(f"eval @ step 0: {self.eval_line(summary['eval_before'])}")
        from tqdm import tqdm

        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", disable=not rc.progress,
                   dynamic_ncols=True)
        done_here, t_start = 0, time.time()
        busy, logged_at = 0.0, self.step  # step time: reading the batch + the step, averaged since the last log
        while self.step < cfg.total_steps:
            if rc.stop_after is not None and done_here >= rc.stop_after:
                break
            if rc.deadline is not None and time.time() >= rc.deadline:
                bar.write(f"deadline reached after step {self.step}; re-run to resume")
                break
            profile.before(self.step + 1)
            t0 = time.perf_counter()
            with jax.profiler.StepTraceAnnotation("train", step_num=self.step + 1):
                with jax.profiler.TraceAnnotation("data"):
                    batch = self.encoder.encode([stream.next_batch(self.rows) for _ in range(cfg.grad_accum)],
                                                agree=lambda n: list(allgather_ints(n).max(axis=0)))
                with jax.profiler.TraceAnnotation("train_step"):
                    self.state, metrics = self.step_fn(self.state, batch, rc.batch_size)
            self.position = stream.position
            done_here += 1
            s = self.step  # waits for the step
            busy += time.perf_counter() - t0
            profile.after(s, metrics)
            if s % rc.log_every == 0 or s == cfg.total_steps:
                m = {k: float(v) for k, v in metrics.items()}
                m.update(_throughput(busy / max(s - logged_at, 1), batch, rc.batch_size))
                busy, logged_at = 0.0, s
                self.log.write(step=s, **m, epoch=self.position.epoch)
                self.monitor.scalars(s, dict(m, epoch=self.position.epoch))
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            bar.update(1)
            if s % rc.save_every == 0 or s == cfg.total_steps:
                self.ckpt.save(s, self.state, self.meta())
                self.log.flush()
            if rc.eval_every and s % rc.eval_every == 0 and s < cfg.total_steps:
                bar.write(f"eval @ step {s}: {self.eval_line(self.evaluate())}")
        bar.close()
        profile.stop(self.state)  # a window past the last step of this process
        self.ckpt.wait()
        self.log.flush()
        summary["train_seconds"] = time.time() - t_start
        summary["steps_this_run"] = done_here
        if self.step >= cfg.total_steps:
            if self.evaluator is not None or self.sts_evaluator is not None:
                summary["eval_after"] = self.evaluate()
                summary["eval_sts_after"] = self.last_sts
                self.log.flush()
                say(f"eval @ step {self.step}: {self.eval_line(summary['eval_after'])}")
            if self.best is not None:
                summary["best"] = self.best
            if rc.export:
                summary["exported"] = str(self.export(self.out / "final"))
        return summary

    def export(self, out_dir, dtype: str | None = None) -> Path:
        """Process 0 writes the folder (parameters gathered from every host first); the others wait."""
        params = jax.jit(lambda p: p, out_shardings=self.t.replicated)(self.state["params"])
        out = epath(out_dir) if is_object_store(out_dir) else Path(out_dir)
        if is_primary():
            out = _save_final(self.base, self.t.full_state(params), out_dir, dtype or self.rc.export_dtype)
        barrier("train-export")
        return out

    def close(self):
        self.monitor.close()
        self.ckpt.close()


def _throughput(step_seconds: float, batch, batch_size: int) -> dict:
    """Per-step wall time (reading and tokenising the batch, and the step; averaged over the steps since the
    last log; checkpoints and evaluations not included), pairs/s and tokens/s of the
    global batch; tokens are the padded tokens the step computes (queries and documents of every
    accumulated batch)."""
    rows = batch.query_ids.shape[1]  # this process's rows; the global batch has batch_size
    tokens = (batch.query_ids.size + batch.doc_ids.size) * batch_size // rows
    pairs = batch_size * batch.query_ids.shape[0]
    return {"step_seconds": step_seconds, "pairs_per_second": pairs / step_seconds,
            "tokens_per_second": tokens / step_seconds}


def export_checkpoint(output_dir: str | Path, out_dir: str | Path, step: int | None = None,
                      dtype: str = "float32") -> Path:
    """Write a sentence-transformers folder from any checkpoint of a run (default: the latest). A
    non-empty ``out_dir`` that this package did not write is refused before anything is read."""
    from embeddinggemma_jax.export import is_exported_folder
    from embeddinggemma_jax.io_utils import check_replaceable

    check_local_folder(output_dir, "run_dir")
    check_local_folder(out_dir, "out_dir")
    check_replaceable(out_dir, is_exported_folder, "a model folder written by embeddinggemma-jax")
    ckpt = TrainCheckpoints(Path(output_dir) / "checkpoints")
    try:
        meta = ckpt.read_meta(step)
        cfg = st.TrainConfig.from_dict(meta["train_config"])
        base, module = load_base(meta["base_model"], cfg)
        t, params = st.make_trainable(module, cfg)
        tx = st.make_optimizer(cfg)
        abstract, shardings = st.abstract_state(t, params, tx)  # the train state's shapes, as the run saved it
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
        state, _ = ckpt.restore(abstract, shardings, step)
    finally:
        ckpt.close()
    return _save_final(base, t.full_state(state["params"]), out_dir, dtype)
