"""A roofline projection of an optimised HLO module's time on one chip (``hlo_roofline``).

Every top-level op of the entry computation and of loop bodies (times their trip count) takes
max(FLOPs / peak, bytes / HBM bandwidth): FLOPs from each dot and convolution inside the op (and, for a
Mosaic attention kernel, attention FLOPs over the key tiles its block-sparse grid runs), bytes from the
op's operands and result where they live in HBM (not VMEM, ``S(1)``; an asynchronous slice moves its
slice). A conditional in a loop counts each branch for the share of runs that take it (``branch_shares``),
else its costliest branch. Collectives, host transfers and the overlap of asynchronous copies with
compute are not in it.

Why the optimised HLO *text* and not ``jax.experimental.roofline``: that module (jax 0.10) estimates a
jaxpr, before XLA, from per-primitive rules: it does not see what XLA:TPU compiles (fusions, the layout
of each buffer and whether it sits in VMEM, the loops' trip counts, Mosaic kernels as opaque custom
calls), which is what this projection is about. The compiled program is only reachable as text:
jaxlib's ``HloModule`` bindings list computations and instructions (name, opcode, operands) but not
their shapes, layouts or attributes (dot dimensions, convolution windows, ``known_trip_count``, branch
computations), and jaxlib ships no HLO proto schema. So the text is parsed, defensively: a line that is
not an instruction is skipped, an op whose FLOPs cannot be read costs its bytes only, a loop without a
readable trip count runs once (the result's ``loops`` lists what was found, so a test can check it).
The text is not a stable API; ``tests/test_tpu_compile.py`` pins the parse against programs compiled by
the installed libtpu.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

V5E_PEAK_FLOPS = 197e12  # bf16, one chip
V5E_PEAK_INT8_OPS = 394e12  # int8 x int8 matmuls on the MXU, one chip (--quantize int8)
V5E_HBM_BANDWIDTH = 819e9  # bytes/s, one chip

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

    def fusion_bytes(self, ins: _Instr) -> float | None:
        """HBM bytes of a fusion, as XLA runs it: a result that is a ``dynamic-update-slice`` of one of the
        fusion's parameters is updated in place (the buffer is neither read nor rewritten: the update is
        written), and a parameter the fusion only slices (``dynamic-slice`` / ``slice``, through bitcasts) is
        read only where sliced. A scan's per-layer reads of stacked weights and its writes of stacked
        residuals and gradients are such fusions: counting their whole buffers charged every layer of
        every pass with all 24 layers' bytes. None when the fusion's operands cannot be matched to its
        parameters (then the caller counts every operand and the result in full)."""
        body = self.comps.get(_attr(ins.rest, "calls") or "")
        ops = _operand_text(ins.rest)
        if not body or _dims(ops):
            return None
        names = re.findall(r"%([\w.\-]+)", ops)
        read = [_nbytes(self.types.get(n, "")) for n in names]
        local = {i.name: i for i in body}
        params = {}
        for i in body:
            m = re.match(r"(\d+)\)", i.rest) if i.op == "parameter" else None
            if m and int(m.group(1)) < len(read):
                params[i.name] = int(m.group(1))
        if len(params) != len(read):
            return None
        users: dict[str, list[_Instr]] = {}
        for i in body:
            for n in re.findall(r"%([\w.\-]+)", _operand_text(i.rest)):
                users.setdefault(n, []).append(i)

        def source(name):  # the parameter behind a chain of bitcasts
            while name in local and local[name].op == "bitcast":
                name = (re.findall(r"%([\w.\-]+)", _operand_text(local[name].rest)) or [""])[0]
            return name

        write = _nbytes(ins.type)
        root = body[-1]  # the printer writes the ROOT instruction last
        roots = [local[n] for n in re.findall(r"%([\w.\-]+)", _operand_text(root.rest)) if n in local] \
            if root.op == "tuple" else [root]
        for r in roots:
            args = re.findall(r"%([\w.\-]+)", _operand_text(r.rest))
            if r.op == "dynamic-update-slice" and len(args) > 1 and source(args[0]) in params:
                buf = _SHAPE.findall(r.type)
                upd = _dims(local[args[1]].type) if args[1] in local else []
                if buf and upd and "S(1)" not in (buf[0][2] or ""):
                    read[params[source(args[0])]] = 0.0
                    write += _BYTES[buf[0][0]] * math.prod(upd[0][1]) - _nbytes(r.type)

        def sliced_reads(name):  # bytes read by the slices of ``name`` (None: some other use reads it whole)
            total = 0.0
            for u in users.get(name, []):
                if u.op == "bitcast":
                    sub = sliced_reads(u.name)
                    if sub is None:
                        return None
                    total += sub
                elif u.op in ("dynamic-slice", "slice") and re.findall(r"%([\w.\-]+)", _operand_text(u.rest))[0] == name:
                    total += sum(_BYTES[t] * math.prod(int(x) for x in d.split(",") if x)
                                 for t, d, _ in _SHAPE.findall(u.type))
                elif not (u.op == "dynamic-update-slice" and u in roots):
                    return None
            return total

        for name, k in params.items():
            if read[k]:
                sliced = sliced_reads(name)
                if sliced is not None and users.get(name):
                    read[k] = min(read[k], sliced)
        return sum(read) + write

    def comp_flops(self, comp: str) -> float:
        if comp not in self._flops:
            self._flops[comp] = 0.0  # recursion guard
            self._flops[comp] = sum(self.instr_flops(i) for i in self.comps.get(comp, []))
        return self._flops[comp]

    def run(self, comp: str | None = None, times: float = 1.0, acc=None, trips: int = 1) -> dict:
        acc = acc if acc is not None else {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "compute_bound_seconds": 0.0,
                                           "loops": []}
        for ins in self.comps.get(comp or self.entry, []):
            if ins.op in _FREE or (ins.op == "custom-call" and 'custom_call_target="AllocateBuffer"' in ins.rest):
                continue  # no data moves (AllocateBuffer: an uninitialised output buffer)
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
            elif ins.op == "fusion" and (fb := self.fusion_bytes(ins)) is not None:
                b = fb
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


__all__ = ["hlo_roofline", "V5E_PEAK_FLOPS", "V5E_PEAK_INT8_OPS", "V5E_HBM_BANDWIDTH"]
