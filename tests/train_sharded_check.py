"""Run by tests/test_train.py in a subprocess (8 fake CPU devices need XLA_FLAGS before jax is imported):
two train steps on one device and on a (2 data x 4 fsdp) mesh with FSDP rules, results to OUT/out.json."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
from pathlib import Path

import jax
import numpy as np

from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.sharding import make_mesh
from embeddinggemma_jax.testing import make_tiny_folder
from embeddinggemma_jax.tokenize import TextTokenizer
from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.data import BatchEncoder, TextBatch
from embeddinggemma_jax.train.run import load_base

assert jax.device_count() == 8
enc = EncoderConfig.tiny(hidden_size=48, intermediate_size=64, vocab_size=264)
head = HeadConfig.tiny(enc, hidden_features=192)
folder = make_tiny_folder(Path(sys.argv[1]) / "m", seed=1, enc=enc, head=head)
texts = [f"query number {i} about topic {i % 3}" for i in range(8)]
docs = [f"document {i}: the answer concerns topic {i % 3} and item {i}" for i in range(8)]
out = {}
for name, fsdp, mesh in (("single", False, make_mesh((1, 1), jax.devices()[:1])), ("fsdp", True, make_mesh((2, 4)))):
    # adam_eps 1e-6 (not 1e-8): Adam's first steps move a parameter by lr * g / (|g| + eps), a sign
    # function of g when eps is negligible, so a gradient that is zero up to summation-order rounding
    # (which a sharded reduction legitimately changes) flips by 2 * lr. With eps above that rounding the
    # update is smooth in g and the comparison measures the sharded step, not the sign of noise.
    cfg = st.TrainConfig(matryoshka_dims=(40, 16), dtype="float32", total_steps=2, learning_rate=1e-3, fsdp=fsdp,
                         adam_eps=1e-6)
    base, module = load_base(str(folder), cfg)
    head_ = base.head_config
    t, params = st.make_trainable(module, cfg, mesh)
    tx = st.make_optimizer(cfg)
    state, sh = st.init_state(t, params, cfg, tx)
    step = st.make_train_step(t, cfg, tx, sh, (40, 16), (1.0, 1.0))
    tok = TextTokenizer(folder / "tokenizer.json", head_.max_seq_length)
    b = BatchEncoder(tok, head_.prompts, 96, (96,)).encode([TextBatch(texts, docs, None)])
    losses = []
    for _ in range(2):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    p = state["params"]
    specs = {k: str(v.sharding.spec) for k, v in (("gate", p["encoder"]["layers"]["mlp"]["gate_proj"]),
                                                   ("embed", p["encoder"]["embed_tokens"]),
                                                   ("dense1", p["head"]["dense1"]))}
    mu = state["opt_state"][1][0].mu["encoder"]["layers"]["mlp"]["gate_proj"]
    specs["mu_gate"] = str(mu.sharding.spec)
    out[name] = {"losses": losses, "specs": specs,
                 "params": {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v).tolist()
                            for path, v in jax.tree_util.tree_leaves_with_path(p)}}
json.dump(out, open(Path(sys.argv[1]) / "out.json", "w"))
