"""The TPU compiler on this host (libtpu, no TPU): the job's step and the train step compiled for v5e
slices, their memory, and the HLO roofline's FLOP count against the model's own arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from embeddinggemma_jax import backend

if not backend.installed("libtpu"):
    if os.environ.get("CI"):
        pytest.fail("libtpu is not installed; the test extra brings it (jax[tpu])", pytrace=False)
    pytest.skip("libtpu not installed (pip install -e '.[test]')", allow_module_level=True)

from embeddinggemma_jax import tpu_compile as tc  # noqa: E402 - the CLI module re-exports tpu_aot and roofline
from embeddinggemma_jax.config import EncoderConfig  # noqa: E402
from embeddinggemma_jax.costs import flops_per_token  # noqa: E402
from embeddinggemma_jax.errors import InputError  # noqa: E402
from embeddinggemma_jax.weights import read_folder_configs  # noqa: E402

GIB = 1 << 30


def test_roofline_counts_a_matmul_and_every_loop_iteration():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from embeddinggemma_jax.sharding import make_mesh

    mesh = make_mesh((1, 1), tc.slice_devices(1))
    s = NamedSharding(mesh, PartitionSpec())
    a = jax.ShapeDtypeStruct((1024, 768), jnp.bfloat16, sharding=s)
    w = jax.ShapeDtypeStruct((768, 1536), jnp.bfloat16, sharding=s)
    one = tc.hlo_roofline(jax.jit(lambda a, w: a @ w).lower(a, w).compile().as_text())
    assert one["flops"] == 2 * 1024 * 768 * 1536

    w2 = jax.ShapeDtypeStruct((768, 768), jnp.bfloat16, sharding=s)

    def loop(a, w):
        return jax.lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ w), a)

    seven = tc.hlo_roofline(jax.jit(loop).lower(a, w2).compile().as_text())
    assert seven["flops"] == 7 * 2 * 1024 * 768 * 768
    assert 7 in [lp["trip_count"] for lp in seven["loops"]]
    # the projected time is the sum of its ops' times, the loop body's ops counted 7 times
    ops = tc.hlo_roofline(jax.jit(loop).lower(a, w2).compile().as_text(), ops=True)["ops"]
    assert sum(o["seconds"] for o in ops) == pytest.approx(seven["seconds"])
    assert [o["flops"] for o in ops if o["flops"]] == [7 * 2 * 1024 * 768 * 768] and \
        [o["times"] for o in ops if o["flops"]] == [7]

    # int8 x int8 -> int32 (--quantize int8) runs at the MXU's int8 peak, twice bf16's
    a8 = jax.ShapeDtypeStruct((4096, 4096), jnp.int8, sharding=s)
    i8 = tc.hlo_roofline(jax.jit(lambda a, w: jnp.matmul(a, w, preferred_element_type=jnp.int32))
                         .lower(a8, a8).compile().as_text())
    assert i8["flops"] == 2 * 4096 ** 3
    # the dot at 394 TOPS (plus the program's few other ops), well under what bf16's peak would take
    assert i8["flops"] / tc.V5E_PEAK_INT8_OPS <= i8["seconds"] < 0.6 * i8["flops"] / tc.V5E_PEAK_FLOPS


def test_roofline_weights_a_conditionals_branches_by_their_share_of_runs():
    """The encoder's scanned layers pick full or sliding attention with a ``lax.cond``: with the layers'
    shares each branch counts for the runs that take it; without, the costliest branch every time."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from embeddinggemma_jax.sharding import make_mesh

    mesh = make_mesh((1, 1), tc.slice_devices(1))
    s = NamedSharding(mesh, PartitionSpec())
    a = jax.ShapeDtypeStruct((1024, 768), jnp.bfloat16, sharding=s)
    w = jax.ShapeDtypeStruct((768, 768), jnp.bfloat16, sharding=s)

    def loop(a, w):
        def body(i, x):  # true (every 4th run): three matmuls, false: one
            return jax.lax.cond(i % 4 == 0, lambda x: jnp.tanh(jnp.tanh(jnp.tanh(x @ w) @ w) @ w),
                                lambda x: jnp.tanh(x @ w), x)
        return jax.lax.fori_loop(0, 8, body, a)

    hlo = jax.jit(loop).lower(a, w).compile().as_text()
    one = 2 * 1024 * 768 * 768
    assert tc.hlo_roofline(hlo)["flops"] == 8 * 3 * one
    assert tc.hlo_roofline(hlo, branch_shares={8: (0.75, 0.25)})["flops"] == 8 * (0.75 * one + 0.25 * 3 * one)
    assert tc.hlo_roofline(hlo, branch_shares={24: (0.75, 0.25)})["flops"] == 8 * 3 * one  # another loop's
    (shares,) = tc.layer_branch_shares(EncoderConfig()).values()  # 20 sliding layers (true), 4 full (false)
    assert tc.layer_branch_shares(EncoderConfig()).keys() == {24} and shares == pytest.approx((4 / 24, 20 / 24))


