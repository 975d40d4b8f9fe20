"""``embeddinggemma-jax tpu-compile``: the job's step (or the train step) through the real TPU compiler,
on any host with libtpu (no TPU needed), for every bucket of a v5e slice.

libtpu builds the devices of a slice from a topology description
(``jax.experimental.topologies.get_topology_desc``); the step is lowered with abstract arguments
(``ShapeDtypeStruct``s carrying their shardings) and compiled by XLA:TPU and Mosaic, as MaxText's
``train_compile.py`` does. What is compiled is exactly what the job runs: ``batch.step.ShardedEncoder``
with the topology's mesh, rules, dtype, attention kernel and rows per bucket (``batch.job`` plans with
the same table); with ``--train``, ``train.step.jitted_train_step`` with the config's mesh,
rules, remat and optimiser state.

Per bucket it reports ``memory_analysis()`` (arguments + outputs + temporaries + generated code, per
chip) against v5e's 16 GiB, and a PROJECTED time: the compiler's cost model gives none for this
program (``optimal_seconds`` is negative) and counts a loop body once, so ``hlo_roofline`` walks the
optimised HLO: every top-level op of the entry computation and of loop bodies (times their
``known_trip_count``) takes max(FLOPs / peak, bytes / HBM bandwidth), with FLOPs from each dot and
convolution inside the op (and, for splash, attention FLOPs over the key tiles its block-sparse grid
runs) and bytes from the op's operands and result where they live in HBM (not VMEM, ``S(1)``; an
asynchronous slice moves its slice). The full / sliding attention conditional of the layer scan counts
each branch for the layers that take it. Collectives, host transfers and the overlap of asynchronous
copies with compute are not in it.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from embeddinggemma_jax import topologies
from embeddinggemma_jax.backend import quiet_topology_env
from embeddinggemma_jax.errors import InputError

V5E_PEAK_FLOPS = 197e12  # bf16, one chip
V5E_PEAK_INT8_OPS = 394e12  # int8 x int8 matmuls on the MXU, one chip (--quantize int8)
V5E_HBM_BANDWIDTH = 819e9  # bytes/s, one chip
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


# ----------------------------------------------------------------------------- HLO roofline
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([0-9,]*)\](\{[^}]*\})?")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?[\w.\-]+ \(.*\) -> .*\{$")
_FREE = {"copy-done", "slice-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
         "send-done", "recv-done", "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "opt-barrier"}


def _dims(text: str) -> list[tuple[str, list[int]]]:
    return [(t, [int(x) for x in d.split(",") if x]) for t, d, _ in _SHAPE.findall(text)]


def _nbytes(text: str) -> float:
    """HBM bytes of the arrays in a type string; arrays laid out in memory space 1 (``S(1)``: the
    chip's on-core VMEM) move no HBM bytes."""
    return sum(_BYTES[t] * math.prod(int(x) for x in d.split(",") if x)
               for t, d, layout in _SHAPE.findall(text) if "S(1)" not in layout)


def _slice_start_bytes(type_text: str) -> float:
    """HBM bytes of an asynchronous slice ``((source), slice, context)``: the slice is read from the
    source and written to its destination, each side counted where it is not in VMEM (``S(1)``)."""
    arrs = _SHAPE.findall(type_text)
    if len(arrs) < 2:
        return _nbytes(type_text)
    (_, _, src_layout), (t, d, dst_layout) = arrs[0], arrs[1]
    n = _BYTES[t] * math.prod(int(x) for x in d.split(",") if x)
    return n * (("S(1)" not in src_layout) + ("S(1)" not in dst_layout))


@dataclass
class _Instr:
    name: str
    type: str
    op: str
    rest: str


def _parse(hlo: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, cur = "", None
    for line in hlo.splitlines():
        if _HEADER.match(line):  # a computation's header (not a column-0 line of a kernel's text)
            words = line.split()
            cur = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
            comps[cur] = []
            if words[0] == "ENTRY":
                entry = cur
            continue
        if line.rstrip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            comps[cur].append(_Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _attr(rest: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", rest)
    return m.group(1) if m else None


def _operand_text(rest: str) -> str:
    """The operand list of an instruction (up to its closing parenthesis)."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i]
    return rest


class _Roofline:
    def __init__(self, hlo: str, peak: float, bandwidth: float, int8_peak: float = V5E_PEAK_INT8_OPS,
                 branch_shares: dict[int, tuple[float, ...]] | None = None):
        self.comps, self.entry = _parse(hlo)
        self.peak, self.bw, self.int8_peak = peak, bandwidth, int8_peak
        self.branch_shares = branch_shares or {}
        self.types = {i.name: i.type for c in self.comps.values() for i in c}
        self._flops: dict[str, float] = {}
        self.ops: list[dict] = []  # every costed op: where the projected time goes

    def _operand_shapes(self, ins: _Instr) -> list[tuple[str, list[int]]]:
        ops = _operand_text(ins.rest)
        shapes = _dims(ops)
        if shapes:  # operands printed with their types
            return shapes
        return [s for n in re.findall(r"%([\w.\-]+)", ops) for s in _dims(self.types.get(n, ""))]

    def _operand_bytes(self, ins: _Instr) -> float:
        ops = _operand_text(ins.rest)
        if _dims(ops):
            return _nbytes(ops)
        return sum(_nbytes(self.types.get(n, "")) for n in re.findall(r"%([\w.\-]+)", ops))

    def _conv_flops(self, ins: _Instr) -> float:
        """2 x outputs x input features x the window taps that meet real input. XLA:TPU writes batched
        matmuls as convolutions whose window runs over a dilated or padded spatial dim; only the taps
        that land on input elements count (at most the input's size, the window / lhs dilation)."""
        out, ops = _dims(ins.type), self._operand_shapes(ins)
        m = re.search(r"dim_labels=([^_]*)_([^-]*)->", ins.rest)
        if not out or len(ops) < 2 or not m:
            return 0.0
        lhs_l, rhs_l = m.group(1), m.group(2)
        lhs, kernel = ops[0][1], ops[1][1]
        if len(lhs_l) != len(lhs) or len(rhs_l) != len(kernel) or "i" not in rhs_l:
            return 0.0
        win = re.search(r"window=\{([^}]*)\}", ins.rest)
        wtext = win.group(1) if win else ""

        def per_dim(key):
            mm = re.search(rf"\b{key}=([0-9x]+)", wtext)
            return [int(v) for v in mm.group(1).split("x")] if mm else None

        size, dil = per_dim("size"), per_dim("lhs_dilate")
        taps = 1
        spatial = [c for c in lhs_l if c.isdigit()]
        for c in spatial:
            d = int(c)
            w = size[d] if size and d < len(size) else 1
            ld = dil[d] if dil and d < len(dil) else 1
            taps *= max(1, min(w, lhs[lhs_l.index(c)], -(-w // ld)))
        return 2.0 * math.prod(out[0][1]) * kernel[rhs_l.index("i")] * taps

    def instr_flops(self, ins: _Instr) -> float:
        if ins.op == "dot":
            out = _dims(ins.type)
            lhs = self._operand_shapes(ins)
            m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest)
            if not out or not lhs or not m:
                return 0.0
            k = math.prod(lhs[0][1][int(i)] for i in m.group(1).split(",") if i)
            return 2.0 * math.prod(out[0][1]) * k
        if ins.op == "convolution":
            return self._conv_flops(ins)
        if ins.op == "custom-call" and "tpu_custom_call" in ins.rest:
            # A Mosaic attention kernel: q [..., Lq, H] and k [..., Lk, H] (the same rank) among its operands;
            # QK^T and PV are 4 * (q elements) * (keys computed) FLOPs. Splash's block-sparse mask info comes
            # first (int8 [heads, q blocks, kv steps]): each q tile runs kv steps tiles of keys (the tiles a
            # band touches, partly masked ones included; this package's tiles are square), else all Lk keys.
            # Other kernels (``norm_rope_heads``: x with [L, H] tables) have no matmul: 0 FLOPs.
            shapes = self._operand_shapes(ins)
            big = sorted((d for t, d in shapes if len(d) >= 2 and t.startswith(("bf", "f"))),
                         key=math.prod, reverse=True)
            k = next((d for d in big[1:] if d[-1] == big[0][-1] and len(d) == len(big[0])), None) if big else None
            if not k:
                return 0.0
            keys = k[-2]
            info = next((d for t, d in shapes if t == "s8" and len(d) == 3), None)
            if info and info[1] and big[0][-2] % info[1] == 0:
                keys = min(keys, info[2] * (big[0][-2] // info[1]))
            return 4.0 * math.prod(big[0]) * keys
        sub = _attr(ins.rest, "calls") or _attr(ins.rest, "to_apply")
        if ins.op in ("fusion", "call") and sub:
            return self.comp_flops(sub)
        return 0.0

    def int8_matmul(self, ins: _Instr) -> bool:
        """A dot or convolution with int8 operands (or a fusion / call holding one): timed at the int8 peak."""
        if ins.op in ("dot", "convolution"):
            types = [t for t, _ in self._operand_shapes(ins)[:2]]
            return len(types) == 2 and all(t == "s8" for t in types)
        sub = _attr(ins.rest, "calls") or _attr(ins.rest, "to_apply")
        return ins.op in ("fusion", "call") and bool(sub) and any(self.int8_matmul(i) for i in self.comps.get(sub, []))

    def trip_count(self, ins: _Instr) -> int:
        """A while loop's trip count: XLA's known_trip_count, else the constant its condition compares
        the induction variable with (``i < N``, i from 0: how scans and fori_loops lower)."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.rest)
        if m:
            return int(m.group(1))
        cond = self.comps.get(_attr(ins.rest, "condition") or "", [])
        consts = {i.name: int(c.group(1)) for i in cond if i.op == "constant"
                  for c in [re.match(r"(-?\d+)\)", i.rest)] if c}
        for i in cond:
            if i.op == "compare":
                hit = [consts[n] for n in re.findall(r"%([\w.\-]+)", _operand_text(i.rest)) if n in consts]
                if hit:
                    return max(1, hit[0])
        return 1

    def comp_flops(self, comp: str) -> float:
        if comp not in self._flops:
            self._flops[comp] = 0.0  # recursion guard
            self._flops[comp] = sum(self.instr_flops(i) for i in self.comps.get(comp, []))
        return self._flops[comp]

    def run(self, comp: str | None = None, times: float = 1.0, acc=None, trips: int = 1) -> dict:
        acc = acc if acc is not None else {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "compute_bound_seconds": 0.0,
                                           "loops": []}
        for ins in self.comps.get(comp or self.entry, []):
            if ins.op in _FREE:
                continue
            if ins.op == "while":
                n = self.trip_count(ins)
                acc["loops"].append({"body": _attr(ins.rest, "body"), "trip_count": n})
                self.run(_attr(ins.rest, "body"), times * n, acc, n)
                continue
            if ins.op == "conditional":
                # In a loop of a trip count in ``branch_shares`` (the encoder's layers), each branch weighted by
                # the share of runs that take it (full / sliding layers); else the costliest branch every time
                # (an upper bound).
                m = re.search(r"branch_computations=\{([^}]*)\}", ins.rest)
                names = [b.strip().lstrip("%") for b in m.group(1).split(",")] if m else \
                    [x for x in (_attr(ins.rest, "true_computation"), _attr(ins.rest, "false_computation")) if x]
                subs = [self.run(b, times, {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "compute_bound_seconds": 0.0,
                                            "loops": acc["loops"]}, trips) for b in names]
                shares = self.branch_shares.get(trips)
                if subs and shares and len(shares) == len(subs):
                    for k in ("seconds", "flops", "bytes", "compute_bound_seconds"):
                        acc[k] += sum(w * a[k] for w, a in zip(shares, subs))
                elif subs:
                    worst = max(subs, key=lambda a: a["seconds"])
                    for k in ("seconds", "flops", "bytes", "compute_bound_seconds"):
                        acc[k] += worst[k]
                continue
            if ins.op == "call" and _attr(ins.rest, "to_apply"):
                self.run(_attr(ins.rest, "to_apply"), times, acc, trips)
                continue
            f = self.instr_flops(ins)
            if ins.op in ("dynamic-slice", "slice"):  # reads only the slice it returns
                b = 2 * _nbytes(ins.type)
            elif ins.op == "copy-start":  # async: (destination, source, context); the HBM side(s) once
                b = _nbytes(ins.type)
            elif ins.op == "slice-start":  # async: ((source), slice, context): moves only the slice
                b = _slice_start_bytes(ins.type)
            elif ins.op == "dynamic-update-slice":  # in place: reads and writes the update only
                ups = self._operand_shapes(ins)
                b = 2 * (_BYTES[ups[1][0]] * math.prod(ups[1][1]) if len(ups) > 1 else _nbytes(ins.type))
            else:
                b = self._operand_bytes(ins) + _nbytes(ins.type)
            peak = self.int8_peak if f and self.int8_matmul(ins) else self.peak
            t = max(f / peak, b / self.bw)
            self.ops.append({"computation": comp or self.entry, "name": ins.name, "op": ins.op, "times": times,
                             "seconds": times * t, "flops": times * f, "bytes": times * b})
            acc["seconds"] += times * t
            acc["flops"] += times * f
            acc["bytes"] += times * b
            if f / peak >= b / self.bw:
                acc["compute_bound_seconds"] += times * t
        return acc


def hlo_roofline(hlo_text: str, peak: float = V5E_PEAK_FLOPS, bandwidth: float = V5E_HBM_BANDWIDTH,
                 ops: bool = False, branch_shares: dict[int, tuple[float, ...]] | None = None) -> dict:
    """Projected seconds of one run of an optimised HLO module on one chip (see the module docstring):
    {"seconds", "flops", "bytes", "compute_bound_seconds", "loops"} (and, with ``ops``, every costed op
    with its seconds, FLOPs and bytes; a conditional's branches all listed, each for all its runs).
    ``branch_shares``: {loop trip count: the share of runs taking each branch} for the conditionals in the
    body of a loop of that trip count (``layer_branch_shares``: the scanned layers); any other conditional
    costs its costliest branch."""
    r = _Roofline(hlo_text, peak, bandwidth, branch_shares=branch_shares)
    out = r.run()
    if ops:
        out["ops"] = r.ops
    return out


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
    roof = hlo_roofline(hlo, branch_shares=branch_shares)
    sec = roof["seconds"]
    row = {"hbm_bytes": mem["hbm_bytes"], "memory": mem, "hbm_fraction": mem["hbm_bytes"] / topologies.V5E_HBM_BYTES,
           "flops_per_chip": roof["flops"], "bytes_per_chip": roof["bytes"], "projected_seconds": sec,
           "projected_tokens_per_second_per_chip": tokens / sec if sec > 0 else None,
           "compute_bound_share": roof["compute_bound_seconds"] / sec if sec > 0 else None,
           "loop_trip_counts": sorted({lp["trip_count"] for lp in roof["loops"]}),
           "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
           "projection_method": PROJECTION_METHOD, "compile_seconds": round(seconds_compile, 2)}
    if model_flops_per_token is not None and sec > 0:
        row["projected_mfu"] = model_flops_per_token * tokens / sec / peak
    return row


def model_configs(model: str | None):
    """(encoder config, head config): a model folder's configs (no weights read), or the built-in
    EmbeddingGemma-300m config."""
    from embeddinggemma_jax.config import EncoderConfig, HeadConfig

    if model is None:
        return EncoderConfig(), HeadConfig()
    from embeddinggemma_jax import hub
    from embeddinggemma_jax.weights import read_folder_configs

    return read_folder_configs(hub.resolve(model))


@dataclass
class _Spec:  # what ShardedEncoder reads off a model
    graphdef: object
    state: object
    attention_impl: str


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
    from embeddinggemma_jax.batch.job import rows_table
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
    enc = ShardedEncoder(_Spec(graphdef, state, impl), mesh, topo.rules_table, place=False)
    all_buckets = buckets_for(head_cfg.max_seq_length, topo.buckets)
    chosen = tuple(buckets) if buckets else all_buckets
    bad = [L for L in chosen if L not in all_buckets]
    if bad:
        raise ValueError(f"bucket {bad[0]} is not one of {topo.name}'s buckets: {', '.join(map(str, all_buckets))}")
    table = rows or rows_table(topo, all_buckets, tokens_per_chip)
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
                   "remat_policy")


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
    rc = options.build(RunConfig, overrides, options.read_config(config, RunConfig), train_file="-", output_dir="-")
    cfg = rc.train
    chips = math.prod(cfg.mesh_shape) if cfg.mesh_shape else int(Path(config).stem.rsplit("-", 1)[-1])
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
    row = {"length": L, "rows_per_chip": 2 * A * B // (chips * num_slices), "attention": "xla",
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


def markdown(out: dict) -> str:
    lines = ["| bucket L | rows/chip | attention | HBM/chip (GiB) | of 16 GiB | FLOPs/chip | projected ms/step "
             "| projected tokens/s/chip | projected MFU |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for b in out["buckets"]:
        if b.get("out_of_hbm"):
            lines.append(f"| {b['length']} | {b['rows_per_chip']} | {b['attention']} | {b['hbm_bytes'] / 2**30:.2f} | "
                         f"{100 * b['hbm_fraction']:.0f}% | does not compile (out of HBM) | | | |")
            continue
        mfu = b.get("projected_mfu")
        lines.append(f"| {b['length']} | {b['rows_per_chip']} | {b['attention']} | {b['hbm_bytes'] / 2**30:.2f} | "
                     f"{100 * b['hbm_fraction']:.0f}% | {b['flops_per_chip']:.3g} | {b['projected_seconds'] * 1e3:.2f} | "
                     f"{b['projected_tokens_per_second_per_chip']:,.0f} | "
                     + (f"{100 * mfu:.0f}%" if mfu is not None else "") + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
TPU_COMPILE_DESCRIPTION = (
    "Compile exactly the program the batch job runs (or, with --train, the training step) for a TPU v5e "
    "slice through libtpu's compiler on this host (no TPU needed), for every bucket, and print per bucket "
    "the per-chip HBM from memory_analysis() and a roofline PROJECTION of time from the optimised HLO. "
    f"Exits 1 when a bucket needs more than {HBM_MARGIN:.0%} of 16 GiB.")


def _ints(text: str) -> tuple[int, ...]:
    import argparse

    from embeddinggemma_jax.options import ints

    out = ints(text)
    if not out or min(out) < 1:  # '' would otherwise mean "no filter": the full sweep
        raise argparse.ArgumentTypeError(f"expected positive comma-separated lengths (e.g. 128,512), got {text!r}")
    return out


def add_tpu_compile_arguments(p) -> None:
    from embeddinggemma_jax.quant import MODE_NAMES  # imports jax: not before the topology environment is set

    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--topology", choices=list(topologies.TOPOLOGIES), help="a tpu/configs slice: the job's step")
    g.add_argument("--train", metavar="CONFIG", help="a tpu/train/*.json config: the training step")
    p.add_argument("--buckets", type=_ints, help="only these buckets, comma-separated (default: all)")
    p.add_argument("--slices", type=int, default=1, help="slices of the topology, data parallel over the "
                                                         "data-centre network (default: 1)")
    p.add_argument("--model", default=None, help="a model folder or hub id whose configs to use (no weights are "
                                                 "read; default: the built-in EmbeddingGemma-300m config)")
    p.add_argument("--quantize", choices=MODE_NAMES, help="compile the job's step with the parameters of "
                   "this quantization mode (--topology only); int8 x int8 matmuls timed at 394 TOPS")
    p.add_argument("--tokens-per-chip", type=int, default=None,
                   help="rows per bucket from this token budget per chip instead of the topology's rows (a what-if)")
    from embeddinggemma_jax import options
    from embeddinggemma_jax.train.run import RunConfig

    g = p.add_argument_group("with --train: override the config's settings (the train command's flags)")
    options.add_arguments(g, RunConfig, only=TRAIN_OVERRIDES)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (after every bucket)")
    p.add_argument("--resume", action="store_true", help="keep the buckets of an earlier --json FILE of the same "
                                                         "topology, slices, rows and quantization; compile only the others")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("--hlo", metavar="DIR", help="write each bucket's optimised HLO into DIR (L<length>.hlo.txt)")


def check_json_target(path) -> None:
    """Refuse, before compiling, a --json FILE that exists and is not an earlier tpu-compile result."""
    p = Path(path)
    if not p.exists():
        return
    try:
        old = json.loads(p.read_text(encoding="utf-8"))
        ours = isinstance(old, dict) and {"topology", "buckets", "hbm_limit_bytes"} <= set(old)
    except (OSError, UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        raise InputError(f"--json {path} exists and is not a tpu-compile result; refusing to replace it: "
                         "pass a new file name")


def train_overrides(args) -> dict:
    """The ``TRAIN_OVERRIDES`` flags given on the command line (argparse leaves out the others)."""
    return {k: getattr(args, k) for k in TRAIN_OVERRIDES if hasattr(args, k)}


def check_hlo_target(folder) -> None:
    """Refuse, before compiling, a --hlo DIR holding an ``L<length>.hlo.txt`` that is not an HLO module
    (the files --hlo writes): the user's own file of that name is never replaced."""
    for p in sorted(Path(folder).glob("L*.hlo.txt")) if Path(folder).is_dir() else []:
        with open(p, "rb") as f:
            if not f.read(9) == b"HloModule":
                raise InputError(f"--hlo {folder}: {p.name} exists and is not an HLO module written by tpu-compile; "
                                 "refusing to replace it: pass another folder")


def cmd_tpu_compile(args) -> int:
    from embeddinggemma_jax.io_utils import atomic_write_json

    if args.json:
        check_json_target(args.json)
    if args.hlo:
        check_hlo_target(args.hlo)
    if args.slices < 1:
        raise ValueError(f"--slices must be >= 1, got {args.slices}")
    if args.train:
        if args.buckets or args.tokens_per_chip or args.resume:
            raise ValueError("--buckets, --tokens-per-chip and --resume are for --topology; a --train config has "
                             "one length (max_length)")
        if args.quantize:
            raise ValueError("--quantize is for --topology (the inference job); training runs in float")
        out = compile_train(args.train, args.model, args.slices, overrides=train_overrides(args), hlo_dir=args.hlo)
    else:
        if train_overrides(args):
            raise ValueError(f"--{next(iter(train_overrides(args))).replace('_', '-')} is for --train "
                             "(a train config's setting); --topology compiles the batch job")
        if args.tokens_per_chip is not None and args.tokens_per_chip < 1:
            raise ValueError(f"--tokens-per-chip must be >= 1, got {args.tokens_per_chip}")
        earlier = json.loads(Path(args.json).read_text(encoding="utf-8")) if args.resume and args.json and \
            Path(args.json).exists() else None
        save = (lambda o: atomic_write_json(args.json, o)) if args.json else None
        out = compile_job(args.topology, args.buckets, args.model, args.slices, quantize=args.quantize,
                          tokens_per_chip=args.tokens_per_chip, earlier=earlier, on_bucket=save, hlo_dir=args.hlo)
    print(f"{out['topology']} x{out['num_slices']} ({out['chips']} chips, {out['hosts']} hosts, mesh {out['mesh']}): "
          + ("every bucket fits" if out["fits"] else f"buckets {out['too_big']} need more than "
             f"{HBM_MARGIN:.0%} of 16 GiB") + "; times are projections (" + PROJECTION_METHOD + ")")
    if args.markdown:
        print(markdown(out))
    if args.json:
        atomic_write_json(args.json, out)
    return 0 if out["fits"] else 1


__all__ = ["compile_job", "compile_train", "hlo_roofline", "slice_devices", "memory", "cmd_tpu_compile",
           "add_tpu_compile_arguments"]
