"""The sentence-transformers (PyTorch) side of the benchmark: one engine in a fresh process.

Run by ``embeddinggemma_jax.bench.speed`` (``embeddinggemma-jax bench``); it writes the same JSON
fields as the JAX worker. sentence-transformers pads each batch to its longest text (after
sorting by length), so its padding is already minimal.

    python -m conversion.st_worker st-float32 MODEL_FOLDER WORK_DIR --threads 2

It lives with the other PyTorch-side code (``conversion``), installed with the package, so ``bench``
works from a wheel as well as from a checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", choices=["st-float32", "st-bfloat16"])
    p.add_argument("model")
    p.add_argument("dir", type=Path)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.device == "cpu":
        cpus = sorted(os.sched_getaffinity(0))[:a.threads]
        os.sched_setaffinity(0, cpus)
    t_start = time.perf_counter()
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    dtype = {"st-float32": torch.float32, "st-bfloat16": torch.bfloat16}[a.engine]
    t0 = time.perf_counter()
    model = SentenceTransformer(a.model, device=a.device, model_kwargs={"torch_dtype": dtype})
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    model.encode(["Hello world."])
    first_s = time.perf_counter() - t0
    res = {"engine": a.engine, "backend": a.device, "device": a.device, "threads": a.threads,
           "torch": torch.__version__, "import_s": t0 - t_start, "load_s": load_s, "first_embedding_s": first_s,
           "rss_after_load_mb": rss_loaded, "rss_after_first_embedding_mb": peak_rss_mb(), "corpora": {}}
    corpora = json.loads((a.dir / "corpora.json").read_text())
    for name, texts in corpora.items():
        lengths = [len(x) for x in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]]
        model.encode(texts[:a.batch_size], batch_size=a.batch_size)  # warm-up
        best, emb = float("inf"), None
        for _ in range(a.repeats):
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                emb = model.encode(texts, batch_size=a.batch_size, convert_to_numpy=True)
            sync()
            best = min(best, time.perf_counter() - t)
        np.save(a.dir / f"{a.engine}-{name}.npy", emb.astype(np.float32))
        res["corpora"][name] = {"texts": len(texts), "tokens": int(sum(lengths)), "seconds": best,
                                "tokens_per_s": sum(lengths) / best}
    res["peak_rss_mb"] = peak_rss_mb()
    tmp = a.dir / f".{a.engine}.json.tmp"
    tmp.write_text(json.dumps(res))
    os.replace(tmp, a.dir / f"{a.engine}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
