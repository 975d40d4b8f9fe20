"""The largest contrastive batch of a tpu/train config that fits a v5e chip's HBM, from the TPU compiler.

Each probe is ``tpu-compile --train CONFIG --batch-size B [--cached-loss --mini-batch-size M] [--fsdp|--no-fsdp]``
(``tpu_compile.compile_train`` with those overrides); a probe fits when the compiled step needs at most
``tpu_compile.HBM_MARGIN`` (90%) of 16 GiB per chip, and does not when it needs more or when XLA:TPU refuses
it for lack of HBM. The search doubles B from ``--start`` until a probe does not fit (or ``--max`` is
reached), then bisects on a coarse grid (``--bisect`` steps between the last fit and the first misfit, in
multiples of the batch's granularity: the chip count, or M with the cache). Every probe is written to
``OUT/<config>-<rules>-<cached>-b<B>.json`` (atomically) and reused by later runs, so searches can run in
parallel processes and be resumed; ``--table`` prints the markdown table of a folder's probes.

    python benchmarks/train_batch_search.py tpu/train/v5litepod-8.json --cached --mini-rows-per-chip 64 \\
        --start 4096 --max 32768 --out tpu/compiled/train-search
    python benchmarks/train_batch_search.py --table --out tpu/compiled/train-search
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from embeddinggemma_jax import tpu_compile as tc
from embeddinggemma_jax.io_utils import atomic_write_json

GIB = 1 << 30


def chips_of(config: str) -> int:
    cfg = json.loads(Path(config).read_text())
    return math.prod(cfg["mesh"]) if cfg.get("mesh") else int(Path(config).stem.rsplit("-", 1)[-1])


def probe(config: str, batch: int, cached: bool, mini: int | None, fsdp: bool | None, out: Path) -> dict:
    rules = {None: "config", True: "fsdp", False: "dp"}[fsdp]
    path = out / f"{Path(config).stem}-{rules}-{'cached' if cached else 'uncached'}-b{batch}.json"
    if path.exists():
        return json.loads(path.read_text())
    ov = {"batch_size": batch, "cached_loss": cached, "grad_accum": 1}
    if cached:
        ov["mini_batch_size"] = mini
    if fsdp is not None:
        ov["fsdp"] = fsdp
    res = tc.compile_train(config, overrides=ov, log=lambda s: print(f"{Path(config).stem}: {s}", flush=True))
    (row,) = res["buckets"]
    row.update(config=config, chips=res["chips"], hosts=res["hosts"], mesh=res["mesh"], fits=res["fits"])
    atomic_write_json(path, row)
    return row


def search(config: str, cached: bool, mini: int | None, fsdp: bool | None, start: int, cap: int, bisect: int,
           out: Path) -> tuple[int | None, int | None]:
    """(largest batch that fits, smallest that does not) on the doubling-then-bisection grid."""
    grain = mini if cached else chips_of(config)
    good, bad, b = None, None, start
    while b <= cap:
        if probe(config, b, cached, mini, fsdp, out)["fits"]:
            good, b = b, 2 * b
        else:
            bad = b
            break
    if good is None and bad is not None:  # the start did not fit: halve down
        b = bad // 2
        while b >= grain and good is None:
            if probe(config, b, cached, mini, fsdp, out)["fits"]:
                good = b
            else:
                bad, b = b, b // 2
    for _ in range(bisect if good and bad else 0):
        mid = (good + bad) // 2 // grain * grain
        if mid in (good, bad):
            break
        if probe(config, mid, cached, mini, fsdp, out)["fits"]:
            good = mid
        else:
            bad = mid
    return good, bad


def as_probe(path: Path) -> dict:
    """A probe row, from a probe file or from a config's own ``tpu-compile --train --json`` result (marked)."""
    r = json.loads(path.read_text())
    if "buckets" in r:  # tpu/compiled/train-<config>.json: the config as checked in
        (row,) = r["buckets"]
        row = dict(row, config=r["config"], chips=r["chips"], hosts=r["hosts"], mesh=r["mesh"], is_config=True,
                   fits=row["hbm_bytes"] <= r["hbm_margin"] * r["hbm_limit_bytes"])
        return row
    return r


def table(out: Path) -> str:
    """Markdown: every probe of ``out`` and every ``train-*.json`` next to it (the configs as checked in, in bold)."""
    files = sorted(out.glob("*.json")) + sorted(out.parent.glob("train-*.json"))
    rows = sorted((r for r in map(as_probe, files) if "batch_size" in r),  # older results lack the settings
                  key=lambda r: (r["chips"], r["rules"], r["cached_loss"], r["batch_size"], not r.get("is_config")))
    lines = ["| config | chips (hosts) | mesh data x fsdp | rules | batch (pairs) | cached (mini-batch) | HBM/chip (GiB) | of 16 GiB "
             "| fits (<= 90%) | projected step (s) |", "|---|---:|---|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        step = "" if r.get("out_of_hbm") else f"{r['projected_seconds']:.2f}"
        name = f"**{Path(r['config']).stem}** (as checked in)" if r.get("is_config") else Path(r["config"]).stem
        mesh = " x ".join(str(v) for k, v in r["mesh"].items() if k != "slice")
        lines.append(f"| {name} | {r['chips']} ({r['hosts']}) | {mesh} | {r['rules']} | {r['batch_size']} | "
                     + (f"yes ({r['mini_batch_size']})" if r["cached_loss"] else "no")
                     + f" | {r['hbm_bytes'] / GIB:.2f} | {100 * r['hbm_fraction']:.0f}% | "
                     + ("yes" if r["fits"] else "no" + (" (XLA: out of HBM)" if r.get("out_of_hbm") else ""))
                     + f" | {step} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="a tpu/train/*.json config")
    p.add_argument("--out", type=Path, default=Path("tpu/compiled/train-search"), help="folder of probe results")
    p.add_argument("--cached", action="store_true", help="search with --cached-loss")
    p.add_argument("--mini-rows-per-chip", type=int, default=64,
                   help="with --cached: mini-batch size = this x chips (queries per forward pass)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's fsdp (default: the config's)")
    p.add_argument("--start", type=int, default=None, help="first batch size (default: the config's)")
    p.add_argument("--max", type=int, default=65536, help="stop doubling here")
    p.add_argument("--bisect", type=int, default=1, help="bisection steps after doubling")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    a = p.parse_args(argv)
    if a.table:
        print(table(a.out))
        return 0
    if not a.config:
        p.error("a config is required (or --table)")
    a.out.mkdir(parents=True, exist_ok=True)
    chips = chips_of(a.config)
    mini = a.mini_rows_per_chip * chips if a.cached else None
    start = a.start or json.loads(Path(a.config).read_text())["batch_size"]
    good, bad = search(a.config, a.cached, mini, a.fsdp, start, a.max, a.bisect, a.out)
    print(f"{a.config} {'cached' if a.cached else 'uncached'}: largest batch that fits {good}; "
          f"smallest probed that does not {bad}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
