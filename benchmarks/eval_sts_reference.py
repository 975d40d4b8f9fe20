"""`evaluate sts` against sentence-transformers' EmbeddingSimilarityEvaluator on the full split.

For each language: this package's Spearman x 100 (``eval.sts.evaluate_pairs`` through
``EmbeddingGemma.encode``, each distinct sentence once) and the reference's
(``reference_spearman``: ``EmbeddingSimilarityEvaluator`` on PyTorch, fp32, every sentence of
both columns encoded), with the same prompt, and the wall seconds of each, measured side by side in
one process on this CPU. Ours is timed including its XLA compilations (counted per language: the
first language pays most of them; set EMBEDDINGGEMMA_JAX_COMPILATION_CACHE to keep them across runs).

    python benchmarks/eval_sts_reference.py --languages en,ja --out benchmarks/results/eval_sts_reference.json

docs/evaluation.md's table is generated from the JSON by ``benchmarks/eval_tables.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embeddinggemma_jax.eval import sts  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb-multi-mt"


def reference_spearman(st_model, pairs: sts.StsPairs, prompt_name: str | None = "STS", batch_size: int = 32,
                       truncate_dim: int | None = None) -> float:
    """The reference: sentence-transformers' ``EmbeddingSimilarityEvaluator`` (``spearman_cosine``, x 100)
    on the same pairs, every sentence encoded with the prompt ``prompt_name`` (needs the ``test`` extra)."""
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    class Prompted(EmbeddingSimilarityEvaluator):
        def embed_inputs(self, model, sentences, **kw):
            return super().embed_inputs(model, sentences, prompt_name=prompt_name or None, **kw)

    ev = Prompted(pairs.sentences1, pairs.sentences2, [float(s) for s in pairs.scores], batch_size=batch_size,
                  main_similarity="cosine", write_csv=False, truncate_dim=truncate_dim)
    return 100.0 * float(ev(st_model)["spearman_cosine"])


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="google/embeddinggemma-300m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--split", default="dev")
    ap.add_argument("--languages", default="en,ja")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    ap.add_argument("--prompt-name", default="STS")
    ap.add_argument("--batch-size", type=int, default=32, help="both sides' batch size")
    ap.add_argument("--max-pairs", type=int, default=None, help="first N pairs of each file (default: all)")
    ap.add_argument("--out", required=True, help="JSON file (rewritten after every language)")
    args = ap.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    from embeddinggemma_jax import EmbeddingGemma, hub
    from embeddinggemma_jax.io_utils import atomic_write_json

    files = sts.sts_files(args.data, args.split, args.languages)
    pairs = {lang: sts.read_sts_file(p, lang).head(args.max_pairs) for lang, p in files.items()}
    folder = hub.resolve(args.model)
    ours = EmbeddingGemma.from_pretrained(folder, dtype=args.dtype)
    ref = SentenceTransformer(str(folder), device="cpu")
    embed = sts.model_embedder(ours, args.prompt_name, args.batch_size)
    out = {"task": "sts", "split": args.split, "model": args.model, "dtype": args.dtype,
           "reference": "sentence-transformers EmbeddingSimilarityEvaluator, fp32, torch CPU",
           "prompt_name": args.prompt_name, "batch_size": args.batch_size, "max_pairs": args.max_pairs,
           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_start": os.getloadavg(), "results": {}}
    for lang, p in pairs.items():
        c0 = ours.compile_count
        r = sts.evaluate_pairs(embed, p, (ours.dimensions,))
        t0 = time.perf_counter()
        ref_score = reference_spearman(ref, p, args.prompt_name, args.batch_size)
        ref_seconds = time.perf_counter() - t0
        out["results"][lang] = {"pairs": len(p), "sentences": r["sentences"], "ours": r["spearman"],
                                "reference": ref_score, "difference": r["spearman"] - ref_score,
                                "ours_seconds": r["seconds"], "reference_seconds": ref_seconds,
                                "ours_compilations": ours.compile_count - c0, "load_average": os.getloadavg()}
        print(f"{lang}: ours {r['spearman']:.4f} ({r['seconds']:.1f} s, {ours.compile_count - c0} compilations) "
              f"reference {ref_score:.4f} ({ref_seconds:.1f} s) diff {r['spearman'] - ref_score:+.4f}", flush=True)
        atomic_write_json(Path(args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
