"""Where the v5e train step's projected time goes: the compiled FLOPs against the model's, and the roofline's
op list of an optimised HLO (``tpu-compile --train CONFIG --hlo DIR``) grouped by pass and by kind of op.

    python benchmarks/train_mfu_breakdown.py tpu/compiled/train-v5litepod-8.json [--hlo DIR/L256.hlo.txt] [--json OUT]
    python benchmarks/train_mfu_breakdown.py tpu/compiled/train-v5litepod-16.json \
        --compare tpu/compiled/train-search/v5litepod-16-remat-dots.json
    python benchmarks/train_mfu_breakdown.py OLD.json --hlo DIR --reproject NEW.json   # today's roofline over
                                                                                        # the HLO OLD's compile wrote

Passes come from the op metadata the train step's ``jax.named_scope``s leave (``cached_embed_pass``,
``cached_loss``, ``cached_backward_pass``, ``forward``, ``optimizer``); inside a backward pass, ops that JAX
names ``transpose(...)`` are the backward proper, the others the recomputed (remat) forward. Kinds:
``matmul`` (a dot or convolution, or a fusion holding one, of no [.., L, L] operand), ``attention`` (any
op with an [.., L, L] operand or result: the XLA attention's scores, mask, softmax and their gradients),
``collective``, ``copy`` and ``elementwise`` (everything else: norms, residual adds, casts, RoPE, the
optimiser's updates).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PASSES = ("cached_embed_pass", "cached_loss", "cached_backward_pass", "optimizer", "forward")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def model_summary(result: dict) -> dict:
    """Compiled FLOPs over the forward's, and the compute / HBM time of the step, from a train result."""
    from embeddinggemma_jax.costs import flops_per_token
    from embeddinggemma_jax.tpu_aot import model_configs

    enc, _ = model_configs(None)
    b = result["buckets"][0]
    fwd = flops_per_token(enc, b["length"]) * b["tokens_per_chip"]
    return {"config": result["config"], "chips": result["chips"], "batch_size": b["batch_size"],
            "mini_batch_size": b.get("mini_batch_size"), "remat": b["remat"],
            "remat_policy": b.get("remat_policy", "full" if b["remat"] else None),
            "forward_flops_per_chip": fwd, "compiled_flops_per_chip": b["flops_per_chip"],
            "compiled_over_forward": b["flops_per_chip"] / fwd,
            "seconds_at_peak_flops": b["flops_per_chip"] / result["peak_flops"],
            "seconds_at_hbm_bandwidth": b["bytes_per_chip"] / result["hbm_bandwidth"],
            "projected_seconds": b["projected_seconds"], "compute_bound_share": b["compute_bound_share"],
            "projected_mfu": b.get("projected_mfu"), "hbm_fraction": b["hbm_fraction"],
            # 3 x forward counted (the README's MFU): the share of the compiled FLOPs that MFU credits
            "mfu_ceiling_at_full_mxu": 3 * fwd / b["flops_per_chip"]}


