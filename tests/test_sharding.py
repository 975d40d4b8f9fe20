"""Topology rules and the compiled-memory fits behind the v5e batch sizes; the sharded encode step's
shardings on an 8-device CPU mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_rows_per_bucket_fit_the_compiled_memory_and_the_token_budget():
    """Rows per chip come from the job step compiled for v5e (v5e_compiled_memory.json): every bucket's
    rows need at most HBM_MARGIN of 16 GiB by its fit (compiled, or interpolated between compiled ones)."""
    memory = topologies.compiled_memory()
    rows = topologies.get("v5litepod-8").rows_per_chip
    assert set(memory) <= set(rows) and min(rows) in memory and max(rows) in memory
    cap = topologies.HBM_MARGIN * 16 * 2**30
    for L, r in rows.items():
        f = topologies.memory_fit(L, memory)
        assert r >= 8 and r % 8 == 0
        assert r * L <= topologies.TOKENS_PER_CHIP
        assert f["fixed_bytes"] + r * f["bytes_per_row"] <= cap, L
    for L, f in memory.items():  # the fit is the line through the two compiled points
        for rr, h in zip(f["rows"], f["hbm_bytes"]):
            assert abs(f["fixed_bytes"] + rr * f["bytes_per_row"] - h) <= 1 + rr, (L, rr)
    # 65,536 tokens per chip: 4,096 rows of 16 tokens, 32 rows of 2,048
    assert rows[2048] == 32 and rows[16] == 4096


def test_compiled_results_agree_with_the_fits_and_fit_in_hbm():
    """Every checked-in tpu-compile result of the job step (any topology, one slice or two) compiled the
    configs' rows and fits under the margin; its per-chip HBM is the compiled fit's (data parallel:
    nearly the same per-chip program on every v5e slice), an interpolated fit's within 20% (bf16 steps; a
    ``--quantize`` result is checked for rows and the margin only)."""
    memory = topologies.compiled_memory()
    cap = topologies.HBM_MARGIN * 16 * 2**30
    results = [json.loads(p.read_text()) for p in sorted((ROOT / "tpu" / "compiled").glob("v5litepod-*.json"))]
    assert results
    for out in results:
        topo = topologies.get(out["topology"])
        assert out["fits"] and out["kind"] == "job"
        for b in out["buckets"]:
            L = b["length"]
            assert b["rows_per_chip"] == topo.rows_per_chip[L], (out["topology"], L)
            assert b["hbm_bytes"] <= cap
            own = out["topology"] == json.loads(topologies.COMPILED_MEMORY_FILE.read_text())["topology"]
            if out.get("quantize") or not own:  # the fits are v5litepod-4's bf16 step; other slices and quantized
                continue  # steps run another per-chip program (v5litepod-1 at L=176: 11% above the fit): cap only
            f = topologies.memory_fit(L, memory)
            want = f["fixed_bytes"] + b["rows_per_chip"] * f["bytes_per_row"]
            tol = 0.2 if f["fit"] != "compiled" else 0.02  # compiled fits within 2%, interpolated ones within 20%
            assert abs(b["hbm_bytes"] - want) <= tol * want, (out["topology"], L, b["hbm_bytes"], want, f["fit"])


def test_fit_memory_is_the_line_through_two_compiled_points():
    def result(rows, hbm, topology="v5litepod-4"):
        return {"kind": "job", "topology": topology, "num_slices": 1, "buckets": [
            {"length": 128, "rows_per_chip": rows, "hbm_bytes": hbm, "projected_tokens_per_second_per_chip": 1.0}]}

    fit = topologies.fit_memory(result(1024, 5_000_000_000), result(512, 3_000_000_000))
    f = fit["buckets"]["128"]
    assert f["rows"] == [512, 1024] and f["bytes_per_row"] == 2_000_000_000 // 512
    assert f["fixed_bytes"] == 3_000_000_000 - 512 * (2_000_000_000 // 512)
    with pytest.raises(ValueError, match="same rows"):
        topologies.fit_memory(result(512, 1), result(512, 2))
    with pytest.raises(ValueError, match="same topology"):
        topologies.fit_memory(result(512, 1), result(1024, 2, "v5litepod-8"))
    # a bucket between two compiled ones: bytes per token and fixed bytes interpolated in L
    memory = {64: {"fixed_bytes": 100, "bytes_per_row": 64 * 1000}, 128: {"fixed_bytes": 300, "bytes_per_row": 128 * 3000}}
    assert topologies.memory_fit(96, memory) == {"fixed_bytes": 200, "bytes_per_row": 96 * 2000,
                                                 "fit": "interpolated (64, 128)"}
    with pytest.raises(ValueError, match="no compiled memory fit"):
        topologies.memory_fit(256, memory)


def test_param_count_of_the_real_config():
    from embeddinggemma_jax.costs import param_count

    assert param_count() == 307_581_696  # EmbeddingGemma-300m's safetensors hold this many


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
