"""Topology rules and the HBM arithmetic behind the v5e batch sizes; the sharded encode step's
shardings on an 8-device CPU mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from embeddinggemma_jax import topologies
from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.sharding import DATA_PARALLEL_RULES, FSDP_RULES, logical_to_spec

ROOT = Path(__file__).resolve().parents[1]


def real_param_shapes():
    from flax import nnx

    from embeddinggemma_jax.head import abstract_module
    from embeddinggemma_jax.sharding import param_axes
    from embeddinggemma_jax.weights import iter_params

    _, state = nnx.split(abstract_module(EncoderConfig(), HeadConfig()))
    axes = param_axes(state)
    return {path: (var.get_value().shape, axes[path]) for path, var in iter_params(state)}


def test_every_v5e_topology_is_complete():
    assert sorted(t.chips for t in topologies.TOPOLOGIES.values()) == [1, 4, 8, 16, 32, 64, 128, 256]
    for t in topologies.TOPOLOGIES.values():
        assert t.name == f"v5litepod-{t.chips}" == t.accelerator_type
        assert t.mesh_shape[0] * t.mesh_shape[1] == t.chips and t.dtype == "bfloat16"
        assert t.hosts * (t.chips // t.hosts) == t.chips
        assert set(t.rows_per_chip) == set(t.buckets) and t.buckets[-1] == 2048
        assert dict(t.rules_table)["activation_batch"] == ("slice", "data", "fsdp")


def test_rows_per_bucket_fit_16gb_hbm_and_the_token_budget():
    usable = topologies.usable_activation_bytes()
    assert 11 * 2**30 < usable < 13 * 2**30  # 0.85 * 16 GiB - 1 GiB reserve - 0.57 GiB bf16 params
    rows = topologies.get("v5litepod-8").rows_per_chip
    for L, r in rows.items():
        assert r >= 8 and r % 8 == 0
        assert r * L <= topologies.TOKENS_PER_CHIP
        assert topologies.SAFETY_FACTOR * r * topologies.hbm_bytes_per_row(L) <= usable, L
    # the longest bucket is bound by HBM and the token budget alike; short buckets by the budget
    assert rows[2048] == 32 and rows[16] == 4096


def test_bytes_per_token_by_hand():
    # EmbeddingGemma-300m: D=768, F=1152, N=3 query heads, K=1 kv head, H=256 (config.json).
    D, F, N, K, H, L = 768, 1152, 3, 1, 256, 2048
    by_hand = 2 * D * 2 + 2 * D * 4 + 2 * (N * H + K * H) * 2 + 3 * F * 2 + (4 + 4 + 2) * N * L
    assert by_hand == 81664 == topologies.hbm_bytes_per_token(L)
    assert topologies.param_count() == 307_581_696


@pytest.mark.slow
def test_activation_estimate_bounds_what_xla_allocates():
    """XLA's own buffer assignment for the full-size bf16 model (CPU backend, no weights needed):
    the per-row growth of temporaries stays under the estimate, the fixed part under the reserve."""
    from flax import nnx

    from embeddinggemma_jax.head import abstract_module

    graphdef, state = nnx.split(abstract_module(EncoderConfig(), HeadConfig(), "bfloat16", "bfloat16"))
    f = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))

    def temp(B, L):
        x = jax.ShapeDtypeStruct((B, L), jnp.int32)
        return f.lower(state, x, x).compile().memory_analysis().temp_size_in_bytes

    L = 256
    t16, t32 = temp(16, L), temp(32, L)
    per_row, fixed = (t32 - t16) / 16, 2 * t16 - t32
    assert 0 < per_row <= topologies.hbm_bytes_per_row(L), (per_row, topologies.hbm_bytes_per_row(L))
    assert fixed <= topologies.RUNTIME_RESERVE


def test_configs_in_tpu_folder_match_the_table():
    for t in topologies.TOPOLOGIES.values():
        on_disk = json.loads((ROOT / "tpu" / "configs" / f"{t.name}.json").read_text())
        assert on_disk == json.loads(json.dumps(t.to_json())), "regenerate: embeddinggemma-jax tpu-configs --write tpu/configs"


def test_rules_replicate_parameters_for_inference_and_shard_them_for_training():
    params = real_param_shapes()
    for t in topologies.TOPOLOGIES.values():
        mesh = AbstractMesh(t.mesh_shape, ("data", "fsdp"))
        for path, (shape, axes) in params.items():
            spec = logical_to_spec(axes, t.rules_table, mesh, shape)
            assert all(s is None for s in spec), (t.name, path, spec)  # inference: replicated
        assert logical_to_spec(("activation_batch", "activation_length"), t.rules_table, mesh) == \
            PartitionSpec("data", None) or t.chips == 1
    # training on an FSDP mesh: the big matrices split over fsdp, evenly, for every v5e size
    for chips in (4, 8, 16, 32, 64, 128, 256):
        mesh = AbstractMesh((1, chips), ("data", "fsdp"))
        emb_shape, emb_axes = params[("encoder", "embed_tokens")]
        assert logical_to_spec(emb_axes, FSDP_RULES, mesh, emb_shape) == PartitionSpec("fsdp", None)
    assert logical_to_spec(("activation_batch", "activation_length"), DATA_PARALLEL_RULES,
                           AbstractMesh((4, 2), ("data", "fsdp"))) == PartitionSpec(("data", "fsdp"), None)


def test_sharded_step_shardings_on_8_cpu_devices(tiny_folder):
    script = f"""
