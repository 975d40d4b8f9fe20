"""The batch job's host side alone: read + tokenise + plan + pad + write, the device step a no-op.

Runs `embed`'s own pipeline (``batch.pipeline.run_embed``: reader and writer threads included) with
``Stages(step=...)``: a step that pads every batch as the real step does and returns unit vectors
without touching a device. Prints tokens/s (wall) and tokens per CPU-second (all threads of this
process: tokens/s per core), the number to compare with a chip's projected tokens/s.

    python benchmarks/make_corpus.py /tmp/docs.jsonl --lines 100000
    python benchmarks/host_pipeline.py /tmp/docs.jsonl [--model google/embeddinggemma-300m] [--topology v5litepod-1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--unit-size", type=int, default=16384)
    ap.add_argument("--tokens-per-device", type=int, default=16384)
    a = ap.parse_args(argv)
    from embeddinggemma_jax.batch import job
    from embeddinggemma_jax.batching import pad_rows

    def noop_step(ctx, rnd, stats):
        P, me = ctx.processes, ctx.process_index
        for b in rnd.plan:
            ids, _ = pad_rows(rnd.tokens, job.host_share(b, me, P), (b.rows // P, b.length), ctx.planner.pad_id)
            stats.batches += 1
            stats.padded_tokens += ids.size
        if not rnd.write:
            return None
        n = rnd.starts[me + 1] - rnd.starts[me]
        return np.full((n, ctx.model.dimensions), ctx.model.dimensions ** -0.5, np.float32)

    clock = {}
    real_setup = job.setup

    def timed_setup(o):
        ctx = real_setup(o)
        clock["cpu0"] = time.process_time()  # CPU time from here on: the pipeline, not the model load
        return ctx

    with tempfile.TemporaryDirectory() as d:
        s = job.run_embed(job.EmbedOptions(model=a.model, inputs=[a.input], output=d + "/out", unit_size=a.unit_size,
                                           tokens_per_device=a.tokens_per_device, progress=False),
                          job.Stages(setup=timed_setup, step=noop_step))
        cpu = time.process_time() - clock["cpu0"]
    print(f"{s['records']:,} records, {s['tokens']:,} tokens: {s['tokens'] / s['wall_seconds']:,.0f} tokens/s wall "
          f"({s['wall_seconds']:.1f} s), {s['tokens'] / cpu:,.0f} tokens per CPU-second ({cpu:.1f} CPU-s), padding efficiency {s['padding_efficiency_this_run']}")


if __name__ == "__main__":
    main()
