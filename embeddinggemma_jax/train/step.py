"""Train state and the jitted train step.

- fp32 master parameters, compute in ``TrainConfig.dtype`` (bf16 by default): the module is built
  with ``dtype=compute, param_dtype=float32`` and every layer casts its weights on use.
- The trainable parameters are a plain nested dict (``State.to_pure_dict``), so the optimiser
  state and the Orbax checkpoint are ordinary pytrees. With ``freeze_embeddings`` the embedding
  table (201M of 308M parameters) is a separate, constant input: it gets no gradient buffer and
  no Adam moments.
- One call = one optimiser update: the batch carries a leading axis of ``grad_accum`` global batches
  that a ``lax.scan`` accumulates gradients over. Each global batch is one contrastive batch: it is
  sharded over every device of the mesh (all hosts), and every document of it is a negative for every
  query (the score matrix is [B, B * (1 + n)] over the global batch; XLA gathers the embeddings).
- ``cached_loss`` (GradCache, as sentence-transformers' ``CachedMultipleNegativesRankingLoss``): the
  embeddings of a global batch are computed in ``mini_batch_size`` rows at a time without keeping
  activations, the loss and its gradient with respect to the embeddings once over the whole batch,
  then each mini-batch is re-run under ``jax.vjp`` with its slice of that gradient. Activation memory
  is that of one mini-batch; the contrastive batch is the whole global batch.
- Jitted on the inference mesh with its logical rules; ``fsdp=True`` uses ``sharding.FSDP_RULES``
  (weights split over the ``fsdp`` axis) and the optimiser moments follow their parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from embeddinggemma_jax.head import make_forward
from embeddinggemma_jax import sharding as shd
from embeddinggemma_jax.config import check_dtype
from embeddinggemma_jax.distributed import place_state
from embeddinggemma_jax.options import floats, ints, option
from embeddinggemma_jax.train.losses import DEFAULT_MATRYOSHKA_DIMS, matryoshka_cosent_loss, matryoshka_loss

EMBEDDING_FILTER = nnx.PathContains("embed_tokens")


@dataclass(frozen=True)
class TrainConfig:
    """What the train step and the optimiser need; each field is also a ``train`` flag (``options``)."""

    learning_rate: float = option(2e-5, "peak learning rate", flag="--lr")
    warmup_steps: int = option(0, "linear warm-up steps")
    total_steps: int = option(1000, "optimiser steps in total (the schedule decays to end_lr_ratio * lr here)",
                              flag="--steps")
    schedule: str = option("linear", "learning-rate decay after warm-up", choices=["linear", "cosine", "constant"])
    end_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to norm scales, as transformers' Trainer)")
    adam_b1: float = option(0.9, "Adam beta1")
    adam_b2: float = option(0.999, "Adam beta2")
    adam_eps: float = option(1e-8, "Adam epsilon")
    max_grad_norm: float | None = option(1.0, "global-norm gradient clipping; 0 disables")
    grad_accum: int = option(1, "global batches per optimiser step (each its own contrastive batch)")
    loss: str = option("mnrl", "mnrl: in-batch negatives (MultipleNegativesRankingLoss); cosent: pairs with a gold "
                               "score (CoSENTLoss, needs --score-field); both Matryoshka-wrapped",
                       choices=["mnrl", "cosent"])
    cached_loss: bool = option(False, "GradCache: embed the batch in mini-batches without activations, so the "
                                      "contrastive batch can exceed what fits in memory")
    mini_batch_size: int | None = option(None, "rows (queries, and documents per query column) per forward pass "
                                               "with --cached-loss; a multiple of the data-parallel device count")
    matryoshka_dims: tuple[int, ...] = option(DEFAULT_MATRYOSHKA_DIMS, "Matryoshka dimensions of the loss",
                                              parse=ints)
    matryoshka_weights: tuple[float, ...] | None = option(None, "loss weight per dimension (default: 1 each)",
                                                          parse=floats)
    scale: float = option(20.0, "cosine-score scale (1 / temperature)")
    freeze_embeddings: bool = option(False, "keep the 201M-parameter embedding table fixed")
    remat: bool = option(True, "recompute layer activations in the backward pass instead of keeping them")
    remat_policy: str = option("full", "with remat: full recomputes each layer's forward; dots keeps the weight "
                                       "matmuls' outputs and recomputes the rest (more memory, less time)",
                               choices=["full", "dots"])
    attention: str = option("xla", "attention kernel of the train step: xla, or splash (TPU; Pallas splash "
                                   "attention with its backward kernels, and the fused q/k norm + RoPE pass; "
                                   "interpret mode off a TPU)", choices=["xla", "splash"])
    dtype: str = option("bfloat16", "compute dtype (master parameters are float32)", choices=["bfloat16", "float32"])
    fsdp: bool = option(False, "shard parameters and optimiser state over the fsdp mesh axis")
    mesh_shape: tuple[int, int] | None = option(None, "DATA,FSDP mesh shape (default: all devices on one axis)",
                                                flag="--mesh", parse=ints)
    seed: int = option(0, "data order and RNG seed")

    def __post_init__(self):
        check_dtype(self.dtype)
        if self.attention not in ("xla", "splash"):
            raise ValueError(f"attention {self.attention!r} is unknown; use xla or splash")
        if self.remat_policy not in ("full", "dots"):
            raise ValueError(f"remat_policy {self.remat_policy!r} is unknown; use full or dots")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule {self.schedule!r} is unknown; use linear, cosine or constant")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.loss not in ("mnrl", "cosent"):
            raise ValueError(f"loss {self.loss!r} is unknown; use mnrl or cosent")
        if self.loss == "cosent" and self.cached_loss:
            raise ValueError("--cached-loss works with --loss mnrl only; drop --cached-loss for --loss cosent")
        if self.cached_loss and (self.mini_batch_size is None or self.mini_batch_size < 1):
            raise ValueError("--cached-loss needs --mini-batch-size M (rows per forward pass, e.g. 32)")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        for k in ("matryoshka_dims", "matryoshka_weights", "mesh_shape"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})



def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    lr, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    warm = optax.linear_schedule(0.0, lr, max(cfg.warmup_steps, 1))
    rest = max(cfg.total_steps - cfg.warmup_steps, 1)
    decay = {"linear": optax.linear_schedule(lr, end, rest),
             "cosine": optax.cosine_decay_schedule(lr, rest, alpha=cfg.end_lr_ratio),
             "constant": optax.constant_schedule(lr)}[cfg.schedule]
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([warm, decay], [cfg.warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only: norm offsets (1-D per layer) are left alone."""
    return jax.tree_util.tree_map_with_path(lambda p, _: str(getattr(p[-1], "key", p[-1])) != "scale", params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def split_params(module: nnx.Module, freeze_embeddings: bool):
    """(graphdef, trainable State, frozen State)."""
    if freeze_embeddings:
        return nnx.split(module, nnx.All(nnx.Param, nnx.Not(EMBEDDING_FILTER)), ...)
    return nnx.split(module, nnx.Param, ...)


@dataclass
class Trainable:
    """A model cut into what the optimiser updates and what it does not, on a mesh."""

    graphdef: Any
    template: nnx.State  # abstract trainable State: structure for merging a pure-dict back in
    frozen: nnx.State
    mesh: Mesh
    rules: tuple
    param_shardings: dict  # pure dict of NamedSharding, like the trainable parameters
    frozen_shardings: nnx.State

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def states(self, params: dict, frozen: nnx.State | None = None) -> tuple[nnx.State, nnx.State]:
        """What ``nnx.merge(graphdef, ...)`` takes for the module with these trainable ``params``."""
        return _with_params(self, params), self.frozen if frozen is None else frozen

    def module(self, params: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, *self.states(params))

    def full_state(self, params: dict) -> nnx.State:
        """The whole parameter State (trainable + frozen), e.g. for ``export.save_folder``."""
        return nnx.state(self.module(params), nnx.Param)

    def batch_sharding(self, shape) -> NamedSharding:
        """[A, B, L] queries or [A, C, B, L] documents (C columns: positives, then hard negatives): the B
        rows split over the data axes (which must divide the batch)."""
        names = (None, "activation_batch", "activation_length")
        if len(shape) == 4:
            names = (None, None) + names[1:]
        return NamedSharding(self.mesh, shd.logical_to_spec(names, self.rules, self.mesh, shape))

    def local_rows(self, batch_size: int) -> tuple[int, int]:
        """[start, stop) of the global batch's rows that this process's devices hold: all that it reads."""
        idx = self.batch_sharding((1, batch_size, 1)).addressable_devices_indices_map((1, batch_size, 1))
        spans = sorted({(s[1].start or 0, batch_size if s[1].stop is None else s[1].stop) for s in idx.values()})
        start, stop = spans[0][0], spans[-1][1]
        if sum(b - a for a, b in spans) != stop - start:
            raise ValueError(f"this process's devices hold rows {spans} of the batch, not one contiguous block; "
                             "use a mesh whose data axes follow jax.devices() (the default)")
        return start, stop

    def place_batch(self, batch, batch_size: int) -> list[jax.Array]:
        """This process's rows of a global batch (``TokenBatch`` of rows ``local_rows``) -> global arrays:
        queries [A, B, L], documents [A, C, B, L]. One process: its rows are the whole batch."""
        start, stop = self.local_rows(batch_size)
        qi, qm, di, dm = batch.arrays()
        A, b = qi.shape[:2]
        if b != stop - start:
            raise ValueError(f"this process holds rows {start}..{stop} of the batch but was given {b} rows")
        out = []
        for x in (qi, qm, di.reshape(A, -1, b, di.shape[-1]), dm.reshape(A, -1, b, dm.shape[-1])):
            # documents: rows are column-major (positives, then each negative column): [A, C, rows, L]
            shape = x.shape[:-2] + (batch_size, x.shape[-1])
            out.append(jax.make_array_from_process_local_data(self.batch_sharding(shape), x, shape))
        if getattr(batch, "scores", None) is not None:  # [A, rows] gold scores (--loss cosent)
            shape = (A, batch_size)
            spec = self.batch_sharding((A, batch_size, 1)).spec[:2]
            out.append(jax.make_array_from_process_local_data(NamedSharding(self.mesh, PartitionSpec(*spec)),
                                                              np.asarray(batch.scores, np.float32), shape))
        return out


def make_trainable(module: nnx.Module, cfg: TrainConfig, mesh: Mesh | None = None,
                   place: bool = True) -> tuple[Trainable, dict]:
    """Split ``module`` (built with fp32 params), place it on the mesh; returns (Trainable, params).
    ``place=False``: parameters stay abstract (``ShapeDtypeStruct``s with their shardings), for
    compiling the step for devices that are not there (``tpu_compile``)."""
    if mesh is None:
        n = jax.device_count()
        mesh = shd.make_mesh(cfg.mesh_shape or ((1, n) if cfg.fsdp else (n, 1)))
    rules = shd.FSDP_RULES if cfg.fsdp else shd.DATA_PARALLEL_RULES
    graphdef, trainable, frozen = split_params(module, cfg.freeze_embeddings)
    tr_sh = shd.state_shardings(trainable, mesh, rules)
    fr_sh = shd.state_shardings(frozen, mesh, rules) if jax.tree.leaves(frozen) else frozen
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    if place:
        params = place_state(trainable.to_pure_dict(), tr_sh.to_pure_dict())  # works across hosts
        frozen = place_state(frozen, fr_sh) if jax.tree.leaves(frozen) else frozen
    else:
        def abstract(tree, sh):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

        params = abstract(trainable.to_pure_dict(), tr_sh.to_pure_dict())
        frozen = abstract(frozen, fr_sh) if jax.tree.leaves(frozen) else frozen
    t = Trainable(graphdef, template, frozen, mesh, tuple(rules), tr_sh.to_pure_dict(), fr_sh)
    return t, params


def _like_params(tree, params_struct, params_shardings, replicated):
    """Shardings for an optimiser state: subtrees shaped like the parameters follow them."""
    if jax.tree.structure(tree) == params_struct:
        return params_shardings
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_like_params(x, params_struct, params_shardings, replicated) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_like_params(x, params_struct, params_shardings, replicated) for x in tree)
    if isinstance(tree, dict):
        return {k: _like_params(v, params_struct, params_shardings, replicated) for k, v in tree.items()}
    return jax.tree.map(lambda _: replicated, tree)


