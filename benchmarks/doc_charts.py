"""The docs' charts, drawn as SVG from the same checked-in result files as their tables.

- ``docs/img/tpu-tokens-per-bucket.svg``: projected tokens/s per chip of the job's step per length bucket
  and topology (``tpu/compiled/v5litepod-*.json``, bf16, not quantized);
- ``docs/img/tpu-hbm-per-bucket.svg``: the compiler's HBM per chip for the same programs;
- ``docs/img/padding-per-topology.svg``: the planned padding efficiency per topology
  (``benchmarks/padding_per_topology.json``, from ``benchmarks/plan_hosts.py --out``);
- ``docs/img/fine-tuning-curve.svg``: the STS-B recipe's training loss per step
  (``benchmarks/sts_recipe.json``'s ``curve``).

Plain SVG text (no plotting library: the charts are a few lines and bars, and the output is byte-stable, so
``benchmarks/doc_tables.py --check`` can compare it like a table). ``files()`` is what doc_tables writes.

    python benchmarks/doc_charts.py [--check]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
W, H = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 40, 50
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _nice_max(v: float) -> float:
    """A round axis end at or above v (1, 2 or 5 times a power of ten)."""
    if v <= 0:
        return 1.0
    p = 10 ** math.floor(math.log10(v))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= v)


def _fmt(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _frame(title: str, xlabel: str, ylabel: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            'font-family="sans-serif" font-size="12">',
            f'<rect width="{W}" height="{H}" fill="white"/>',
            f'<text x="{W / 2:.0f}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
            f'<text x="{LEFT + (W - LEFT - RIGHT) / 2:.0f}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
            f'<text x="15" y="{TOP + (H - TOP - BOTTOM) / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 15 {TOP + (H - TOP - BOTTOM) / 2:.0f})">{escape(ylabel)}</text>']


def _y_axis(ymax: float, ticks: int = 5) -> tuple[list[str], callable]:
    h = H - TOP - BOTTOM

    def y(v):
        return TOP + h * (1 - v / ymax)

    out = []
    for i in range(ticks + 1):
        v = ymax * i / ticks
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    return out, y


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               log2_x: bool = False) -> str:
    """One polyline per series; x on a log2 scale with ``log2_x`` (length buckets)."""
    xs = sorted({x for pts in series.values() for x, _ in pts})
    fx = (lambda v: math.log2(v)) if log2_x else (lambda v: v)
    x0, x1 = fx(xs[0]), fx(xs[-1])
    ymax = _nice_max(max(y for pts in series.values() for _, y in pts))
    out = _frame(title, xlabel, ylabel)
    grid, fy = _y_axis(ymax)
    out += grid

    def px(v):
        return LEFT + (W - LEFT - RIGHT) * ((fx(v) - x0) / (x1 - x0) if x1 > x0 else 0.5)

    ticks = xs if len(xs) <= 12 else xs[:: math.ceil(len(xs) / 12)]
    out += [f'<text x="{px(v):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{_fmt(v)}</text>' for v in ticks]
    for i, (name, pts) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{fy(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{fy(y):.1f}" r="2.5" fill="{c}"/>' for x, y in pts]
        ly = TOP + 14 + 18 * i
        out.append(f'<line x1="{W - RIGHT + 10}" x2="{W - RIGHT + 30}" y1="{ly - 4}" y2="{ly - 4}" stroke="{c}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{W - RIGHT + 35}" y="{ly}">{escape(name)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def bar_chart(title: str, bars: list[tuple[str, float]], ylabel: str, ymax: float | None = None,
              value_format: str = "{:.3f}") -> str:
    ymax = ymax or _nice_max(max(v for _, v in bars))
    out = _frame(title, "", ylabel)
    grid, fy = _y_axis(ymax)
    out += grid
    slot = (W - LEFT - RIGHT) / len(bars)
    for i, (label, v) in enumerate(bars):
        x = LEFT + slot * i + slot * 0.15
        out.append(f'<rect x="{x:.1f}" y="{fy(v):.1f}" width="{slot * 0.7:.1f}" height="{fy(0) - fy(v):.1f}" '
                   f'fill="{COLOURS[0]}"/>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{fy(v) - 4:.1f}" text-anchor="middle">'
                   f'{value_format.format(v)}</text>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{escape(label)}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def _job_results() -> dict[str, dict]:
    """The plain job results per topology (one slice, not quantized, no what-if budget), by chip count."""
    out = {}
    for p in sorted((ROOT / "tpu" / "compiled").glob("v5litepod-*.json")):
        d = json.loads(p.read_text())
        if d.get("kind") == "job" and not d.get("quantize") and d.get("num_slices", 1) == 1 \
                and not d.get("tokens_per_chip"):
            out[d["topology"]] = d
    return dict(sorted(out.items(), key=lambda kv: kv[1]["chips"]))


def tpu_charts() -> dict[str, str]:
    res = _job_results()
    tok = {t: [(b["length"], b["projected_tokens_per_second_per_chip"]) for b in d["buckets"]
               if b.get("projected_tokens_per_second_per_chip")] for t, d in res.items()}
    hbm = {t: [(b["length"], 100 * b["hbm_fraction"]) for b in d["buckets"] if b.get("hbm_fraction")]
           for t, d in res.items()}
    return {
        "img/tpu-tokens-per-bucket.svg": line_chart(
            "Projected tokens/s per chip, v5e, bf16 (roofline over the compiled HLO)",
            {t: v for t, v in tok.items() if v}, "length bucket (tokens)", "tokens/s per chip", log2_x=True),
        "img/tpu-hbm-per-bucket.svg": line_chart(
            "HBM per chip from the compiler (% of 16 GiB)", {t: v for t, v in hbm.items() if v},
            "length bucket (tokens)", "% of HBM", log2_x=True),
    }


def padding_chart() -> dict[str, str]:
    p = ROOT / "benchmarks" / "padding_per_topology.json"
    if not p.exists():
        return {}
    d = json.loads(p.read_text())
    bars = [(f"{r['topology'].replace('v5litepod-', 'v5e-')} ({r['hosts']}h)", r["padding_efficiency"])
            for r in d["rows"] if r.get("tokens_per_chip") is None]
    return {"img/padding-per-topology.svg": bar_chart(
        f"Planned padding efficiency (real / padded tokens), {d['records']:,} docstring records",
        bars, "padding efficiency", ymax=1.0)}


def curve_chart() -> dict[str, str]:
    p = ROOT / "benchmarks" / "sts_recipe.json"
    if not p.exists():
        return {}
    d = json.loads(p.read_text())
    if not d.get("curve"):
        return {}
    series = {"training loss (CoSENT)": [(r["step"], r["loss"]) for r in d["curve"]]}
    return {"img/fine-tuning-curve.svg": line_chart(
        f"Fine-tuning on STS-B train ({d['languages']}): loss per step", series, "step", "loss")}


def files() -> dict[str, str]:
    """{path under docs/: SVG text} for every chart whose result file is checked in."""
    return {**tpu_charts(), **padding_chart(), **curve_chart()}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import doc_tables

    raise SystemExit(doc_tables.main(blocks=dict, description=__doc__.splitlines()[0], files=files))
