"""Where a 2048-token document's time goes on this machine, and what the CPU defaults buy.

    python benchmarks/profile_long.py [--threads 2] [--json]

Real model shapes, random weights (timing does not depend on their values), fp32, one process
pinned to ``--threads`` CPUs; every comparison is side by side in this one run. It prints:
1. tokens per batch: one sliding and one full layer per 2048-token row at 1 vs 4 rows per batch,
   and a sliding layer per token at 512 x 4 vs 512 x 16 (2,048 vs 8,192 tokens per batch): the
   evidence for ``max_batch_tokens`` = 2048 on CPU;
2. attention at 1 x 2048: the XLA path (queries in 256-row chunks, sliding blocks one at a time,
   under ``lax.map``) against the same maths over the whole score tensor at once (what it replaced);
3. the floor: the seven projection/MLP matmuls of a layer at 2,048 rows, as XLA runs them and,
   when PyTorch is installed, as PyTorch runs the same shapes, against the measured matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="CPUs to pin to (default: all this process may use)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))[:a.threads or None]
    os.sched_setaffinity(0, cpus)  # before JAX sizes its thread pool

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from embeddinggemma_jax import attention_xla as A
    from embeddinggemma_jax.bench import best_seconds, matmul_peak_flops
    from embeddinggemma_jax.config import EncoderConfig
    from embeddinggemma_jax.encoder import Block
    from embeddinggemma_jax.layers import rope_tables

    cfg = EncoderConfig()
    R, hp = cfg.window_radius, jax.lax.Precision.HIGHEST
    block = Block(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    key = jax.random.key(0)
    out: dict = {"threads": len(cpus), "backend": jax.default_backend()}

    def layer_ms(B, L, radius):
        x = jax.random.normal(key, (B, L, cfg.hidden_size), jnp.float32)
        valid = jnp.ones((B, L), bool)
        rope = rope_tables(jnp.arange(L), cfg.head_dim, cfg.rope_local_base_freq, jnp.float32)
        f = jax.jit(lambda st, h, m: nnx.merge(graphdef, st)(h, m, rope, radius, "xla"))
        return best_seconds(lambda: f(state, x, valid), a.repeats) * 1e3

    # 1. tokens per batch
    rows = {}
    for B in (1, 4):
        rows[f"sliding_ms_per_2048_row_B{B}"] = layer_ms(B, 2048, R) / B
        rows[f"full_ms_per_2048_row_B{B}"] = layer_ms(B, 2048, None) / B
    for B in (4, 16):
        rows[f"sliding_us_per_token_512x{B}"] = layer_ms(B, 512, R) / (B * 512) * 1e3
    out["tokens_per_batch"] = rows

    # 2. attention at 1 x 2048: chunked (the XLA path) vs the whole tensor at once
    L, K, G, H = 2048, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (1, L, K, G, H)) * cfg.query_scale
    k, v = (jax.random.normal(s, (1, L, K, H)) for s in ks[1:])
    valid = jnp.ones((1, L), bool)

    def whole_local(q, k, v, m):
        qb, kw, vw, mask = A.local_windows(q, k, v, m, R)
        o = A._softmax_attend(qb, kw, vw, mask[:, :, None, None], jnp.float32, hp)
        return o.reshape(q.shape)

    variants = {
        "full_chunked": lambda q, k, v, m: A.xla_attention(q, k, v, m, None, jnp.float32),
        "full_whole": lambda q, k, v, m: A._softmax_attend(q, k, v, m[:, None, None, None, :], jnp.float32, hp),
        "sliding_blocks_one_at_a_time": lambda q, k, v, m: A.xla_attention(q, k, v, m, R, jnp.float32),
        "sliding_all_blocks_at_once": whole_local,
    }
    att = {}
    for name, fn in variants.items():
        f = jax.jit(fn)
        att[name + "_ms"] = best_seconds(lambda: f(q, k, v, valid), a.repeats) * 1e3
    ref = jax.jit(variants["full_whole"])(q, k, v, valid)
    att["full_max_abs_diff"] = float(jnp.abs(jax.jit(variants["full_chunked"])(q, k, v, valid) - ref).max())
    out["attention_1x2048"] = att

    # 3. the floor: a layer's projection and MLP matmuls at 2,048 rows
    D, F, N = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    shapes = [(D, N * H), (D, K * H), (D, K * H), (N * H, D), (D, F), (D, F), (F, D)]
    M = 2048
    flops = sum(2 * M * kk * n for kk, n in shapes)
    # One matmul at a time (as the layer runs them: each needs its input), summed.
    mm = jax.jit(lambda x, w: jnp.dot(x, w, precision=hp))
    xla_s = sum(best_seconds(lambda: mm(x, w), a.repeats)
                for x, w in ((jax.random.normal(key, (M, kk)), jax.random.normal(key, (kk, n))) for kk, n in shapes))
    floor = {"matmul_ms": xla_s * 1e3, "xla_gflops": flops / xla_s / 1e9,
             "peak_gflops": matmul_peak_flops("float32") / 1e9}
    try:
        import torch

        torch.set_num_threads(len(cpus))
        t_s = sum(best_seconds(lambda: x @ w, a.repeats, block=False)
                  for x, w in ((torch.randn(M, kk), torch.randn(kk, n)) for kk, n in shapes))
        floor.update(torch_matmul_ms=t_s * 1e3, torch_gflops=flops / t_s / 1e9)
    except ImportError:
        pass
    out["layer_matmuls_2048_rows"] = floor
    sl, fu = rows["sliding_ms_per_2048_row_B1"], rows["full_ms_per_2048_row_B1"]
    n_full = sum(not s for s in cfg.sliding_flags)
    doc_s = ((cfg.num_layers - n_full) * sl + n_full * fu) / 1e3
    out["document_2048"] = {"layers_s": doc_s, "tokens_per_s": 2048 / doc_s,
                            "matmul_floor_s": cfg.num_layers * floor["matmul_ms"] / 1e3,
                            "attention_s": ((cfg.num_layers - n_full) * att["sliding_blocks_one_at_a_time_ms"]
                                            + n_full * att["full_chunked_ms"]) / 1e3}

    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{out['backend']}, {out['threads']} threads, fp32, real EmbeddingGemma shapes (random weights)")
    print("1. tokens per batch (one layer):")
    for B in (1, 4):
        print(f"   {B} x 2048: sliding {rows[f'sliding_ms_per_2048_row_B{B}']:.0f} ms, "
              f"full {rows[f'full_ms_per_2048_row_B{B}']:.0f} ms per row")
    print(f"   sliding layer at 512 tokens: {rows['sliding_us_per_token_512x4']:.1f} us/token in batches of 2,048 "
          f"tokens vs {rows['sliding_us_per_token_512x16']:.1f} in batches of 8,192")
    print("2. attention at 1 x 2048:")
    print(f"   full layer: {att['full_chunked_ms']:.0f} ms in 256-query chunks vs {att['full_whole_ms']:.0f} ms whole "
          f"(max abs diff {att['full_max_abs_diff']:.1e})")
    print(f"   sliding layer: {att['sliding_blocks_one_at_a_time_ms']:.0f} ms one block at a time vs "
          f"{att['sliding_all_blocks_at_once_ms']:.0f} ms all blocks at once")
    print("3. a layer's projection + MLP matmuls at 2,048 rows: "
          f"XLA {floor['matmul_ms']:.0f} ms ({floor['xla_gflops']:.0f} GFLOP/s)"
          + (f", PyTorch {floor['torch_matmul_ms']:.0f} ms ({floor['torch_gflops']:.0f} GFLOP/s)"
             if "torch_gflops" in floor else "")
          + f"; measured peak {floor['peak_gflops']:.0f} GFLOP/s")
    d = out["document_2048"]
    print(f"one 2048-token document: {d['layers_s']:.2f} s in the 24 layers ({d['tokens_per_s']:.0f} tokens/s), of "
          f"which matmuls >= {d['matmul_floor_s']:.2f} s and attention {d['attention_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
