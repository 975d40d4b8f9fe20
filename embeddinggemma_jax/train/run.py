"""A training run: load the base model, stream pairs, step, evaluate, checkpoint, resume, export.

``output_dir`` holds ``checkpoints/`` (Orbax, keep-N), ``metrics.jsonl`` and, at the end,
``final/`` (a sentence-transformers folder). Starting a run whose ``output_dir`` has checkpoints
resumes from the latest one: parameters, optimiser state, step, RNG and data position.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from embeddinggemma_jax import hub
from embeddinggemma_jax.io_utils import read_json
from embeddinggemma_jax.tokenize import TRAIN_LENGTH_BUCKETS, TextTokenizer
from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.checkpointing import TrainCheckpoints
from embeddinggemma_jax.train.data import BatchEncoder, Fields, PairFile, PairStream, Position
from embeddinggemma_jax.train.eval import MetricsLog, PairEvaluator, format_metrics
from embeddinggemma_jax.train.losses import check_matryoshka


@dataclass(frozen=True)
class RunConfig:
    model: str
    train_file: str
    output_dir: str
    train: st.TrainConfig = field(default_factory=st.TrainConfig)
    batch_size: int = 16
    max_length: int = 256
    pad_to_max_length: bool = False  # one shape, one compilation (else lengths round up to buckets)
    eval_file: str | None = None
    eval_every: int = 0  # 0: only before the first and after the last step
    eval_pairs: int | None = None
    eval_batch_size: int = 32
    eval_dims: tuple[int, ...] | None = None  # default: the Matryoshka dims
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    fields: Fields = Fields()
    query_prompt: str = "query"
    document_prompt: str = "document"
    export: bool = True
    export_dtype: str = "float32"
    stop_after: int | None = None  # stop (as if preempted) after this many steps of this process
    deadline: float | None = None  # unix time: take no step after it (a time-boxed job slot); resumable
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_base(model: str, cfg: st.TrainConfig):
    """(folder, enc, head, fp32-parameter module computing in cfg.dtype)."""
    from embeddinggemma_jax.model import abstract_module, read_configs
    from embeddinggemma_jax.weights import load_state

    folder = hub.resolve(model)
    enc, head = read_configs(folder)
    graphdef, abstract = nnx.split(abstract_module(enc, head, cfg.dtype, "float32"))
    module = nnx.merge(graphdef, load_state(folder, abstract, enc, "float32"))
    return folder, enc, head, module


class Run:
    """Everything a run needs, built from a RunConfig; ``fit()`` trains, ``export()`` writes."""

    def __init__(self, rc: RunConfig, mesh=None):
        self.rc = rc
        cfg = rc.train
        self.folder, self.enc, self.head, module = load_base(rc.model, cfg)
        self.dims, self.weights = check_matryoshka(cfg.matryoshka_dims, cfg.matryoshka_weights, self.head.out_features)
        self.t, params = st.make_trainable(module, cfg, mesh)
        del module
        self.tx = st.make_optimizer(cfg)
        self.state, self.shardings = st.init_state(self.t, params, cfg, self.tx)
        self.step_fn = st.make_train_step(self.t, cfg, self.tx, self.shardings, self.dims, self.weights)
        tok = TextTokenizer(self.folder / "tokenizer.json", self.head.max_seq_length, self.enc.pad_token_id,
                            self.enc.eos_token_id)
        buckets = (rc.max_length,) if rc.pad_to_max_length else TRAIN_LENGTH_BUCKETS
        self.encoder = BatchEncoder(tok, self.head.prompts, rc.max_length, buckets,
                                    rc.query_prompt, rc.document_prompt)
        self.out = Path(rc.output_dir)
        self.ckpt = TrainCheckpoints(self.out / "checkpoints", keep=rc.keep)
        self.log = MetricsLog(self.out / "metrics.jsonl")
        self.position = Position()
        self._forward = jax.jit(lambda p, ids, mask: self.t.module(p)(ids, mask))
        self.evaluator = None
        if rc.eval_file:
            records = PairFile(rc.eval_file, rc.fields).all_records()
            self.evaluator = PairEvaluator(records, self.encoder, rc.eval_dims or self.dims, rc.eval_batch_size,
                                           rc.eval_pairs)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def meta(self) -> dict:
        return {"position": self.position.to_dict(), "base_model": str(self.folder),
                "train_config": self.rc.train.to_dict(), "batch_size": self.rc.batch_size,
                "max_length": self.rc.max_length, "pad_to_max_length": self.rc.pad_to_max_length,
                "train_file": str(self.rc.train_file)}

    def resume(self) -> bool:
        """Restore the latest checkpoint of ``output_dir`` if there is one."""
        if self.ckpt.latest_step() is None:
            return False
        saved = self.ckpt.read_meta()
        for key in ("train_config", "batch_size", "max_length", "pad_to_max_length"):
            mine = json.loads(json.dumps(self.meta()[key]))
            if saved.get(key) != mine:
                raise ValueError(f"{self.ckpt.directory} was written with {key}={saved.get(key)}, this run has "
                                 f"{mine}; resume with the same settings or use a new --output-dir")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
        self.state, meta = self.ckpt.restore(abstract, self.shardings)
        self.position = Position.from_dict(meta["position"])
        self.log.truncate_after(self.step)
        return True

    def evaluate(self) -> dict | None:
        if self.evaluator is None:
            return None
        t0 = time.time()
        m = self.evaluator.evaluate(lambda ids, mask: self._forward(self.state["params"], ids, mask))
        self.log.write(step=self.step, eval={str(k): v for k, v in m.items()}, eval_seconds=time.time() - t0)
        return m

    def fit(self, say=print) -> dict:
        rc, cfg = self.rc, self.rc.train
        resumed = self.resume()
        pairs = PairFile(rc.train_file, rc.fields)
        stream = PairStream(pairs, rc.batch_size, cfg.seed, self.position)
        summary = {"resumed_from": self.step if resumed else None, "eval_before": None, "eval_after": None}
        if not resumed and self.evaluator is not None:
            summary["eval_before"] = self.evaluate()
            say(f"eval @ step 0: {format_metrics(summary['eval_before'])}")
        from tqdm import tqdm

        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", disable=not rc.progress,
                   dynamic_ncols=True)
        done_here, t_start = 0, time.time()
        while self.step < cfg.total_steps:
            if rc.stop_after is not None and done_here >= rc.stop_after:
                break
            if rc.deadline is not None and time.time() >= rc.deadline:
                bar.write(f"deadline reached after step {self.step}; re-run to resume")
                break
            batch = self.encoder.encode([stream.next_batch() for _ in range(cfg.grad_accum)])
            self.state, metrics = self.step_fn(self.state, batch)
            self.position = stream.position
            done_here += 1
            s = self.step
            if s % rc.log_every == 0 or s == cfg.total_steps:
                m = {k: float(v) for k, v in metrics.items()}
                self.log.write(step=s, **m, epoch=self.position.epoch)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            bar.update(1)
            if s % rc.save_every == 0 or s == cfg.total_steps:
                self.ckpt.save(s, self.state, self.meta())
            if rc.eval_every and s % rc.eval_every == 0 and s < cfg.total_steps:
                bar.write(f"eval @ step {s}: {format_metrics(self.evaluate())}")
        bar.close()
        self.ckpt.wait()
        summary["train_seconds"] = time.time() - t_start
        summary["steps_this_run"] = done_here
        if self.step >= cfg.total_steps:
            if self.evaluator is not None:
                summary["eval_after"] = self.evaluate()
                say(f"eval @ step {self.step}: {format_metrics(summary['eval_after'])}")
            if rc.export:
                summary["exported"] = str(self.export(self.out / "final"))
        return summary

    def export(self, out_dir, dtype: str | None = None) -> Path:
        from embeddinggemma_jax.export import save_folder

        return save_folder(out_dir, self.t.full_state(self.state["params"]), self.enc, self.head, self.folder,
                           dtype=dtype or self.rc.export_dtype, hf_config=read_json(self.folder / "config.json"))

    def close(self):
        self.ckpt.close()


def export_checkpoint(output_dir: str | Path, out_dir: str | Path, step: int | None = None,
                      dtype: str = "float32") -> Path:
    """Write a sentence-transformers folder from any checkpoint of a run (default: the latest)."""
    ckpt = TrainCheckpoints(Path(output_dir) / "checkpoints")
    try:
        meta = ckpt.read_meta(step)
        cfg = st.TrainConfig.from_dict(meta["train_config"])
        folder, enc, head, module = load_base(meta["base_model"], cfg)
        t, params = st.make_trainable(module, cfg)
        tx = st.make_optimizer(cfg)
        shardings = st.state_shardings(t, params, tx)
        abstract = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                    "step": jax.ShapeDtypeStruct((), np.int32), "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
        state, _ = ckpt.restore(abstract, shardings, step)
    finally:
        ckpt.close()
    from embeddinggemma_jax.export import save_folder

    return save_folder(out_dir, t.full_state(state["params"]), enc, head, folder, dtype=dtype,
                       hf_config=read_json(folder / "config.json"))
