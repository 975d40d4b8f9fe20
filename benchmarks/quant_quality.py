"""Quality, size and CPU speed of each quantization mode against the fp32 model, in one run.

Per mode (``embeddinggemma_jax.quant.MODES``) and fp32:
- cosine to the fp32 model on the builtin parity texts (``conversion.parity.builtin_cases``: short
  edge inputs, several scripts, code, 258 / 513 / 2048 tokens and a truncated 4,000-token text);
- retrieval on the standard-library docstring -> code evaluation of
  ``train_experiments/stdlib_docstrings.py`` (its held-out modules, 200 pairs, 128 tokens as there):
  recall@1, MRR@10, nDCG@10 at 768 and 128 dimensions (``eval.retrieval.retrieval_metrics``);
- parameter bytes (``quant.param_bytes``: int4 counted packed);
- CPU tokens/s: a second, warm pass over the retrieval queries (every shape already compiled).

    PYTHONPATH=. python benchmarks/quant_quality.py --out benchmarks/quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion.parity import builtin_cases  # noqa: E402
from embeddinggemma_jax import quant  # noqa: E402
from embeddinggemma_jax.head import l2_normalize  # noqa: E402
from embeddinggemma_jax.model import EmbeddingGemma  # noqa: E402
from embeddinggemma_jax.eval.retrieval import retrieval_metrics  # noqa: E402
from embeddinggemma_jax.tokenize import TextTokenizer  # noqa: E402
from train_experiments.stdlib_docstrings import build_pairs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--modes", default=",".join(quant.MODE_NAMES))
    ap.add_argument("--dtype", default="float32", help="compute dtype of the quantized models")
    ap.add_argument("--eval-pairs", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=128, help="token limit of the retrieval texts")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)

    fp = EmbeddingGemma.from_pretrained(args.model, dtype="float32")
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(fp.tokenizer.path))
    raw.no_truncation()
    cases = builtin_cases(lambda t: len(raw.encode(t).ids), fp.head_config.max_seq_length)
    texts = [t for _, t in cases]
    with tempfile.TemporaryDirectory() as tmp:
        data = build_pairs(Path(tmp), args.eval_pairs)
        recs = [json.loads(x) for x in (Path(tmp) / "eval.jsonl").read_text().splitlines()]
    tok = TextTokenizer(fp.tokenizer.path, args.max_length, fp.tokenizer.pad_id, fp.encoder_config.eos_token_id)
    corpus: dict[str, int] = {}
    gold = np.asarray([corpus.setdefault(r["positive"], len(corpus)) for r in recs])
    q_ids = tok.encode([fp.prompts["query"] + r["query"] for r in recs])
    d_ids = tok.encode([fp.prompts["document"] + d for d in corpus])
    n_q_tokens = sum(len(x) for x in q_ids)

    import os
    import platform

    results = {"data": data, "cases": [n for n, _ in cases], "dtype": args.dtype, "modes": {},
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "load_average_start": os.getloadavg()}
    try:  # the CPU's model name (Linux)
        results["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ref = None
    for mode in [None] + [m for m in args.modes.split(",") if m]:
        t0 = time.perf_counter()
        if mode is None:
            model = fp
        else:
            src = fp if args.dtype == "float32" else EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype)
            model = src.quantized(mode)
        emb = model.encode(texts)
        if ref is None:
            ref = emb
        cos = np.sum(l2_normalize(emb) * l2_normalize(ref), axis=-1)
        q = model.embed_token_ids(q_ids)
        d = model.embed_token_ids(d_ids)
        t1 = time.perf_counter()
        model.embed_token_ids(q_ids)  # warm pass: every shape compiled
        dt = time.perf_counter() - t1
        name = mode or "fp32"
        results["modes"][name] = {
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "cosine_per_case": [float(c) for c in cos],
            "retrieval": retrieval_metrics(q, d, gold, (768, 128)),
            "param_bytes": quant.param_bytes(model.module),
            "cpu_tokens_per_s": n_q_tokens / dt, "seconds": time.perf_counter() - t0,
            "load_average_after": os.getloadavg(),
        }
        r = results["modes"][name]
        print(f"{name:13s} min_cos={r['min_cosine']:.5f} mean_cos={r['mean_cosine']:.5f} "
              + " ".join(f"d{k}:r@1={v['recall@1']:.3f},mrr={v['mrr@10']:.4f},ndcg={v['ndcg@10']:.4f}"
                         for k, v in r["retrieval"].items())
              + f" bytes={r['param_bytes']:,} tok/s={r['cpu_tokens_per_s']:.0f}", flush=True)
        if args.out:  # after every mode: a partial run keeps what it measured
            from embeddinggemma_jax.io_utils import atomic_write_json

            atomic_write_json(Path(args.out), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