def init_state(t: Trainable, params: dict, cfg: TrainConfig, tx: optax.GradientTransformation):
    """{"params", "opt_state", "step", "rng"} on the mesh, and its sharding tree."""
    shardings = state_shardings(t, params, tx)
    rest = jax.jit(lambda p: {"opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32),
                              "rng": jax.random.PRNGKey(cfg.seed)},
                   out_shardings={k: shardings[k] for k in ("opt_state", "step", "rng")})(params)
    return dict(params=params, **rest), shardings


def abstract_state(t: Trainable, params: dict, tx: optax.GradientTransformation):
    """``init_state``'s result as ``ShapeDtypeStruct``s with their shardings (nothing computed)."""
    shardings = state_shardings(t, params, tx)
    shapes = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings), shardings


def state_shardings(t: Trainable, params: dict, tx: optax.GradientTransformation) -> dict:
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = _like_params(abstract_opt, jax.tree.structure(params), t.param_shardings, t.replicated)
    return {"params": t.param_shardings, "opt_state": opt_sh, "step": t.replicated, "rng": t.replicated}


def _embed(t: Trainable, cfg: TrainConfig, params, frozen, ids, mask, remat: bool):
    remat = cfg.remat_policy if remat and cfg.remat_policy != "full" else remat
    forward = make_forward(t.graphdef, prepare=lambda p: t.states(p, frozen), impl=cfg.attention, remat=remat)
    return forward(params, ids, mask)  # [rows, out] fp32


