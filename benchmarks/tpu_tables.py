"""Rewrite the compiled-for-v5e tables in docs/ from tpu/compiled/*.json.

Every table is generated from the checked-in `tpu-compile --json` results, and names the command that
reproduces its file; the rows-per-chip table comes from `embeddinggemma_jax/v5e_compiled_memory.json`
(`tpu-configs --table`). Usage (no TPU, no compiling):

    python benchmarks/tpu_tables.py [--check]
"""

from __future__ import annotations

import json
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "tpu" / "compiled"
GIB = 1 << 30


def command(out: dict, path: Path) -> str:
    from embeddinggemma_jax import topologies
    from embeddinggemma_jax.batching import buckets_for

    rel = path.relative_to(ROOT)
    if out["kind"] == "train":
        return f"embeddinggemma-jax tpu-compile --train {out['config']} --json {rel}"
    cmd = f"embeddinggemma-jax tpu-compile --topology {out['topology']}"
    if out.get("num_slices", 1) > 1:
        cmd += f" --slices {out['num_slices']}"
    lengths = [b["length"] for b in out["buckets"]]
    if sorted(lengths) != list(buckets_for(2048, topologies.get(out["topology"]).buckets)):
        cmd += " --buckets " + ",".join(map(str, lengths))
    if out.get("tokens_per_chip"):
        cmd += f" --tokens-per-chip {out['tokens_per_chip']}"
    if out.get("quantize"):
        cmd += f" --quantize {out['quantize']}"
    return cmd + f" --json {rel}"


def title(out: dict) -> str:
    slices = f" x {out['num_slices']} slices" if out.get("num_slices", 1) > 1 else ""
    kind = "TRAIN step" if out["kind"] == "train" else "job step"
    if out.get("quantize"):
        kind += f", --quantize {out['quantize']}"
    if out.get("tokens_per_chip"):
        kind += f" at {out['tokens_per_chip']:,} tokens per chip (twice the job's rows: the memory fit's second point)"
    return f"{out['topology']}{slices} - {kind}"


def rng(values, fmt) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} - {fmt(hi)}"


def results() -> list[tuple[Path, dict]]:
    def key(p: Path):
        return p.name.startswith("train-"), p.name.startswith("fit-"), int(re.search(r"litepod-(\d+)", p.name)[1]), p.name

    return [(p, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(COMPILED.glob("*.json"), key=key)]


def how(out: dict) -> str:
    """For a train step: its attention kernel and the roofline version that projected it (v1 counted a scan's
    stacked buffers whole per iteration: docs/training-tpu.md); job steps' differ by ~1% and are not marked."""
    if out["kind"] != "train":
        return ""
    b = out["buckets"][0]
    return f" ({b.get('attention', 'xla')}, roofline v{b.get('roofline_version', 1)})"


def tables() -> tuple[str, str]:
    from embeddinggemma_jax.tpu_compile import markdown

    detail, summary = [], [
        "| compiled | chips (hosts), mesh | buckets | HBM/chip | projected tokens/s/chip | projected MFU | command |",
        "|---|---|---|---:|---:|---:|---|"]
    for path, out in results():
        bs = out["buckets"]
        mesh = ", ".join(f"{k} {v}" for k, v in out["mesh"].items())
        detail += [f"**{title(out)}** ({out['chips']} chips, {out['hosts']} hosts, mesh {mesh}), reproduced by",
                   f"`{command(out, path)}`:", "", markdown(out), ""]
        lengths = [b["length"] for b in bs]
        if out["kind"] == "train":
            nb = f"max_length {lengths[0]}"
        elif "--buckets" not in command(out, path):
            nb = f"all {len(bs)} ({min(lengths)}-{max(lengths)})"
        else:
            nb = ", ".join(map(str, lengths))
        summary.append(
            f"| {title(out)} | {out['chips']} ({out['hosts']}), {mesh} | {nb} | "
            f"{rng([b['hbm_bytes'] / GIB for b in bs], lambda x: f'{x:.2f}')} GiB | "
            f"{rng([b['projected_tokens_per_second_per_chip'] for b in bs], lambda x: f'{x:,.0f}')} | "
            f"{rng([b['projected_mfu'] for b in bs], lambda x: f'{100 * x:.0f}%')}{how(out)} | `{command(out, path)}` |")
    return "\n".join(detail).rstrip(), "\n".join(summary)


def quant_table() -> str:
    """Per quantized mode: the job step on v5litepod-4 (bf16 compute) at the shortest and longest bucket the
    modes were compiled for, beside the bf16 step's same buckets."""
    files = [("bf16", COMPILED / "v5litepod-4.json")]
    files += [(p.stem.split("v5litepod-4-", 1)[1], p) for p in sorted(COMPILED.glob("v5litepod-4-*.json"))]
    loaded = [(mode, path, json.loads(path.read_text(encoding="utf-8"))) for mode, path in files]
    quantized = [b["length"] for _, _, out in loaded[1:] for b in out["buckets"]]
    ends = (min(quantized), max(quantized))
    rows = ["| mode | HBM/chip (GiB) | projected tokens/s/chip | projected MFU | command |", "|---|---|---|---|---|"]
    for mode, path, out in loaded:
        bs = {b["length"]: b for b in out["buckets"]}
        pair = [bs[n] for n in ends]

        def cell(fmt):
            return " / ".join(fmt(b) for b in pair)

        hbm = cell(lambda b: f"{b['hbm_bytes'] / GIB:.2f}")
        tps = cell(lambda b: f"{b['projected_tokens_per_second_per_chip']:,.0f}")
        mfu = cell(lambda b: f"{100 * b['projected_mfu']:.0f}%")
        rows.append(f"| {mode} | {hbm} | {tps} | {mfu} | `{command(out, path)}` |")
    return f"Each cell: L={ends[0]} / L={ends[1]}.\n\n" + "\n".join(rows)


def blocks() -> dict[str, dict[str, str]]:
    from embeddinggemma_jax import topologies
    from train_batch_search import table as train_table

    detail, summary = tables()
    train = train_table(COMPILED / "train-search")
    return {"tpu.md": {"COMPILED_TABLES": detail, "ROWS_TABLE": topologies.arithmetic_table(), "TRAIN_TABLE": train},
            "batch-job.md": {"COMPILED_SUMMARY": summary},
            "training.md": {"TRAIN_TABLE": train},
            "quantization.md": {"QUANT_TPU_TABLE": quant_table()}}


def main(argv=None) -> int:
    import doc_tables

    return doc_tables.main(argv, blocks, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