def test_roofline_counts_a_scans_stacked_buffers_by_the_slices_it_touches():
    """A scan that reads its layer's slice of a stacked [24, ...] input and writes its slice of a stacked
    output, as the encoder's layers read weights and the train step writes residuals and gradients: XLA
    fuses the slicing and updates the output in place, so the program moves each buffer about once, not
    24 times; the roofline counted the whole buffer in every iteration before."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from embeddinggemma_jax.sharding import make_mesh

    mesh = make_mesh((1, 1), tc.slice_devices(1))
    s = NamedSharding(mesh, PartitionSpec())
    xs = jax.ShapeDtypeStruct((24, 512, 768), jnp.float32, sharding=s)
    buf = 24 * 512 * 768 * 4

    def scan(xs):
        def body(c, x):
            y = jnp.tanh(x) * c
            return c + 1.0, y
        return jax.lax.scan(body, jnp.float32(1), xs)[1]

    r = tc.hlo_roofline(jax.jit(scan).lower(xs).compile().as_text())
    assert 24 in [lp["trip_count"] for lp in r["loops"]]
    # read xs once and write the stacked output once (plus a few scalar ops), not 24 x both buffers; the
    # output's AllocateBuffer moves nothing
    assert 2 * buf <= r["bytes"] < 2.01 * buf, r["bytes"] / buf


def test_reproject_from_the_kept_hlo_gives_the_compiles_own_projection(tiny_folder, tmp_path):
    """A result re-projected from the HLO its compile wrote (plain or gzipped) equals the compile's
    projection, and a row projected by an older roofline gets this one's fields back."""
    import gzip

    from embeddinggemma_jax import tpu_aot

    res = tc.compile_job("v5litepod-4", buckets=(12,), model=str(tiny_folder), log=lambda *a: None,
                         hlo_dir=tmp_path / "hlo")
    (row,) = res["buckets"]
    assert row["roofline_version"] == tpu_aot.ROOFLINE_VERSION
    old = dict(res, buckets=[{k: v for k, v in row.items() if k != "roofline_version"} | {"projected_seconds": 9.0}])
    again = tpu_aot.reproject(old, tmp_path / "hlo", model=str(tiny_folder))
    assert again["buckets"][0] == row
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "L12.hlo.txt.gz").write_bytes(gzip.compress((tmp_path / "hlo" / "L12.hlo.txt").read_bytes()))
    assert tpu_aot.reproject(old, gz, model=str(tiny_folder))["buckets"][0] == row


def test_roofline_counts_an_asynchronous_slice_by_the_slice():
    # ((source), slice, context): a quarter of a bf16 [128, 512, 768] read from HBM into VMEM (S(1))
    t = ("((bf16[128,512,768]{2,1,0:T(8,128)(2,1)}), bf16[32,512,768]{2,1,0:T(8,128)(2,1)S(1)}, "
         "s32[]{:S(2)})")
    assert tc._slice_start_bytes(t) == 2 * 32 * 512 * 768
    assert tc._slice_start_bytes(t.replace("S(1)}", "}", 1)) == 2 * 2 * 32 * 512 * 768  # into HBM: read + write


def test_tiny_model_every_path_on_v5e_2x2(tiny_folder):
    """Shortest bucket (XLA attention) and longest (splash through Mosaic), sliding and full layers."""
    enc, head = read_folder_configs(tiny_folder)
    assert any(enc.sliding_flags) and not all(enc.sliding_flags)
    out = tc.compile_job("v5litepod-4", [12, head.max_seq_length], model=str(tiny_folder),
                         rows={12: 16, head.max_seq_length: 8}, log=lambda _: None)
    assert out["fits"] and out["chips"] == 4 and out["hosts"] == 1 and out["mesh"] == {"data": 4, "fsdp": 1}
    short, long_ = out["buckets"]
    assert (short["attention"], long_["attention"]) == ("xla", "splash")
    assert short["mosaic_kernels"] == 0 and long_["mosaic_kernels"] >= 1  # the real kernel, not interpret mode
    for b in out["buckets"]:
        L, tokens = b["length"], b["rows_per_chip"] * b["length"]
        assert 0 < b["hbm_bytes"] < 16 * GIB
        assert enc.num_layers in b["loop_trip_counts"]  # the scanned layers, counted num_layers times
        assert b["flops_per_chip"] >= 0.98 * flops_per_token(enc, L) * tokens
        # the report's rates are the projection's own: tokens of this bucket's batch over the projected time,
        # and MFU from the model's FLOPs per token at this length (not the compiled HLO's count)
        assert b["projected_tokens_per_second_per_chip"] == pytest.approx(tokens / b["projected_seconds"])
        assert b["projected_mfu"] == pytest.approx(
            flops_per_token(enc, L) * tokens / b["projected_seconds"] / tc.V5E_PEAK_FLOPS)
        assert 0 < b["compute_bound_share"] <= 1
    # XLA attention counts the band exactly; splash is bounded by full attention on every layer.
    assert short["flops_per_chip"] <= 1.05 * flops_per_token(enc, 12) * short["rows_per_chip"] * 12


