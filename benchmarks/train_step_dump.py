"""Loss, every gradient, and two full train steps (metrics, parameters) of the tiny model, fp32 and bf16,
cached loss or not, into an npz: run it on two checkouts and compare the files to show that a change to
the train step leaves its results bit for bit (docs/training.md, docs/training-tpu.md).

    PYTHONPATH=CHECKOUT_A python benchmarks/train_step_dump.py /tmp/a.npz
    PYTHONPATH=CHECKOUT_B python benchmarks/train_step_dump.py /tmp/b.npz
    python benchmarks/train_step_dump.py --compare /tmp/a.npz /tmp/b.npz
"""
import sys
import numpy as np
import jax
from pathlib import Path
from embeddinggemma_jax.testing import make_tiny_folder
from embeddinggemma_jax.train import step as st
from embeddinggemma_jax.train.run import load_base
from embeddinggemma_jax.train.data import BatchEncoder, TextBatch
from embeddinggemma_jax.batching import TRAIN_LENGTH_BUCKETS

if sys.argv[1] == "--compare":
    a, b = np.load(sys.argv[2]), np.load(sys.argv[3])
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    bad = [k for k in a if not np.array_equal(a[k], b[k])]
    print(f"{len(a)} arrays; {len(bad)} differ" + (f": {bad[:10]}" if bad else " (bit for bit equal)"))
    sys.exit(1 if bad else 0)
out = sys.argv[1]
folder = make_tiny_folder(Path("/tmp/step-dump-tiny") / "model", seed=0) if not Path("/tmp/step-dump-tiny/model").exists() else Path("/tmp/step-dump-tiny/model")
res = {}
rng = np.random.default_rng(0)
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
qs = [" ".join(rng.choice(words, rng.integers(2, 12))) for _ in range(8)]
ds = [" ".join(rng.choice(words, rng.integers(2, 20))) for _ in range(8)]
for dtype in ("float32", "bfloat16"):
    for cached in (False, True):
        cfg = st.TrainConfig(dtype=dtype, cached_loss=cached, mini_batch_size=4 if cached else None,
                             matryoshka_dims=(40, 16), learning_rate=1e-3, total_steps=3)
        base, module = load_base(str(folder), cfg)
        t, params = st.make_trainable(module, cfg)
        tx = st.make_optimizer(cfg)
        state, sh = st.init_state(t, params, cfg, tx)
        enc = BatchEncoder(base.tokenizer, base.head_config.prompts, 64, TRAIN_LENGTH_BUCKETS, "query", "document")
        batch = enc.encode([TextBatch(qs, ds, None)])
        loss, grads = st.loss_and_grads(t, cfg, params, batch, (40, 16), (1.0, 1.0))
        key = f"{dtype}-{'cached' if cached else 'plain'}"
        res[key + "/loss"] = np.asarray(loss)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            res[key + "/grad" + jax.tree_util.keystr(path)] = np.asarray(g, np.float32)
        fn = st.make_train_step(t, cfg, tx, sh, (40, 16), (1.0, 1.0))
        for i in range(2):
            state, m = fn(state, batch)
        for k, v in m.items():
            res[key + "/step2/" + k] = np.asarray(v)
        for path, p in jax.tree_util.tree_leaves_with_path(state["params"]):
            res[key + "/params" + jax.tree_util.keystr(path)] = np.asarray(p, np.float32)
np.savez(out, **res)
print(len(res))
