"""The end of a job run: the hosts' counters summed, the manifest written (``manifest.write_manifest``),
and the summary the ``embed`` command prints (``format_summary``)."""

from __future__ import annotations

import time

from embeddinggemma_jax.batch.manifest import write_manifest
from embeddinggemma_jax.batching import padding_efficiency


def finalize(ctx, stats, unit_names: list[str], wall: float) -> dict:
    """Sum the hosts' counters, write manifest.json and errors.jsonl (process 0), and return the summary."""
    import jax

    from embeddinggemma_jax.distributed import barrier

    total = stats.totals().as_dict()
    compile_seconds = ctx.encoder.compile_seconds
    if ctx.processes > 1:  # the slowest host's: the others wait for it in the next collective
        from embeddinggemma_jax.distributed import allgather_ints

        compile_seconds = int(allgather_ints([round(compile_seconds * 1000)])[:, 0].max()) / 1000
    barrier("embed-shards-written")
    manifest = write_manifest(ctx.out, unit_names, ctx.job) if ctx.process_index == 0 else None
    barrier("embed-manifest")
    summary = dict(total, wall_seconds=round(wall, 3), total_seconds=round(time.perf_counter() - ctx.t_start, 3),
                   compile_seconds=round(compile_seconds, 3), compiled_shapes=ctx.encoder.num_shapes,
                   processes=ctx.processes, devices=jax.device_count(), mesh=list(ctx.mesh_shape),
                   records_per_second=round(total["records"] / max(wall, 1e-9), 2),
                   tokens_per_second=round(total["tokens"] / max(wall, 1e-9), 2),
                   padding_efficiency_this_run=round(padding_efficiency(total["tokens"], total["padded_tokens"]), 4)
                   if total["padded_tokens"] else None)
    if manifest is not None:
        summary["manifest_counts"] = manifest["counts"]
    return summary


def format_summary(s: dict) -> str:
    eff = s.get("manifest_counts", {}).get("padding_efficiency")
    lines = [
        f"embedded {s['records']:,} records ({s['tokens']:,} tokens) in {s['units_done']} shards; "
        f"{s['units_skipped']} shards already done (resumed); {s['bad']} bad records",
        f"throughput: {s['records_per_second']:,.1f} records/s, {s['tokens_per_second']:,.0f} tokens/s "
        f"over {s['wall_seconds']:.1f} s on {s['devices']} devices ({s['processes']} processes, mesh {s['mesh']})",
        f"padding efficiency: {s['padding_efficiency_this_run'] or 1.0:.3f} this run"
        + (f", {eff:.3f} over the whole output" if eff is not None else ""),
        f"compile time: {s['compile_seconds']:.1f} s for {s['compiled_shapes']} batch shapes; "
        f"total {s['total_seconds']:.1f} s",
    ]
    dups = s.get("manifest_counts", {}).get("duplicate_ids")
    if dups:
        lines.append(f"warning: {dups:,} records repeat an earlier record's id (both kept); manifest.json "
                     f"duplicate_ids lists each with both file:line")
    return "\n".join(lines)


__all__ = ["finalize", "format_summary"]