def loss_fn(t: Trainable, cfg: TrainConfig, dims, weights, params, frozen, qi, qm, di, dm, scores=None):
    # Profile names (HLO op metadata only): "forward/...", and under value_and_grad the backward pass's
    # ops are JAX's "transpose(jvp(forward))/...".
    with jax.named_scope("forward"):
        q = _embed(t, cfg, params, frozen, qi, qm, cfg.remat)  # [B, out] fp32
        d = _embed(t, cfg, params, frozen, di, dm, cfg.remat)  # [B * (1 + n), out]
        if cfg.loss == "cosent":  # scores [B]: the gold score of pair (query i, document i)
            return matryoshka_cosent_loss(q, d[:q.shape[0]], scores, dims, weights, cfg.scale)
        return matryoshka_loss(q, d, dims, weights, cfg.scale)


def _chunks(x: jax.Array, n: int) -> jax.Array:
    """[R, ...] -> [n, R // n, ...]; chunk c holds rows c, n + c, 2n + c, ... so that each chunk is spread
    evenly over the devices that hold contiguous blocks of R (no data moves between devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
    """The inverse of ``_chunks``: [n, m, ...] -> [n * m, ...] in the original row order."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def cached_loss_and_grads(t: Trainable, cfg: TrainConfig, dims, weights, params, frozen, qi, qm, di, dm):
    """GradCache: equal (up to summation order) to ``value_and_grad(loss_fn)`` over the whole batch, with
    the activations of one mini-batch of ``cfg.mini_batch_size`` queries at a time."""
    B, M = qi.shape[0], cfg.mini_batch_size
    n = B // M  # the caller checked B % M == 0; documents: B * (1 + negatives) rows, n chunks likewise

    def embed_all(ids, mask):  # pass 1: no gradient, no activations kept
        def body(_, xs):
            return None, _embed(t, cfg, jax.lax.stop_gradient(params), frozen, *xs, remat=False)
        return _unchunk(jax.lax.scan(body, None, (_chunks(ids, n), _chunks(mask, n)))[1])

    with jax.named_scope("cached_embed_pass"):
        q, d = embed_all(qi, qm), embed_all(di, dm)
    with jax.named_scope("cached_loss"):
        loss, (gq, gd) = jax.value_and_grad(lambda a, b: matryoshka_loss(a, b, dims, weights, cfg.scale),
                                            argnums=(0, 1))(q, d)

    def back(acc, xs):  # pass 2: each mini-batch again, its embeddings' gradient pulled back to the params
        ids, mask, g = xs
        _, vjp = jax.vjp(lambda p: _embed(t, cfg, p, frozen, ids, mask, cfg.remat), params)
        return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

    grads = jax.tree.map(jnp.zeros_like, params)
    with jax.named_scope("cached_backward_pass"):
        for ids, mask, g in ((qi, qm, gq), (di, dm, gd)):
            grads, _ = jax.lax.scan(back, grads, (_chunks(ids, n), _chunks(mask, n), _chunks(g, n)))
    return loss, grads


