"""Prepared GPU benchmark: bf16 throughput and MFU of this package vs sentence-transformers bf16.

Shapes (full rows, no padding): 256 x 512 tokens and 64 x 2048 tokens. For each it reports
tokens/s, model FLOPs utilisation against a bf16 matmul peak measured on the same device (and
against the device's nominal peak when known), and the ratio to sentence-transformers bf16 on
the same GPU. Each engine runs in its own process (JAX and PyTorch never share the GPU's
memory). The attention path is the backend's kernel (cuDNN on GPUs); ``--attention xla`` adds
the plain XLA path for comparison, and every engine's embeddings are compared with the first
engine's (cosine), so a fast but wrong kernel shows.

    python benchmarks/gpu_bench.py --model ~/.cache/embeddinggemma_jax/models/google--embeddinggemma-300m
    python benchmarks/gpu_bench.py --tiny            # a dry run on any machine (tiny random model)

Budget: a few minutes on one H200 (load ~20 s per engine, one compile per shape, 5 timed runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
NOMINAL_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes {text!r}: expected a comma-separated list like 256x512,64x2048")
    return shapes


def make_inputs(B: int, L: int, vocab: int, seed: int = 0):
    """Full rows of random ordinary tokens between <bos> and <eos> (ids 2 ... 1)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1000 * B + L)
    ids = rng.integers(4, vocab, size=(B, L), dtype=np.int64).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 1
    return ids, np.ones_like(ids)


def nominal_peak(device_name: str) -> float | None:
    for key, flops in NOMINAL_BF16_FLOPS.items():
        if key in device_name.upper():
            return flops
    return None