def test_quantized_job_step_compiles_with_integer_parameters(tiny_folder):
    float_ = tc.compile_job("v5litepod-4", [12], model=str(tiny_folder), rows={12: 16}, log=lambda _: None)
    int8 = tc.compile_job("v5litepod-4", [12], model=str(tiny_folder), rows={12: 16}, log=lambda _: None,
                          quantize="int8")
    assert int8["quantize"] == "int8" and int8["fits"]
    # bf16 parameters -> int8 values + fp32 per-channel scales: fewer argument bytes per chip
    assert int8["buckets"][0]["memory"]["argument"] < float_["buckets"][0]["memory"]["argument"]


def test_multi_host_and_multi_slice_meshes(tiny_folder):
    out = tc.compile_job("v5litepod-16", [12], model=str(tiny_folder), rows={12: 8}, log=lambda _: None)
    assert out["hosts"] == 4 and out["chips"] == 16 and out["mesh"] == {"data": 16, "fsdp": 1} and out["fits"]
    two = tc.compile_job("v5litepod-16", [12], model=str(tiny_folder), num_slices=2, rows={12: 8}, log=lambda _: None)
    assert two["chips"] == 32 and two["hosts"] == 8 and two["mesh"] == {"slice": 2, "data": 16, "fsdp": 1}
    # data parallel over the slices: the same per-chip program and memory as one slice
    assert two["buckets"][0]["hbm_bytes"] == out["buckets"][0]["hbm_bytes"]


@pytest.mark.slow
def test_real_shapes_shortest_and_longest_bucket_of_v5litepod_4():
    out = tc.compile_job("v5litepod-4", [12, 2048], log=lambda _: None)
    assert out["fits"]
    cfg = EncoderConfig()
    for b in out["buckets"]:
        assert b["hbm_bytes"] <= tc.HBM_MARGIN * 16 * GIB
        assert cfg.num_layers in b["loop_trip_counts"]
        assert b["flops_per_chip"] >= 0.98 * flops_per_token(cfg, b["length"]) * b["tokens_per_chip"]
    short, long_ = out["buckets"]
    # At 2048 tokens: per layer branch (full, sliding) splash and the q and k norm + RoPE kernel.
    assert (short["mosaic_kernels"], long_["mosaic_kernels"]) == (0, 6)
    # Sliding layers' splash runs 3 of 4 key tiles per query tile (512-token tiles, a 257-token band
    # each side): fewer FLOPs than full attention on all 24 layers would be.
    full_everywhere = flops_per_token(EncoderConfig(layer_types=("full_attention",) * 24), 2048)
    assert long_["flops_per_chip"] < 0.95 * full_everywhere * long_["tokens_per_chip"]


