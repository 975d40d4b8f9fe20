"""Train state and the jitted train step.

- fp32 master parameters, compute in ``TrainConfig.dtype`` (bf16 by default): the module is built
  with ``dtype=compute, param_dtype=float32`` and every layer casts its weights on use.
- The trainable parameters are a plain nested dict (``State.to_pure_dict``), so the optimiser
  state and the Orbax checkpoint are ordinary pytrees. With ``freeze_embeddings`` the embedding
  table (201M of 308M parameters) is a separate, constant input: it gets no gradient buffer and
  no Adam moments.
- One call = one optimiser update: the batch carries a leading micro-batch axis that a
  ``lax.scan`` accumulates gradients over (so the in-batch negatives are those of a micro-batch,
  as in sentence-transformers with gradient accumulation).
- Jitted on the inference mesh with its logical rules; ``fsdp=True`` uses ``sharding.FSDP_RULES``
  (weights split over the ``fsdp`` axis) and the optimiser moments follow their parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from embeddinggemma_jax import sharding as shd
from embeddinggemma_jax.config import check_dtype
from embeddinggemma_jax.options import floats, ints, option
from embeddinggemma_jax.train.losses import DEFAULT_MATRYOSHKA_DIMS, matryoshka_loss

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
    grad_accum: int = option(1, "micro-batches per optimiser step")
    matryoshka_dims: tuple[int, ...] = option(DEFAULT_MATRYOSHKA_DIMS, "Matryoshka dimensions of the loss",
                                              parse=ints)
    matryoshka_weights: tuple[float, ...] | None = option(None, "loss weight per dimension (default: 1 each)",
                                                          parse=floats)
    scale: float = option(20.0, "cosine-score scale (1 / temperature)")
    freeze_embeddings: bool = option(False, "keep the 201M-parameter embedding table fixed")
    remat: bool = option(True, "recompute layer activations in the backward pass instead of keeping them")
    dtype: str = option("bfloat16", "compute dtype (master parameters are float32)", choices=["bfloat16", "float32"])
    fsdp: bool = option(False, "shard parameters and optimiser state over the fsdp mesh axis")
    mesh_shape: tuple[int, int] | None = option(None, "DATA,FSDP mesh shape (default: all devices on one axis)",
                                                flag="--mesh", parse=ints)
    seed: int = option(0, "data order and RNG seed")

    def __post_init__(self):
        check_dtype(self.dtype)
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule {self.schedule!r} is unknown; use linear, cosine or constant")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
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

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


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

    def module(self, params: dict) -> nnx.Module:
        return nnx.merge(self.graphdef, _with_params(self, params), self.frozen)

    def full_state(self, params: dict) -> nnx.State:
        """The whole parameter State (trainable + frozen), e.g. for ``export.save_folder``."""
        return nnx.state(self.module(params), nnx.Param)

    def batch_sharding(self, shape) -> NamedSharding:
        """[A, B, L]: rows split over the data axes (which must divide the batch)."""
        return NamedSharding(self.mesh, shd.logical_to_spec((None, "activation_batch", "activation_length"), self.rules,
                                                            self.mesh, shape))


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
    put = jax.device_put if place else \
        (lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh))
    params = put(trainable.to_pure_dict(), tr_sh.to_pure_dict())
    frozen = put(frozen, fr_sh) if jax.tree.leaves(frozen) else frozen
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
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(cfg.seed)}
    return jax.device_put(state, shardings), shardings


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


def loss_fn(t: Trainable, cfg: TrainConfig, dims, weights, params, frozen, qi, qm, di, dm):
    module = nnx.merge(t.graphdef, _with_params(t, params), frozen)
    q = module(qi, qm, remat=cfg.remat)  # [B, out] fp32
    d = module(di, dm, remat=cfg.remat)  # [B * (1 + n), out]
    return matryoshka_loss(q, d, dims, weights, cfg.scale)


def _with_params(t: Trainable, params: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, t.template)
    nnx.replace_by_pure_dict(state, params)
    return state


def make_train_step(t: Trainable, cfg: TrainConfig, tx: optax.GradientTransformation, shardings: dict,
                    dims, weights) -> Callable:
    """``step(state, batch_arrays) -> (state, metrics)``; batch arrays are [A, B, L] (A micro-batches)."""
    schedule = make_schedule(cfg)

    def step(state, frozen, qi, qm, di, dm):
        grad_fn = jax.value_and_grad(lambda p, *xs: loss_fn(t, cfg, dims, weights, p, frozen, *xs))

        def micro(acc, xs):
            loss, grads = grad_fn(state["params"], *xs)
            return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        with shd.use_rules(t.mesh, t.rules):
            (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), (qi, qm, di, dm))
        A = qi.shape[0]
        loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        rng, _ = jax.random.split(state["rng"])
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        return new, metrics

    jitted = jax.jit(step, out_shardings=(shardings, t.replicated), donate_argnums=(0,))

    def run(state, batch):
        arrays = [jax.device_put(a, t.batch_sharding(a.shape)) for a in batch.arrays()]
        return jitted(state, t.frozen, *arrays)

    run.jitted = jitted  # (state, frozen, qi, qm, di, dm): what tpu_compile lowers
    return run


def loss_and_grads(t: Trainable, cfg: TrainConfig, params: dict, batch, dims, weights):
    """Loss and gradients of one micro-batch (no update): for parity tests against PyTorch."""
    f = jax.jit(jax.value_and_grad(lambda p, *xs: loss_fn(t, cfg, dims, weights, p, t.frozen, *xs)))
    return f(params, *(a[0] for a in batch.arrays()))