# ----------------------------------------------------------------------------- engines (one per process)
def run_jax(folder: str, shapes, repeats: int, attention: str | None, out: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from embeddinggemma_jax import EmbeddingGemma
    from embeddinggemma_jax.bench import matmul_peak_flops, model_flops

    t0 = time.perf_counter()
    model = EmbeddingGemma.from_pretrained(folder, dtype="bfloat16", attention_impl=attention)
    res = {"engine": f"jax-bfloat16-{model.attention_impl}", "device": jax.devices()[0].device_kind,
           "load_s": time.perf_counter() - t0, "shapes": {}}
    for B, L in shapes:
        ids, mask = make_inputs(B, L, model.encoder_config.vocab_size)
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        t = time.perf_counter()
        emb = model._step(model.state, ids, mask).block_until_ready()  # compiles
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model._step(model.state, ids, mask).block_until_ready()
            times.append(time.perf_counter() - t)
        np.save(out / f"{res['engine']}-{B}x{L}.npy", np.asarray(emb, np.float32))
        best = min(times)
        res["shapes"][f"{B}x{L}"] = {"seconds": best, "median_s": float(np.median(times)),
                                     "tokens_per_s": B * L / best, "first_call_s": compile_s,
                                     "model_flops": model_flops(model.encoder_config, [L] * B)}
    res["matmul_peak_flops"] = matmul_peak_flops("bfloat16", n=8192 if jax.default_backend() == "gpu" else 1024)
    return res


def run_st(folder: str, shapes, repeats: int, device: str, out: Path) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(folder, device=device, model_kwargs={"torch_dtype": torch.bfloat16})
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    res = {"engine": "st-bfloat16", "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
           "torch": torch.__version__, "attn_implementation": model[0].auto_model.config._attn_implementation,
           "load_s": time.perf_counter() - t0, "shapes": {}}
    vocab = model[0].auto_model.config.vocab_size
    # Every module but Normalize: the Dense head's output, the same quantity as the JAX step's.
    modules = [m for m in model if type(m).__name__ != "Normalize"]

    def forward(feats):
        feats = dict(feats)
        for m in modules:
            feats = m(feats)
        return feats["sentence_embedding"]

    for B, L in shapes:
        ids, mask = make_inputs(B, L, vocab)
        feats = {"input_ids": torch.from_numpy(ids).long().to(device),
                 "attention_mask": torch.from_numpy(mask).long().to(device)}
        with torch.inference_mode():
            sync()
            t = time.perf_counter()
            emb = forward(feats)
            sync()
            first = time.perf_counter() - t
            times = []
            for _ in range(repeats):
                sync()
                t = time.perf_counter()
                forward(feats)
                sync()
                times.append(time.perf_counter() - t)
        np.save(out / f"{res['engine']}-{B}x{L}.npy", emb.float().cpu().numpy())
        best = min(times)
        res["shapes"][f"{B}x{L}"] = {"seconds": best, "median_s": float(np.median(times)),
                                     "tokens_per_s": B * L / best, "first_call_s": first}
    return res


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="google/embeddinggemma-300m", help="model folder or hub id")
    p.add_argument("--tiny", action="store_true", help="dry run: a tiny random model and small shapes, any device")
    p.add_argument("--random-weights", action="store_true",
                   help="the EmbeddingGemma-300m architecture with random weights and a byte tokenizer, for a "
                        "machine that cannot reach the weights: speed only (every engine runs the same weights, "
                        "so the cosines between engines still check the kernels)")
    p.add_argument("--shapes", default=None, help="BxL list (default 256x512,64x2048; with --tiny 8x64,2x128)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attention", default="default",
                   help="comma-separated JAX attention paths: default (the backend's kernel), xla, cudnn, splash")
    p.add_argument("--no-reference", action="store_true", help="skip sentence-transformers")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shapes = parse_shapes(a.shapes or ("8x64,2x128" if a.tiny else "256x512,64x2048"))

    if a.engine:  # child process
        if a.engine == "st":
            device = "cuda" if _torch_cuda() else "cpu"
            res = run_st(a.model, shapes, a.repeats, device, a.work)
        else:
            impl = None if a.engine == "default" else a.engine
            res = run_jax(a.model, shapes, a.repeats, impl, a.work)
        (a.work / f"result-{a.engine}.json").write_text(json.dumps(res))
        return 0

    if a.tiny or a.random_weights:
        from embeddinggemma_jax.config import EncoderConfig, HeadConfig
        from embeddinggemma_jax.testing import make_tiny_folder

        tmp_model = Path(tempfile.mkdtemp(prefix="eg-gpu-random-")) / "model"
        make_tiny_folder(tmp_model, **({} if a.tiny else {"enc": EncoderConfig(), "head": HeadConfig()}))
        folder = str(tmp_model)
    else:
        from embeddinggemma_jax import hub

        folder = str(hub.resolve(a.model))
    engines = [e.strip() for e in a.attention.split(",") if e.strip()] + ([] if a.no_reference else ["st"])
    report = {"date": time.strftime("%Y-%m-%d"), "model": folder, "random_weights": bool(a.tiny or a.random_weights),
              "shapes": [f"{B}x{L}" for B, L in shapes],
              "engines": {}}
    with tempfile.TemporaryDirectory(prefix="eg-gpu-") as work:
        work = Path(work)
        for engine in engines:
            cmd = [sys.executable, __file__, "--engine", engine, "--work", str(work), "--model", folder,
                   "--shapes", ",".join(f"{B}x{L}" for B, L in shapes), "--repeats", str(a.repeats)]
            env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                msg = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"engine {engine} failed: {msg[0]}", file=sys.stderr)
                report["engines"][engine] = {"error": (proc.stderr or proc.stdout)[-3000:]}
                continue
            res = json.loads((work / f"result-{engine}.json").read_text())
            res["wall_s"] = time.perf_counter() - t
            report["engines"][res["engine"]] = res
        _compare(report, work)
    _print(report)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0 if all("error" not in e for e in report["engines"].values()) else 1


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _compare(report: dict, work: Path) -> None:
    import numpy as np

    names = [n for n, e in report["engines"].items() if "error" not in e]
    ref = next((n for n in names if n.startswith("st-")), names[0] if names else None)
    st = report["engines"].get("st-bfloat16")
    for name in names:
        e = report["engines"][name]
        peak = e.get("matmul_peak_flops")
        nominal = nominal_peak(e.get("device", ""))
        for shape, s in e["shapes"].items():
            if "model_flops" in s:
                s["mfu_vs_measured_peak"] = s["model_flops"] / s["seconds"] / peak
                if nominal:
                    s["mfu_vs_nominal_peak"] = s["model_flops"] / s["seconds"] / nominal
            if st and name != "st-bfloat16" and shape in st["shapes"]:
                s["speedup_vs_st_bf16"] = s["tokens_per_s"] / st["shapes"][shape]["tokens_per_s"]
            if name != ref:
                a, b = np.load(work / f"{name}-{shape}.npy"), np.load(work / f"{ref}-{shape}.npy")
                cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
                s[f"min_cosine_vs_{ref}"] = float(cos.min())


def _print(report: dict) -> None:
    print(f"{report['date']}  model {report['model']}")
    for name, e in report["engines"].items():
        if "error" in e:
            print(f"{name}: FAILED\n{e['error'][-800:]}")
            continue
        extra = f", matmul peak {e['matmul_peak_flops'] / 1e12:.3g} TFLOP/s" if "matmul_peak_flops" in e else ""
        print(f"{name} on {e.get('device')}: load {e['load_s']:.1f} s{extra}")
        for shape, s in e["shapes"].items():
            parts = [f"  {shape:>9}: {s['tokens_per_s']:>10.0f} tokens/s", f"first call {s['first_call_s']:.1f} s"]
            if "mfu_vs_measured_peak" in s:
                parts.append(f"MFU {s['mfu_vs_measured_peak']:.1%} of measured peak")
            if "mfu_vs_nominal_peak" in s:
                parts.append(f"{s['mfu_vs_nominal_peak']:.1%} of nominal")
            if "speedup_vs_st_bf16" in s:
                parts.append(f"{s['speedup_vs_st_bf16']:.2f}x sentence-transformers bf16")
            parts += [f"min cos vs {k[len('min_cosine_vs_'):]} {v:.5f}" for k, v in s.items()
                      if k.startswith("min_cosine_vs_")]
            print(", ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