def check_batch(t: Trainable, cfg: TrainConfig, batch_size: int) -> None:
    """A global batch the mesh and the mini-batch size divide (a one-line error otherwise)."""
    data = t.mesh.size
    if batch_size % data:
        raise ValueError(f"--batch-size {batch_size} is not a multiple of the {data} devices it is split over; "
                         f"use a multiple of {data}")
    if cfg.cached_loss:
        M = cfg.mini_batch_size
        if batch_size % M or M % data:
            raise ValueError(f"--mini-batch-size {M} must divide --batch-size {batch_size} and be a multiple of the "
                             f"{data} devices each mini-batch is split over")


def _value_and_grad(t: Trainable, cfg: TrainConfig, dims, weights, frozen) -> Callable:
    """(params, qi, qm, di, dm) -> (loss, grads) of one global batch, cached or not; documents come in
    as [C, B, L] (``place_batch``) and are scored as the C * B rows positives-then-negatives."""
    if cfg.cached_loss:
        f = lambda p, *xs: cached_loss_and_grads(t, cfg, dims, weights, p, frozen, *xs)  # noqa: E731
    else:
        f = jax.value_and_grad(lambda p, *xs: loss_fn(t, cfg, dims, weights, p, frozen, *xs))
    return lambda p, qi, qm, di, dm, *scores: f(p, qi, qm, di.reshape(-1, di.shape[-1]), dm.reshape(-1, dm.shape[-1]),
                                                *scores)