def test_cli_is_quiet_and_writes_json(tiny_folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-m", "embeddinggemma_jax.cli", "tpu-compile", "--topology", "v5litepod-4",
                        "--model", str(tiny_folder), "--buckets", "12", "--json", str(tmp_path / "o.json")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no libtpu warnings on a CPU host
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["topology"] == "v5litepod-4"
    (b,) = out["buckets"]
    assert {"length", "rows_per_chip", "hbm_bytes", "flops_per_chip", "projected_tokens_per_second_per_chip",
            "projection_method", "attention"} <= set(b)
    m = b["memory"]
    assert b["hbm_bytes"] == m["argument"] + m["output"] + m["temp"] + m["generated_code"] - m["alias"]
    r = subprocess.run([sys.executable, "-m", "embeddinggemma_jax.cli", "tpu-compile", "--topology", "v5litepod-4",
                        "--model", str(tiny_folder), "--buckets", "13"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "bucket 13" in r.stderr
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    r = subprocess.run([sys.executable, "-m", "embeddinggemma_jax.cli", "tpu-compile", "--topology", "v5litepod-4",
                        "--model", str(tiny_folder), "--buckets", "12", "--json", str(notes)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1 and "not a tpu-compile result" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert notes.read_text() == '{"mine": 1}'  # the user's file is kept


def test_resume_keeps_an_earlier_results_buckets_with_the_same_rows(tiny_folder):
    first = tc.compile_job("v5litepod-1", [12], model=str(tiny_folder), rows={12: 64}, log=lambda _: None)
    seen = []
    again = tc.compile_job("v5litepod-1", [12], model=str(tiny_folder), rows={12: 64}, earlier=first, log=seen.append)
    assert again["buckets"] == first["buckets"] and "kept" in seen[0]  # not compiled again


def test_train_overrides_and_gradcache_memory(tiny_folder, tmp_path):
    """tpu-compile --train's --batch-size / --cached-loss / --mini-batch-size (the train flags, declared once in
    RunConfig) replace the config's; at the same contrastive batch the cached step needs fewer temporaries."""
    from embeddinggemma_jax.cli import build_parser

    enc, head = read_folder_configs(tiny_folder)
    cfg = tmp_path / "tiny-4.json"
    cfg.write_text(json.dumps({"dtype": "bfloat16", "mesh": [4, 1], "batch_size": 16, "max_length": 32,
                               "pad_to_max_length": True, "matryoshka_dims": [head.out_features]}))
    args = build_parser().parse_args(["tpu-compile", "--train", str(cfg), "--batch-size", "256", "--cached-loss",
                                      "--mini-batch-size", "16"])
    ov = tc.train_overrides(args)
    assert ov == {"batch_size": 256, "cached_loss": True, "mini_batch_size": 16}
    (cached,) = tc.compile_train(str(cfg), model=str(tiny_folder), overrides=ov, log=lambda _: None)["buckets"]
    (plain,) = tc.compile_train(str(cfg), model=str(tiny_folder), overrides={"batch_size": 256},
                                log=lambda _: None)["buckets"]
    assert (cached["batch_size"], cached["cached_loss"], cached["mini_batch_size"]) == (256, True, 16)
    assert (plain["batch_size"], plain["cached_loss"], plain["mini_batch_size"]) == (256, False, None)
    assert cached["rows_per_chip"] == plain["rows_per_chip"] == 2 * 256 // 4 and cached["tokens_per_chip"] == 128 * 32
    assert cached["memory"]["temp"] < plain["memory"]["temp"]
    with pytest.raises(ValueError, match="must divide --batch-size"):
        tc.compile_train(str(cfg), model=str(tiny_folder), overrides=dict(ov, mini_batch_size=24), log=lambda _: None)
    with pytest.raises(ValueError, match="is for --train"):
        tc.cmd_tpu_compile(build_parser().parse_args(["tpu-compile", "--topology", "v5litepod-4", "--batch-size", "8"]))


def test_a_program_over_hbm_is_reported_with_the_compilers_count():
    """XLA:TPU refuses to compile a program that needs more than a chip's HBM; ``out_of_hbm`` reads how much
    it would need from the error (how ``compile_train`` reports a batch that does not fit)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from embeddinggemma_jax.sharding import make_mesh

    mesh = make_mesh((1, 1), tc.slice_devices(1))
    x = jax.ShapeDtypeStruct((5 * GIB,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))  # 20 GiB
    with pytest.raises(Exception) as e:
        jax.jit(lambda a: (a * 2, a + 1)).lower(x).compile()
    need = tc.out_of_hbm(e.value)
    assert need is not None and need > 16 * GIB, str(e.value)[:300]
    assert tc.out_of_hbm(ValueError("something else")) is None


def test_train_chips_from_the_configs_contents(tmp_path):
    """``tpu-compile --train``'s slice: the mesh, else the config's ``chips`` key, else the file name (said)."""
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"batch_size": 16, tc.CHIPS_KEY: 8}))
    assert tc.train_config_chips(cfg, None, log=pytest.fail) == 8
    assert tc.train_config_chips(cfg, (2, 4), log=pytest.fail) == 8
    with pytest.raises(ValueError, match="make them agree"):
        tc.train_config_chips(cfg, (4, 1))
    cfg.write_text(json.dumps({"batch_size": 16, tc.CHIPS_KEY: "8"}))
    with pytest.raises(ValueError, match="positive chip count"):
        tc.train_config_chips(cfg, None)
    cfg.write_text(json.dumps({"batch_size": 16}))
    with pytest.raises(ValueError, match='add "chips"'):
        tc.train_config_chips(cfg, None)
    named = tmp_path / "v5litepod-16.json"
    named.write_text(json.dumps({"batch_size": 16}))
    said = []
    assert tc.train_config_chips(named, None, log=said.append) == 16 and "from the file name" in said[0]


def test_hlo_folder_with_the_users_own_file_is_refused_before_compiling(tmp_path):
    mine = tmp_path / "L12.hlo.txt"
    mine.write_text("my notes")
    with pytest.raises(InputError, match="not an HLO module"):
        tc.check_hlo_target(tmp_path)
    assert mine.read_text() == "my notes"
    mine.write_text("HloModule jit_step, entry_computation_layout={}")
    tc.check_hlo_target(tmp_path)  # an earlier --hlo result may be replaced