import numpy as np, jax
from jax.sharding import PartitionSpec as P
from embeddinggemma_jax import EmbeddingGemma
from embeddinggemma_jax.batch.step import ShardedEncoder
from embeddinggemma_jax.sharding import DATA_PARALLEL_RULES, make_mesh
model = EmbeddingGemma.from_pretrained({str(tiny_folder)!r})
enc = ShardedEncoder(model, make_mesh((4, 2)), DATA_PARALLEL_RULES)
assert enc.batch_split == 8 and enc.local_split == 8
for leaf in jax.tree.leaves(enc.state):
    assert leaf.sharding.is_fully_replicated, leaf.sharding
rng = np.random.default_rng(0)
ids = rng.integers(4, 200, (16, 32)).astype(np.int32); mask = np.ones_like(ids); mask[3, 20:] = 0
out = enc(ids, mask)
assert out.sharding.spec == P(("data", "fsdp"), None), out.sharding.spec
assert len(out.sharding.device_set) == 8 and len(out.addressable_shards) == 8
exe = enc.compiled((16, 32))
assert exe.input_shardings[0][1].spec == P(("data", "fsdp"), None)
want = np.asarray(model._step(model.state, ids, mask))
got = enc.local_rows(out)
assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6, np.abs(got - want).max()
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_logical_to_spec_refuses_a_dimension_the_mesh_does_not_divide():
    mesh = AbstractMesh((1, 8), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"axis 'vocab' of size 263 cannot be split 8 ways over mesh axes fsdp"):
        logical_to_spec(("vocab", "embed"), FSDP_RULES, mesh, (263, 48))
    assert logical_to_spec(("vocab", "embed"), FSDP_RULES, mesh, (264, 48)) == PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match="unknown logical axis 'batch'"):  # activations are activation_*
        logical_to_spec(("batch", "activation_length"), DATA_PARALLEL_RULES, mesh)


def test_parameters_carry_their_logical_axes_as_nnx_metadata():
    from flax import nnx

    from embeddinggemma_jax.head import abstract_module
    from embeddinggemma_jax.sharding import param_axes

    module = abstract_module(EncoderConfig.tiny(), HeadConfig.tiny())
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    assert specs["encoder"]["embed_tokens"].get_value() == PartitionSpec("vocab", "embed")
    assert specs["encoder"]["layers"]["mlp"]["gate_proj"].get_value() == PartitionSpec("layers", "embed", "mlp")
    assert specs["head"]["dense1"].get_value() == PartitionSpec("embed", "dense_hidden")
    axes = param_axes(nnx.state(module, nnx.Param))
    assert len(axes) == 17 and all(len(a) >= 1 for a in axes.values())
