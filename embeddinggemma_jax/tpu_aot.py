"""The AOT drivers of ``tpu-compile``: the job's step (``compile_job``) or the train step
(``compile_train``) lowered with abstract arguments for the devices of a v5e slice that libtpu builds from
a topology description (no TPU needed), compiled by XLA:TPU and Mosaic, and reported per bucket: the
compiler's ``memory_analysis()`` against 16 GiB per chip and the roofline projection of the optimised
HLO (``roofline.hlo_roofline``). What is compiled is what the job runs: ``batch.step.ShardedEncoder``
with the topology's mesh, rules, dtype, attention kernel and rows per bucket (``topologies.rows_table``,
the job's own table); with ``--train``, ``train.step.jitted_train_step`` with the config's mesh, rules,
remat and optimiser state.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from embeddinggemma_jax import topologies
from embeddinggemma_jax.backend import quiet_topology_env
from embeddinggemma_jax.roofline import V5E_HBM_BANDWIDTH, V5E_PEAK_FLOPS, V5E_PEAK_INT8_OPS, hlo_roofline

HBM_MARGIN = topologies.HBM_MARGIN  # a bucket fits when its compiled program needs at most this share of HBM
PROJECTION_METHOD = ("roofline over the optimised HLO (dots' FLOPs, ops' HBM bytes, loops x trip count, "
                     "layer branches x their share)")

# Single-host v5e slices have 1, 4 or 8 chips; multi-host slices 4-chip hosts.
_GRIDS = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_HOST_BOUNDS = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}


def slice_devices(chips: int, num_slices: int = 1):
    """The devices of ``num_slices`` v5e slices of ``chips`` chips each, from libtpu."""
    if chips not in _GRIDS:
        raise ValueError(f"no v5e slice of {chips} chips; valid: {', '.join(map(str, _GRIDS))}")
    quiet_topology_env(f"v5litepod-{chips}")
    from jax.experimental import topologies as jtopo

    try:
        topo = jtopo.get_topology_desc(platform="tpu", topology_name=f"v5e:{_GRIDS[chips]}",
                                       chip_config_name="default",
                                       chips_per_host_bounds=_HOST_BOUNDS.get(chips, (2, 2, 1)),
                                       num_slices=num_slices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or unusable: say what to install
        raise RuntimeError(f"cannot build the v5e:{_GRIDS[chips]} topology ({str(e).strip().splitlines()[0]}); "
                           "install libtpu: pip install 'embeddinggemma-jax[tpu]'") from None
    return list(topo.devices)



# ----------------------------------------------------------------------------- compiling
def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    parts = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code")}
    parts["alias"] = int(getattr(m, "alias_size_in_bytes", 0))
    # Donated arguments aliased to outputs are counted once.
    parts["hbm_bytes"] = parts["argument"] + parts["output"] + parts["temp"] + parts["generated_code"] - parts["alias"]
    return parts


def layer_branch_shares(cfg) -> dict[int, tuple[float, float]]:
    """{the layer scan's trip count: the shares of its layers that take each branch of the encoder's
    ``lax.cond``} (false: full attention, true: sliding; the order of the HLO conditional's branches)."""
    sliding = sum(map(bool, cfg.sliding_flags)) / cfg.num_layers
    return {cfg.num_layers: (1.0 - sliding, sliding)}


def _report(compiled, seconds_compile: float, tokens: int, model_flops_per_token: float | None,
            peak: float = V5E_PEAK_FLOPS, hlo_file: str | Path | None = None,
            branch_shares: dict[int, tuple[float, ...]] | None = None) -> dict:
    mem = memory(compiled)
    hlo = compiled.as_text()
    if hlo_file is not None:
        from embeddinggemma_jax.io_utils import atomic_write_bytes

        Path(hlo_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(hlo_file, hlo.encode())
    row = {"hbm_bytes": mem["hbm_bytes"], "memory": mem, "hbm_fraction": mem["hbm_bytes"] / topologies.V5E_HBM_BYTES}
    row.update(project(hlo, tokens, model_flops_per_token, peak, branch_shares))
    row["compile_seconds"] = round(seconds_compile, 2)
    return row


# 2: fusions that update a parameter in place (a scan's stacked outputs and gradients) or only slice one (a
# scan's stacked weights) move the slices, not the whole buffers; AllocateBuffer moves nothing. Results
# without the key were projected by version 1, which counted those buffers whole in every loop iteration.
ROOFLINE_VERSION = 2


def project(hlo: str, tokens: int, model_flops_per_token: float | None, peak: float = V5E_PEAK_FLOPS,
            branch_shares: dict[int, tuple[float, ...]] | None = None) -> dict:
    """The projection fields of a result row from a compiled program's optimised HLO text."""
    roof = hlo_roofline(hlo, branch_shares=branch_shares)
    sec = roof["seconds"]
    row = {"flops_per_chip": roof["flops"], "bytes_per_chip": roof["bytes"], "projected_seconds": sec,
           "projected_tokens_per_second_per_chip": tokens / sec if sec > 0 else None,
           "compute_bound_share": roof["compute_bound_seconds"] / sec if sec > 0 else None,
           "loop_trip_counts": sorted({lp["trip_count"] for lp in roof["loops"]}),
           "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
           "projection_method": PROJECTION_METHOD, "roofline_version": ROOFLINE_VERSION}
    if model_flops_per_token is not None and sec > 0:
        row["projected_mfu"] = model_flops_per_token * tokens / sec / peak
    return row


def reproject(result: dict, hlo_dir: str | Path, model: str | None = None) -> dict:
    """``result`` (a tpu-compile JSON) with every bucket's projection recomputed by this roofline from the
    HLO its compile wrote (``--hlo DIR``: ``L<length>.hlo.txt``, or ``.hlo.txt.gz``); the compiler's memory
    and everything else stay. For results projected by an earlier roofline whose HLO was kept."""
    import gzip

    from embeddinggemma_jax.costs import flops_per_token

    enc_cfg, _ = model_configs(model)
    shares = layer_branch_shares(enc_cfg)
    out = dict(result, buckets=[])
    for b in result["buckets"]:
        b = dict(b)
        path = Path(hlo_dir) / f"L{b['length']}.hlo.txt"
        if path.exists() or path.with_suffix(".txt.gz").exists():
            hlo = path.read_text() if path.exists() else gzip.decompress(path.with_suffix(".txt.gz").read_bytes()).decode()
            per_token = (3 if result.get("kind") == "train" else 1) * flops_per_token(enc_cfg, b["length"])
            b.update(project(hlo, b["tokens_per_chip"], per_token, result.get("peak_flops", V5E_PEAK_FLOPS), shares))
        out["buckets"].append(b)
    return finish(out)


def model_configs(model: str | None):
    """(encoder config, head config): a model folder's configs (no weights read), or the built-in
    EmbeddingGemma-300m config."""
    from embeddinggemma_jax.config import EncoderConfig, HeadConfig

    if model is None:
        return EncoderConfig(), HeadConfig()
    from embeddinggemma_jax.source import read_source

    src = read_source(model)  # a folder, an Orbax checkpoint or a hub id
    return src.encoder_config, src.head_config



def compile_job(topology: str, buckets=None, model: str | None = None, num_slices: int = 1, rows=None,
                log=print, quantize: str | None = None, tokens_per_chip: int | None = None,
                earlier: dict | None = None, on_bucket=None, hlo_dir: str | Path | None = None) -> dict:
    """Compile the batch job's step for every bucket of ``topology`` (see the module docstring).

    ``quantize``: a ``quant`` mode; the parameters take its layout (integer values and scales) and
    int8 x int8 matmuls are timed at 394 TOPS (MFU of ``int8`` against that peak).
    ``tokens_per_chip``: rows per bucket from this token budget instead of the topology's table (what a
    bigger or smaller batch would need). ``earlier``: a previous result of the same run (topology, slices,
    rows, quantize): its buckets are kept, not compiled again. ``on_bucket(out)`` is called after each bucket.
    ``hlo_dir``: write each bucket's optimised HLO there (``L<length>.hlo.txt``)."""
    from flax import nnx

    from embeddinggemma_jax.attention import kernel_for_length, select_impl
    from embeddinggemma_jax.batch.step import ShardedEncoder
    from embeddinggemma_jax.batching import buckets_for
    from embeddinggemma_jax.costs import flops_per_token
    from embeddinggemma_jax.head import abstract_module
    from embeddinggemma_jax.sharding import make_mesh

    topo = topologies.get(topology)
    enc_cfg, head_cfg = model_configs(model)
    devices = slice_devices(topo.chips, num_slices)
    mesh = make_mesh((topo.mesh_shape[0] * num_slices, topo.mesh_shape[1]), devices)
    impl = select_impl("tpu", topo.dtype)
    graphdef, state = nnx.split(abstract_module(enc_cfg, head_cfg, topo.dtype, topo.dtype, quantize=quantize))
    peak = V5E_PEAK_INT8_OPS if quantize == "int8" else V5E_PEAK_FLOPS
    enc = ShardedEncoder.from_parts(graphdef, state, impl, mesh, topo.rules_table, place=False)
    all_buckets = buckets_for(head_cfg.max_seq_length, topo.buckets)
    chosen = tuple(buckets) if buckets else all_buckets
    bad = [L for L in chosen if L not in all_buckets]
    if bad:
        raise ValueError(f"bucket {bad[0]} is not one of {topo.name}'s buckets: {', '.join(map(str, all_buckets))}")
    table = rows or topologies.rows_table(topo, all_buckets, tokens_per_chip)
    out = {"topology": topo.name, "kind": "job", "quantize": quantize, "num_slices": num_slices,
           "chips": topo.chips * num_slices,
           "hosts": len({d.process_index for d in devices}), "mesh": dict(mesh.shape), "dtype": topo.dtype,
           "tokens_per_chip": tokens_per_chip, "hbm_limit_bytes": topologies.V5E_HBM_BYTES, "hbm_margin": HBM_MARGIN,
           "peak_flops": V5E_PEAK_FLOPS, "hbm_bandwidth": V5E_HBM_BANDWIDTH, "buckets": []}
    kept = {b["length"]: b for b in (earlier or {}).get("buckets", [])
            if earlier.get("num_slices") == num_slices and earlier.get("topology") == topo.name
            and earlier.get("quantize") == quantize
            and b["rows_per_chip"] == int(table.get(b["length"], -1))}
    for L in [L for L in chosen if L in kept]:  # kept buckets first: a later write loses none of them
        out["buckets"].append(kept[L])
        log(format_row(kept[L]) + " (kept from the earlier result)")
    for L in [L for L in chosen if L not in kept]:
        r = int(table[L])
        t = time.perf_counter()
        exe = enc.compiled((r * enc.batch_split, L))
        row = {"length": L, "rows_per_chip": r, "attention": kernel_for_length(impl, L), "tokens_per_chip": r * L}
        row.update(_report(exe, time.perf_counter() - t, r * L, flops_per_token(enc_cfg, L), peak,
                           Path(hlo_dir) / f"L{L}.hlo.txt" if hlo_dir else None, layer_branch_shares(enc_cfg)))
        out["buckets"].append(row)
        log(format_row(row))
        if on_bucket is not None:
            on_bucket(finish(dict(out)))
    out["buckets"].sort(key=lambda b: chosen.index(b["length"]))
    return finish(out)


# Settings of a tpu/train config that ``tpu-compile --train`` can override (declared in RunConfig/TrainConfig).
TRAIN_OVERRIDES = ("batch_size", "cached_loss", "mini_batch_size", "fsdp", "mesh", "grad_accum", "remat",
                   "remat_policy", "attention")

CHIPS_KEY = "chips"  # a tpu/train config's chip count (the slice it is written for), read by ``tpu-compile --train``


def train_config_chips(config: str | Path, mesh_shape, log=print) -> int:
    """The chips of the slice a ``tpu/train`` config is written for: the product of its ``mesh``, else its
    ``chips`` key, else (said in a log line) the number its file name ends with (``v5litepod-16.json``)."""
    from embeddinggemma_jax.io_utils import read_json

    path = Path(config)
    given = read_json(path, expect=dict).get(CHIPS_KEY)
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
        raise ValueError(f"config file {path}: {CHIPS_KEY!r} must be a positive chip count, got {given!r}")
    if mesh_shape:
        chips = math.prod(mesh_shape)
        if given is not None and given != chips:
            raise ValueError(f"config file {path}: {CHIPS_KEY!r} is {given} but its mesh {list(mesh_shape)} has "
                             f"{chips} chips; make them agree")
        return chips
    if given is not None:
        return given
    tail = path.stem.rsplit("-", 1)[-1]
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"config file {path} has no {CHIPS_KEY!r} key and no mesh, and its name does not end in a "
                         f'chip count (e.g. v5litepod-4.json): add "{CHIPS_KEY}": N to it')
    log(f"{path.name}: no {CHIPS_KEY!r} key or mesh in it; {tail} chips from the file name")
    return int(tail)


def compile_train(config: str, model: str | None = None, num_slices: int = 1, log=print,
                  overrides: dict | None = None, hlo_dir: str | Path | None = None) -> dict:
    """Compile the training step of a ``tpu/train/*.json`` config on its v5e slice; ``overrides``:
    {config key: value} of ``TRAIN_OVERRIDES`` replacing the file's (as the ``train`` flags do); ``hlo_dir``:
    write the optimised HLO there (``L<max_length>.hlo.txt``, as ``--hlo`` does for the job step)."""
    import jax
    import jax.numpy as jnp

    from embeddinggemma_jax import options
    from embeddinggemma_jax.costs import flops_per_token
    from embeddinggemma_jax.head import abstract_module
    from embeddinggemma_jax.sharding import make_mesh
    from embeddinggemma_jax.train import step as st
    from embeddinggemma_jax.train.losses import check_matryoshka
    from embeddinggemma_jax.train.run import RunConfig

    bad = sorted(set(overrides or {}) - set(TRAIN_OVERRIDES))
    if bad:
        raise ValueError(f"cannot override {bad} of a train config; these can be: {', '.join(TRAIN_OVERRIDES)}")
    rc = options.build(RunConfig, overrides, options.read_config(config, RunConfig, ignore=(CHIPS_KEY,)),
                       train_file="-", output_dir="-")
    cfg = rc.train
    chips = train_config_chips(config, cfg.mesh_shape, log)
    name = f"v5litepod-{chips}"
    enc_cfg, head_cfg = model_configs(model)
    devices = slice_devices(chips, num_slices)
    shape = cfg.mesh_shape or ((1, chips) if cfg.fsdp else (chips, 1))
    mesh = make_mesh((shape[0] * num_slices, shape[1]), devices)
    module = abstract_module(enc_cfg, head_cfg, cfg.dtype, "float32")
    t, params = st.make_trainable(module, cfg, mesh, place=False)
    tx = st.make_optimizer(cfg)
    state, shardings = st.abstract_state(t, params, tx)
    dims, weights = check_matryoshka(cfg.matryoshka_dims, cfg.matryoshka_weights, head_cfg.out_features)
    jitted = st.jitted_train_step(t, cfg, tx, shardings, dims, weights)
    A, B, L = cfg.grad_accum, rc.batch_size, rc.max_length
    st.check_batch(t, cfg, B)  # the train command's own check: a batch the mesh (and mini-batch) divide
    # pairs without a hard negative: queries [A, B, L], documents [A, 1, B, L]
    q = jax.ShapeDtypeStruct((A, B, L), jnp.int32, sharding=t.batch_sharding((A, B, L)))
    d = jax.ShapeDtypeStruct((A, 1, B, L), jnp.int32, sharding=t.batch_sharding((A, 1, B, L)))
    tm = time.perf_counter()
    tokens = 2 * A * B * L // (chips * num_slices)  # queries and documents per chip per step
    try:
        exe = jitted.lower(state, t.frozen, q, q, d, d).compile()
    except Exception as e:  # noqa: BLE001 - XLA:TPU refuses a program that does not fit in HBM
        exe, used = None, out_of_hbm(e)
        if used is None:
            raise
    row = {"length": L, "rows_per_chip": 2 * A * B // (chips * num_slices), "attention": cfg.attention,
           "tokens_per_chip": tokens, "remat": cfg.remat,
           "remat_policy": cfg.remat_policy if cfg.remat else None, "rules": "fsdp" if cfg.fsdp else "data_parallel",
           "batch_size": B, "grad_accum": A, "cached_loss": cfg.cached_loss,
           "mini_batch_size": cfg.mini_batch_size if cfg.cached_loss else None}
    if exe is None:  # the compiler's own count of what it would need; no program, so no projection
        row.update({"hbm_bytes": used, "hbm_fraction": used / topologies.V5E_HBM_BYTES, "out_of_hbm": True,
                    "compile_seconds": round(time.perf_counter() - tm, 2)})
    else:  # training: forward + backward (+ the remat forward) is ~3-4x the forward's FLOPs
        row.update(_report(exe, time.perf_counter() - tm, tokens, 3 * flops_per_token(enc_cfg, L),
                           hlo_file=Path(hlo_dir) / f"L{L}.hlo.txt" if hlo_dir else None,
                           branch_shares=layer_branch_shares(enc_cfg)))
    out = {"topology": name, "kind": "train", "config": str(config), "num_slices": num_slices,
           "chips": chips * num_slices, "hosts": len({d.process_index for d in devices}), "mesh": dict(mesh.shape),
           "dtype": cfg.dtype, "hbm_limit_bytes": topologies.V5E_HBM_BYTES, "hbm_margin": HBM_MARGIN,
           "peak_flops": V5E_PEAK_FLOPS, "hbm_bandwidth": V5E_HBM_BANDWIDTH, "buckets": [row]}
    log(format_row(row))
    return finish(out)


# XLA:TPU's refusals: "Ran out of memory on HBM, the total memory required for HLO temporaries (60.00G) exceeds
# available HBM (15.75G)" (seen with libtpu 0.0.42) or "Ran out of memory in memory space hbm. Used 17.5G of 15.75G".
_OUT_OF_HBM = re.compile(r"Ran out of memory (?:on HBM, the total memory required for [^(]*\(|in memory space hbm\. "
                         r"Used )([0-9.]+)([KMGT])?")


def out_of_hbm(error: Exception) -> int | None:
    """The bytes XLA:TPU says a program needs when it refuses to compile it for lack of HBM, else None."""
    m = _OUT_OF_HBM.search(str(error))
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def finish(out: dict) -> dict:
    limit = HBM_MARGIN * out["hbm_limit_bytes"]
    out["fits"] = all(b["hbm_bytes"] <= limit for b in out["buckets"])
    out["too_big"] = [b["length"] for b in out["buckets"] if b["hbm_bytes"] > limit]
    return out


def format_row(b: dict) -> str:
    train = (f"batch={b['batch_size']} x{b['grad_accum']} " + (f"cached mini={b['mini_batch_size']} "
             if b["cached_loss"] else "") + f"{b['rules']} ") if "batch_size" in b else ""
    if b.get("out_of_hbm"):
        return (f"{train}L={b['length']:5d} rows/chip={b['rows_per_chip']:5d} does not compile: XLA:TPU ran out of "
                f"HBM (needs {b['hbm_bytes'] / 2**30:.2f} GiB per chip) compile {b['compile_seconds']:.1f}s")
    tps = b["projected_tokens_per_second_per_chip"]
    mfu = b.get("projected_mfu")
    return (f"{train}L={b['length']:5d} rows/chip={b['rows_per_chip']:5d} {b['attention']:6s} "
            f"HBM {b['hbm_bytes'] / 2**30:6.2f} GiB ({100 * b['hbm_fraction']:5.1f}%, headroom "
            f"{(topologies.V5E_HBM_BYTES - b['hbm_bytes']) / 2**30:5.2f} GiB) "
            f"FLOPs/chip {b['flops_per_chip']:.3e} projected {b['projected_seconds'] * 1e3:8.2f} ms "
            f"{(tps or 0):,.0f} tok/s/chip" + (f" MFU {100 * mfu:4.1f}%" if mfu is not None else "")
            + f" compile {b['compile_seconds']:.1f}s")