def _with_params(t: Trainable, params: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, t.template)
    nnx.replace_by_pure_dict(state, params)
    return state


def jitted_train_step(t: Trainable, cfg: TrainConfig, tx: optax.GradientTransformation, shardings: dict,
                      dims, weights) -> Callable:
    """The jitted step as a plain function ``(state, frozen, qi, qm, di, dm) -> (state, metrics)``: queries
    [A, B, L] int32, documents [A, C, B, L] (A global batches per update, C = 1 + hard negatives). It takes
    arrays or ``jax.ShapeDtypeStruct``s with shardings, so ``.lower(...).compile()`` gives its memory plan
    for any topology without data (``shardings`` from ``state_shardings``, documents' from
    ``Trainable.batch_sharding``)."""
    schedule = make_schedule(cfg)

    def step(state, frozen, qi, qm, di, dm, *scores):  # scores [A, B]: --loss cosent only
        grad_fn = _value_and_grad(t, cfg, dims, weights, frozen)

        def micro(acc, xs):
            loss, grads = grad_fn(state["params"], *xs)
            return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        with shd.use_rules(t.mesh, t.rules):
            (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), (qi, qm, di, dm, *scores))
        A = qi.shape[0]
        loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        rng, _ = jax.random.split(state["rng"])
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        return new, metrics

    return jax.jit(step, out_shardings=(shardings, t.replicated), donate_argnums=(0,))


def make_train_step(t: Trainable, cfg: TrainConfig, tx: optax.GradientTransformation, shardings: dict,
                    dims, weights) -> Callable:
    """``step(state, local TokenBatch, global batch size) -> (state, metrics)``."""
    jitted = jitted_train_step(t, cfg, tx, shardings, dims, weights)

    def run(state, batch, batch_size: int | None = None):
        """``batch``: this process's rows (``Trainable.local_rows``) of a global batch of ``batch_size``
        pairs (default: the rows given, i.e. one process)."""
        batch_size = batch_size or batch.query_ids.shape[1]
        check_batch(t, cfg, batch_size)
        with jax.profiler.TraceAnnotation("place_batch"):
            arrays = t.place_batch(batch, batch_size)
        return jitted(state, t.frozen, *arrays)

    return run


def loss_and_grads(t: Trainable, cfg: TrainConfig, params: dict, batch, dims, weights, batch_size: int | None = None):
    """Loss and gradients of the first global batch of ``batch`` (no update), sharded over the mesh
    as the train step shards it, cached or not per ``cfg``: for parity tests."""
    batch_size = batch_size or batch.query_ids.shape[1]
    check_batch(t, cfg, batch_size)

    def f(p, *xs):
        with shd.use_rules(t.mesh, t.rules):
            return _value_and_grad(t, cfg, dims, weights, t.frozen)(p, *(x[0] for x in xs))

    arrays = t.place_batch(batch, batch_size)
    return jax.jit(f, out_shardings=(t.replicated, t.param_shardings))(params, *arrays)
