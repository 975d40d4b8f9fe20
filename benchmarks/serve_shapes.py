"""Does a text's embedding depend on what shares its batch? The measurement behind the server's one batch
shape per length bucket (docs/serving.md).

    python benchmarks/serve_shapes.py --model ~/.cache/embeddinggemma_jax/models/google--embeddinggemma-300m

1. The same text in batches of other shapes (rows x padded length): max abs difference of the unnormalised
   vector against its 1 x 32 run, alone (padding rows) and with other texts in the other rows.
2. The server's shapes (the worker's planner): the model card's prompted query and documents co-batched vs
   alone (bit-equal?), and against ``encode`` of the same texts: differences, cosine, similarities.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    a = p.parse_args()

    from embeddinggemma_jax import EmbeddingGemma
    from embeddinggemma_jax.batching import Batch, bucket_length, pad_rows, resolve_max_batch_tokens
    from embeddinggemma_jax.cli import DEMO_DOCUMENTS, DEMO_QUERY
    from embeddinggemma_jax.head import apply_dimensions
    from embeddinggemma_jax.serve.config import SERVE_CPU_MAX_BATCH_TOKENS
    from embeddinggemma_jax.serve.engine import BatchingWorker

    model = EmbeddingGemma.from_pretrained(a.model, max_batch_tokens=resolve_max_batch_tokens(
        "auto", cpu=SERVE_CPU_MAX_BATCH_TOKENS))
    tok = model.tokenizer

    def run(shape, rows):  # rows: token id lists, row r holds rows[r]
        ids, mask = pad_rows(rows, range(len(rows)), shape, tok.pad_id)
        return model.embed_batch(Batch(ids, mask, np.arange(len(rows))))

    x = tok.encode([DEMO_QUERY])[0]
    others = tok.encode(["Jupiter, the largest planet in our solar system, has a prominent red spot. " * k
                         for k in range(1, 16)])
    base = run((1, 64), [x])[0]
    print("1. the query's vector (norm %.1f) in other shapes: max abs diff to 1 x 64 (alone | with other texts | "
          "in the last row)" % np.linalg.norm(base))
    for shape in [(1, 80), (2, 64), (4, 64), (8, 64), (16, 128)]:
        rows, L = shape
        fill = [o[:L] for o in others]
        alone = run(shape, [x])[0]
        first = run(shape, ([x] + fill)[:rows])[0]
        last_rows = (fill[:rows - 1] + [x]) if rows > 1 else [x]
        last = run(shape, last_rows)[len(last_rows) - 1]
        print(f"   {rows:2d} x {L:3d}: {np.abs(alone - base).max():.1e} | {np.abs(first - base).max():.1e} | "
              f"{np.abs(last - base).max():.1e}")

    w = BatchingWorker(model, batch_size=32, max_wait=0, max_queue=10)
    texts = [model.prompts["query"] + DEMO_QUERY] + [model.prompts["document"] + d for d in DEMO_DOCUMENTS]
    ids = tok.encode(texts)
    alone = np.stack([w._embed(w.planner.batches([t])[0])[0] for t in ids])
    shared = np.zeros_like(alone)
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(ids):
        groups.setdefault(bucket_length(len(t), model.length_buckets), []).append(i)
    for L, idx in groups.items():
        (b,) = w.planner.batches([ids[i] for i in idx])
        shared[np.asarray(idx)[b.index]] = w._embed(b)
    ref = model.encode(texts, normalize=False)
    n_ref, n_srv = apply_dimensions(ref, None, True), apply_dimensions(alone, None, True)
    print(f"2. server shapes {[(w.rows(L), L) for L in groups]}: co-batched == alone bit for bit: "
          f"{bool((shared == alone).all())}")
    print(f"   against encode: unnormalised max abs diff {np.abs(ref - alone).max():.2e} (norms "
          f"{np.linalg.norm(ref, axis=1).min():.0f}-{np.linalg.norm(ref, axis=1).max():.0f}); normalised "
          f"{np.abs(n_ref - n_srv).max():.2e}; min cosine {(n_ref * n_srv).sum(1).min():.8f}; at 256 dimensions "
          f"{np.abs(apply_dimensions(ref, 256, True) - apply_dimensions(alone, 256, True)).max():.2e}")
    print(f"   similarities: server shapes {np.round(n_srv[:1] @ n_srv[1:].T, 4)[0]}, encode "
          f"{np.round(n_ref[:1] @ n_ref[1:].T, 4)[0]}")


if __name__ == "__main__":
    main()