def op_breakdown(hlo_text: str, length: int) -> dict:
    """{(pass, kind): {"seconds", "flops", "bytes", "ops"}} over the roofline's costed ops."""
    from embeddinggemma_jax.config import EncoderConfig
    from embeddinggemma_jax.roofline import _parse, hlo_roofline
    from embeddinggemma_jax.tpu_aot import layer_branch_shares

    roof = hlo_roofline(hlo_text, ops=True, branch_shares=layer_branch_shares(EncoderConfig()))
    comps, _ = _parse(hlo_text)
    rest = {(c, i.name): i.rest + " " + i.type for c, ins in comps.items() for i in ins}
    sq = re.compile(rf"\[[0-9,]*\b{length},{length}\]")
    out: dict = defaultdict(lambda: {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "ops": 0})
    for op in roof["ops"]:
        text = rest.get((op["computation"], op["name"]), "")
        m = re.search(r'op_name="([^"]*)"', text)
        name = m.group(1) if m else ""
        phase = next((p for p in PASSES if f"/{p}/" in f"/{name}/" or f"/{p})" in name or f"({p}" in name), "other")
        if phase == "cached_backward_pass" or phase == "forward":
            phase += "/backward" if "transpose(" in name else "/forward"
        if op["op"] in COLLECTIVES or any(op["op"].startswith(c) for c in COLLECTIVES):
            kind = "collective"
        elif sq.search(text):
            kind = "attention"
        elif op["flops"] > 0:
            kind = "matmul"
        elif op["op"] in ("copy", "copy-start", "transpose"):
            kind = "copy"
        else:
            kind = "elementwise"
        acc = out[(phase, kind)]
        acc["seconds"] += op["seconds"]
        acc["flops"] += op["flops"]
        acc["bytes"] += op["bytes"]
        acc["ops"] += 1
    return {"total_seconds": roof["seconds"],
            "rows": sorted(({"pass": p, "kind": k, **v} for (p, k), v in out.items()), key=lambda r: -r["seconds"])}


