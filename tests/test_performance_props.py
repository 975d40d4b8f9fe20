"""Performance properties that do not depend on timing (timings live in ``benchmarks/``).

- Sliding-window layers cost FLOPs linear in length; full-attention layers stay dense.
- The compiled program does not grow with depth (layers run under ``lax.scan``).
- The persistent compilation cache is written by one process and hit by the next.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core

from embeddinggemma_jax import attention
from embeddinggemma_jax.config import EncoderConfig

REPO = Path(__file__).resolve().parents[1]


def _matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general in a jaxpr, loops counted once per trip.

    (XLA's cost_analysis counts a while-loop body once, and the XLA attention path runs its query
    chunks under ``lax.map``.)"""
    import math

    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        trips = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        subs = [j for v in eqn.params.values() for j in (v if isinstance(v, (tuple, list)) else (v,))
                if isinstance(j, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
        sub_flops = [_matmul_flops(getattr(j, "jaxpr", j)) for j in subs]
        if eqn.primitive.name == "cond":
            total += max(sub_flops)
        else:
            total += trips * sum(sub_flops)
    return total


def _attention_flops(L: int, radius: int | None) -> float:
    """Matmul FLOPs of one attention call at the real model's head sizes."""
    q = jax.ShapeDtypeStruct((1, L, 1, 3, 256), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, L, 1, 256), jnp.float32)
    valid = jax.ShapeDtypeStruct((1, L), jnp.bool_)
    jaxpr = jax.make_jaxpr(lambda q, k, v, m: attention.attend(q, k, v, m, radius, jnp.float32, "xla"))(
        q, kv, kv, valid)
    return _matmul_flops(jaxpr.jaxpr)


def test_sliding_layers_cost_linear_in_length_full_layers_quadratic():
    radius = 256  # EmbeddingGemma's: sliding_window 512
    local = {L: _attention_flops(L, radius) for L in (1024, 2048, 4096)}
    dense = {L: _attention_flops(L, None) for L in (1024, 2048, 4096)}
    # Exact counts: two [Q, 256] x [256, keys] products per query row (3 heads share one kv head).
    assert dense[2048] == 2 * 2 * (3 * 2048) * 256 * 2048
    assert local[2048] == 2 * 2 * (3 * 2048) * 256 * 768  # 256-query blocks see 768 keys
    for a, b in ((1024, 2048), (2048, 4096)):
        assert local[b] / local[a] == pytest.approx(2.0, rel=0.05), local
        assert dense[b] / dense[a] == pytest.approx(4.0, rel=0.05), dense
    # At 2048 tokens a sliding layer does at most ~40% of a dense layer's attention work.
    assert local[2048] < 0.4 * dense[2048], (local, dense)
    # ... and never computes the L x L score matrix: its largest score block is [C, W].
    q = jax.ShapeDtypeStruct((1, 4096, 1, 3, 256), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 4096, 1, 256), jnp.float32)
    hlo = jax.jit(lambda q, k, v, m: attention.attend(q, k, v, m, radius, jnp.float32, "xla")).lower(
        q, kv, kv, jax.ShapeDtypeStruct((1, 4096), jnp.bool_)).as_text()
    assert "4096,4096" not in hlo.replace(" ", "")


def _encoder_program(num_layers: int) -> str:
    from flax import nnx

    from embeddinggemma_jax.encoder import Encoder

    cfg = EncoderConfig.tiny()
    types = tuple(cfg.layer_types[i % len(cfg.layer_types)] for i in range(num_layers))
    cfg = dataclasses.replace(cfg, num_layers=num_layers, layer_types=types)
    enc = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(enc)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    f = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    return f.lower(state, ids, ids).as_text()


def test_compiled_program_does_not_grow_with_depth():
    small, deep = _encoder_program(4), _encoder_program(24)
    # Same program; only the layer count in the parameter shapes and the loop bound differ.
    assert abs(len(small.splitlines()) - len(deep.splitlines())) <= 2
    assert small.count("stablehlo.dot_general") == deep.count("stablehlo.dot_general")


def test_model_compiles_once_per_batch_shape(tiny_folder):
    from embeddinggemma_jax import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(tiny_folder)
    texts = ["a" * 20, "b" * 21, "c" * 22]  # one bucket, one batch shape
    model.encode(texts)
    model.encode(list(reversed(texts)))
    model.encode(texts[:1] * 3)
    assert model.compile_count == 1


CACHE_SCRIPT = """
import json, sys, jax
from embeddinggemma_jax import EmbeddingGemma
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
model = EmbeddingGemma.from_pretrained(sys.argv[1])
emb = model.encode(["persistent compilation cache", "x" * 40])
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"), "emb": emb.tolist()}))
"""


@pytest.mark.slow
def test_persistent_compilation_cache_is_written_then_hit(tiny_folder, tmp_path):
    from embeddinggemma_jax.compile_cache import ENV

    cache = tmp_path / "xla-cache"
    env = dict(os.environ, **{ENV: str(cache)}, PYTHONPATH=str(REPO))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run():
        out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(tiny_folder)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run()
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert first["misses"] >= 1 and first["hits"] == 0 and files
    second = run()
    assert second["hits"] >= 1 and second["misses"] == 0
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == files  # nothing recompiled
    assert second["emb"] == first["emb"]
