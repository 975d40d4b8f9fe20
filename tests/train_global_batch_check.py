"""Run by tests/test_train.py in a subprocess (8 fake CPU devices need XLA_FLAGS before jax is imported):
loss and gradients of one global batch of 16 pairs + 16 hard negatives on one device, and sharded over
8 devices (data parallel), uncached and cached (mini-batches of 8 = one row per device); to OUT/out.json."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
from pathlib import Path

import jax
import numpy as np

from embeddinggemma_jax.sharding import make_mesh
from embeddinggemma_jax.testing import make_tiny_folder
from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.data import BatchEncoder, TextBatch
from embeddinggemma_jax.train.run import load_base

assert jax.device_count() == 8
folder = make_tiny_folder(Path(sys.argv[1]) / "m", seed=3)
B = 16
queries = [f"query number {i} about topic {i % 5}" for i in range(B)]
docs = [f"document {i}: the answer concerns topic {i % 5} and item {i}" for i in range(B)]
negatives = [f"an unrelated text {i}" for i in range(B)]
out = {}
for name, mesh, kw in (("single", make_mesh((1, 1), jax.devices()[:1]), {}),
                       ("data8", make_mesh((8, 1)), {}),
                       ("data8_cached", make_mesh((8, 1)), {"cached_loss": True, "mini_batch_size": 8})):
    cfg = st.TrainConfig(matryoshka_dims=(40, 16), dtype="float32", **kw)
    base, module = load_base(str(folder), cfg)
    t, params = st.make_trainable(module, cfg, mesh)
    b = BatchEncoder(base.tokenizer, base.head_config.prompts, 64, (64,)).encode([TextBatch(queries, docs, negatives)])
    loss, grads = st.loss_and_grads(t, cfg, params, b, (40, 16), (1.0, 1.0))
    out[name] = {"loss": float(loss), "devices": len(jax.tree.leaves(params)[0].sharding.device_set),
                 "grads": {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v).tolist()
                           for path, v in jax.tree_util.tree_leaves_with_path(grads)}}
json.dump(out, open(Path(sys.argv[1]) / "out.json", "w"))