def markdown(summary: dict, ops: dict | None) -> str:
    s = summary
    lines = [f"**{s['config']}** ({s['chips']} chips, batch {s['batch_size']}, mini-batch {s['mini_batch_size']}, "
             f"remat {s['remat_policy']}): compiled FLOPs = {s['compiled_over_forward']:.2f} x the forward's; at "
             f"v5e's peak they take {s['seconds_at_peak_flops']:.2f} s, the HBM traffic "
             f"{s['seconds_at_hbm_bandwidth']:.2f} s at full bandwidth; projected {s['projected_seconds']:.2f} s "
             f"(MFU {100 * s['projected_mfu']:.1f}%, ceiling at full MXU use {100 * s['mfu_ceiling_at_full_mxu']:.0f}%; "
             f"{100 * s['hbm_fraction']:.0f}% of HBM)."]
    if ops:
        lines += ["", "| pass | kind | projected s | share | TFLOP | HBM GB | ops |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in ops["rows"]:
            if r["seconds"] < 0.005 * ops["total_seconds"]:
                continue
            lines.append(f"| {r['pass']} | {r['kind']} | {r['seconds']:.3f} | {100 * r['seconds'] / ops['total_seconds']:.1f}% "
                         f"| {r['flops'] / 1e12:.1f} | {r['bytes'] / 1e9:.0f} | {r['ops']} |")
    return "\n".join(lines)


def compare(paths: list[str], root: Path | None = None) -> str:
    """A before/after table of several train results (docs/training-tpu.md)."""
    lines = ["| result | compiled FLOPs / forward | s at peak FLOPs | s at HBM bandwidth | projected step (s) "
             "| projected MFU | HBM/chip |", "|---|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        full = root / path if root else path
        d = model_summary(_load(full))
        b = _load(full)["buckets"][0]
        how = (f"{b.get('rules', 'data_parallel').replace('_', ' ')}, mini-batch {b.get('mini_batch_size')}, "
               f"remat {d['remat_policy']}, attention "
               f"{b.get('attention', 'xla')}, roofline v{b.get('roofline_version', 1)}")
        lines.append(f"| `{path}` ({how}) | {d['compiled_over_forward']:.2f} | "
                     f"{d['seconds_at_peak_flops']:.2f} | {d['seconds_at_hbm_bandwidth']:.2f} | "
                     f"{d['projected_seconds']:.2f} | {100 * d['projected_mfu']:.1f}% | {100 * d['hbm_fraction']:.0f}% |")
    return "\n".join(lines)


def _load(path) -> dict:
    result = json.loads(Path(path).read_text())
    if "buckets" not in result:  # a probe of tpu/compiled/train-search (one row with its slice's fields)
        from embeddinggemma_jax.roofline import V5E_HBM_BANDWIDTH, V5E_PEAK_FLOPS

        result = {"config": result["config"], "chips": result["chips"], "peak_flops": V5E_PEAK_FLOPS,
                  "hbm_bandwidth": V5E_HBM_BANDWIDTH, "buckets": [result]}
    return result


COMPILED = ROOT / "tpu" / "compiled"
# per config: the results before and after each change (docs/training-tpu.md), then the HLO of the last
CHANGES = {
    8: (["train-search/v5litepod-8-xla-roofline1.json", "train-search/v5litepod-8-xla.json",
         "train-v5litepod-8.json"], "hlo/train-v5litepod-8"),
    16: (["train-search/v5litepod-16-xla-roofline1.json", "train-search/v5litepod-16-xla.json",
          "train-search/v5litepod-16-fsdp-splash.json", "train-search/v5litepod-16-fsdp-m2048-splash.json",
          "train-v5litepod-16.json"], "hlo/train-v5litepod-16"),
}


def blocks() -> dict:
    """docs/training-tpu.md: the before/after table per config and the op-by-op table of today's step."""
    out = {}
    for chips, (files, hlo) in CHANGES.items():
        have = [f for f in files if (COMPILED / f).exists()]
        if not have:
            continue
        rel = [str((COMPILED / f).relative_to(ROOT)) for f in have]
        out[f"TRAIN_MFU_CHANGES_{chips}"] = compare(rel, ROOT)
        gz = COMPILED / hlo / "L256.hlo.txt.gz"
        if gz.exists():
            import gzip

            result = _load(COMPILED / have[-1])
            ops = op_breakdown(gzip.decompress(gz.read_bytes()).decode(), result["buckets"][0]["length"])
            out[f"TRAIN_MFU_OPS_{chips}"] = markdown(model_summary(result), ops)
    dots = ["train-search/v5litepod-16-xla-roofline1.json", "train-search/v5litepod-16-remat-dots.json"]
    if all((COMPILED / f).exists() for f in dots):
        out["TRAIN_MFU_REMAT_DOTS"] = compare([str((COMPILED / f).relative_to(ROOT)) for f in dots], ROOT)
    readme = {k: v for k, v in out.items() if k == "TRAIN_MFU_CHANGES_8"}
    return {"training-tpu.md": out, "../README.md": readme} if out else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a tpu-compile --train --json result")
    p.add_argument("--hlo", help="its optimised HLO: tpu-compile --hlo DIR's folder (L<length>.hlo.txt, or .txt.gz)")
    p.add_argument("--reproject", metavar="OUT", help="write RESULT re-projected by today's roofline from --hlo's "
                                                      "HLO (tpu_aot.reproject; the compiler's memory stays)")
    p.add_argument("--json", help="write the summary and the op breakdown here")
    p.add_argument("--compare", nargs="+", metavar="RESULT", help="print a before/after table of RESULT and these")
    a = p.parse_args(argv)
    if a.compare:
        print(compare([a.result, *a.compare]))
        return 0
    result = _load(a.result)
    if a.reproject:
        from embeddinggemma_jax.io_utils import atomic_write_json
        from embeddinggemma_jax.tpu_aot import reproject
        from embeddinggemma_jax.tpu_compile import check_json_target

        check_json_target(a.reproject)  # a user's file that is not a tpu-compile result is refused, not replaced
        result = reproject(result, a.hlo)
        atomic_write_json(a.reproject, result)
    summary = model_summary(result)
    ops = None
    if a.hlo:
        import gzip

        hlo = Path(a.hlo)
        if hlo.is_dir():
            hlo = hlo / f"L{result['buckets'][0]['length']}.hlo.txt"
        text = hlo.read_text() if hlo.exists() else gzip.decompress(hlo.with_suffix(".txt.gz").read_bytes()).decode()
        ops = op_breakdown(text, result["buckets"][0]["length"])
    print(markdown(summary, ops))
    if a.json:
        from embeddinggemma_jax.io_utils import atomic_write_bytes

        atomic_write_bytes(a.json, (json.dumps({"summary": summary, "ops": ops}, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
