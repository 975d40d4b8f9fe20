"""``embeddinggemma-jax parity``: this package against sentence-transformers (PyTorch) on the same texts.

Per text: token count, cosine and max abs difference of the normalised embeddings; then min /
median cosine and the worst cases. ``--layers`` also compares the residual stream after the
embedding and after every layer (PyTorch side: forward hooks on ``embed_tokens`` and each
``Gemma3DecoderLayer``) and names the first layer whose error jumps. Exit status 1 when any
cosine is under the threshold, so CI and TPU jobs can gate on it.

This is the only module of the project that imports PyTorch, and only inside ``run_parity``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embeddinggemma_jax.head import l2_normalize

DEFAULT_MIN_COSINE = {"float32": 0.99999, "bfloat16": 0.9995}
# Relative error ||h_jax - h_torch|| / ||h_torch|| of a layer's output above which that layer is
# named as the first one where the ports diverge. Healthy fp32 ports stay orders of magnitude below.
# With --quantize, the threshold of each mode; mixed and int4 are measured, not gated.
QUANT_MIN_COSINE = {"int8-weights": 0.999, "int8": 0.99, "mixed": None, "int4-weights": None}
LAYER_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}

_PROSE = (
    "The history of cartography is the story of how people have tried to describe the world they could not "
    "see all at once. Early maps were drawn from travellers' accounts, and distances were measured in days of "
    "walking rather than in miles. Over centuries, surveyors learned to triangulate from hilltops, astronomers "
    "fixed latitude by the height of the pole star, and clockmakers finally solved longitude at sea. Each new "
    "instrument changed not only the accuracy of maps but also what their makers thought worth recording: "
    "rivers and roads, then borders and railways, and eventually the density of population and the paths of "
    "storms. Modern satellite imagery has not ended this process; it has only moved the hard questions from "
    "measurement to selection, because a map that shows everything explains nothing. "
)
_MIXED = (
    "Machine translation systems are evaluated on many languages. 机器翻译系统在许多语言上进行评估，结果差异很大。 "
    "Системы машинного перевода оцениваются на многих языках, и результаты сильно различаются. "
    "أنظمة الترجمة الآلية تُقيَّم على لغات كثيرة، وتختلف النتائج اختلافًا كبيرًا. "
    "मशीन अनुवाद प्रणालियों का मूल्यांकन कई भाषाओं में किया जाता है। 機械翻訳システムは多くの言語で評価されます。 "
)
SHORT_CASES: tuple[tuple[str, str], ...] = (
    ("en-short", "What is the capital of France?"),
    ("empty", ""),
    ("whitespace", "  \n\t  "),
    ("single-char", "a"),
    ("symbols-emoji", "🙂🚀 ∑∫√ ≠ ≤ — «quotes» “curly” …  €42.50 → ✓ #hashtag @user https://example.com/?q=1&x=%20"),
    ("chinese", "机器学习是人工智能的一个分支，它使计算机能够在没有明确编程的情况下从数据中学习。"),
    ("japanese", "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。カタカナとひらがなも使います。"),
    ("arabic", "القاهرة هي عاصمة مصر وأكبر مدنها، وتقع على ضفاف نهر النيل."),
    ("hindi", "भारत एक विशाल देश है जिसकी संस्कृति, भाषाएँ और परंपराएँ अत्यंत विविध हैं।"),
    ("russian", "Москва — столица России, крупнейший по численности населения город страны."),
    ("code-python", "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
                    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
                    "print([fib(i) for i in range(10)])  # {'key': [1, 2, 3]}\n"),
)
# (name, source text repeated as needed, target token count incl. <bos>/<eos>); None = far beyond the limit.
LONG_CASES: tuple[tuple[str, str, int | None], ...] = (
    ("len-258 (sliding window + 1)", _PROSE, 258),
    ("len-513 mixed scripts", _MIXED, 513),
    ("len-2048 (the limit)", _PROSE, 2048),
    ("len-4000 repetitive (truncated)", "the cat sat on the mat. ", None),
)


def builtin_cases(count_tokens: Callable[[str], int], max_length: int) -> list[tuple[str, str]]:
    """The built-in case set: short edge inputs, several scripts, code, and texts whose token count
    is fitted (with the model's own tokenizer) to where ports break: just past the sliding window,
    past 512, exactly the limit, and far beyond it (truncation)."""
    cases = list(SHORT_CASES)
    for name, source, target in LONG_CASES:
        target = target if target is not None else 2 * max_length + 17
        words = (source * (1 + 6 * target // max(1, len(source.split())))).split(" ")
        lo, hi = 1, len(words)  # largest prefix with count <= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(" ".join(words[:mid])) <= target:
                lo = mid
            else:
                hi = mid - 1
        cases.append((name, " ".join(words[:lo])))
    return cases


def read_texts(path: str | Path) -> list[tuple[str, str]]:
    """Texts from a file: ``.json`` (a list of strings), ``.jsonl`` (one JSON string or
    {"name":..., "text":...} per line) or plain text (one text per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--texts {path} does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = json.loads(raw)
    elif path.suffix == ".jsonl":
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        items = raw.splitlines()
    out = []
    for i, it in enumerate(items):
        if isinstance(it, dict) and isinstance(it.get("text"), str):
            out.append((str(it.get("name", f"text-{i}")), it["text"]))
        elif isinstance(it, str):
            out.append((f"text-{i}", it))
        else:
            raise ValueError(f"{path}: entry {i} is neither a string nor an object with a 'text' string")
    if not out:
        raise ValueError(f"{path} holds no texts")
    return out


# ----------------------------------------------------------------------------- the comparison
@dataclass
class LayerReport:
    rel_err: list[float]  # per hidden state (0 = embedding, i + 1 = after layer i): max over texts
    max_abs: list[float]
    first_jump: int | None  # index into rel_err, or None
    tolerance: float

    @staticmethod
    def label(index: int) -> str:
        return "embedding (embed_tokens)" if index == 0 else f"layer {index - 1} (layers.{index - 1})"


def first_jump(rel_err: Sequence[float], tolerance: float) -> int | None:
    """The first hidden state whose relative error exceeds ``tolerance``."""
    for i, e in enumerate(rel_err):
        if not np.isfinite(e) or e > tolerance:
            return i
    return None


def reference_folder(name_or_path: str, scratch: Path) -> Path:
    """A sentence-transformers folder for PyTorch: the folder itself, or an fp32 export of an Orbax checkpoint."""
    from conversion.convert import export
    from embeddinggemma_jax import checkpoint, hub

    folder = hub.resolve(name_or_path)
    if checkpoint.is_checkpoint(folder):
        return export(folder, scratch / "exported", dtype="float32")
    return folder


def torch_hidden_states(st, text: str) -> np.ndarray:
    """[layers + 1, L, D]: embedding output and each decoder layer's output, fp32, one text, no padding."""
    import torch

    auto = st[0].auto_model
    captured: list = []

    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(out.detach().to(torch.float32)[0].cpu().numpy())

    handles = [auto.embed_tokens.register_forward_hook(hook)]
    handles += [layer.register_forward_hook(hook) for layer in auto.layers]
    try:
        feats = (st.preprocess if hasattr(st, "preprocess") else st.tokenize)([text])
        with torch.no_grad():
            auto(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    if len(captured) != len(auto.layers) + 1:
        raise RuntimeError(f"captured {len(captured)} hidden states, expected {len(auto.layers) + 1}")
    return np.stack(captured)


def compare_layers(jm, st, prompted: Sequence[str], dtype: str) -> LayerReport:
    """The residual stream after every layer, JAX against PyTorch, over the prompted texts: the largest
    relative and absolute error per layer, and the first layer where the error jumps past the tolerance."""
    n_states = jm.encoder_config.num_layers + 1
    rel = np.zeros(n_states)
    mx = np.zeros(n_states)
    for text in prompted:
        hj = jm.hidden_states([text])[0]
        ht = torch_hidden_states(st, text)
        if hj.shape != ht.shape:
            raise RuntimeError(f"hidden states have shape {hj.shape} in JAX but {ht.shape} in PyTorch "
                               "(tokenisation differs)")
        diff = (hj.astype(np.float64) - ht.astype(np.float64)).reshape(n_states, -1)
        norm = np.linalg.norm(ht.astype(np.float64).reshape(n_states, -1), axis=1)
        rel = np.maximum(rel, np.linalg.norm(diff, axis=1) / np.maximum(norm, 1e-30))
        mx = np.maximum(mx, np.abs(diff).max(axis=1))
    tol = LAYER_TOLERANCE[dtype]
    return LayerReport([float(x) for x in rel], [float(x) for x in mx], first_jump(rel, tol), tol)


def run_parity(model: str, cases: Sequence[tuple[str, str]] | None = None, *, reference: str | None = None,
               dtype: str = "float32", prompt_name: str | None = None, min_cosine: float | None = None,
               layers: bool = False, quantize: str | None = None, log=print) -> dict:
    """Compare the JAX model ``model`` with sentence-transformers on ``reference`` (default: the same
    model). ``cases``: (name, text) pairs; None = the built-in set. Returns the report dict."""
    import torch
    from sentence_transformers import SentenceTransformer

    from embeddinggemma_jax import EmbeddingGemma
    from embeddinggemma_jax.config import check_dtype
    from embeddinggemma_jax.prompts import prompt_text, with_prompt

    dtype = check_dtype(dtype)
    from embeddinggemma_jax.quant import check_mode

    quantize = check_mode(quantize)
    default = QUANT_MIN_COSINE[quantize] if quantize else DEFAULT_MIN_COSINE[dtype]
    threshold = default if min_cosine is None else float(min_cosine)
    t0 = time.perf_counter()
    jm = EmbeddingGemma.from_pretrained(model, dtype=dtype, quantize=quantize)
    if cases is None:
        from tokenizers import Tokenizer

        raw_tok = Tokenizer.from_file(str(jm.tokenizer.path))
        raw_tok.no_truncation()
        cases = builtin_cases(lambda t: len(raw_tok.encode(t).ids), jm.head_config.max_seq_length)
    names = [n for n, _ in cases]
    texts = [t for _, t in cases]
    prompted = with_prompt(texts, prompt_text(jm.prompts, prompt_name, what="--prompt-name"))
    n_tokens = jm.tokenizer.count(prompted)

    with tempfile.TemporaryDirectory(prefix="egj-parity-") as scratch:
        ref_folder = reference_folder(reference or model, Path(scratch))
        torch.manual_seed(0)
        st = SentenceTransformer(str(ref_folder), device="cpu")
        st.eval()
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        ref = np.stack([st.encode([t], prompt_name=prompt_name, batch_size=1, convert_to_numpy=True)[0]
                        for t in texts]).astype(np.float32)
        t_torch = time.perf_counter() - t1
        t1 = time.perf_counter()
        got = jm.encode(texts, prompt_name=prompt_name, batch_size=8)
        t_jax = time.perf_counter() - t1
        layer_report = compare_layers(jm, st, prompted, dtype) if layers else None

    got_n, ref_n = l2_normalize(got), l2_normalize(ref)
    cos = np.sum(got_n.astype(np.float64) * ref_n.astype(np.float64), axis=1)
    maxabs = np.abs(got_n.astype(np.float64) - ref_n.astype(np.float64)).max(axis=1)
    rows = [{"name": n, "tokens": int(k), "cosine": float(c), "max_abs_diff": float(d)}
            for n, k, c, d in zip(names, n_tokens, cos, maxabs)]
    worst = sorted(rows, key=lambda r: r["cosine"])[:3]
    passed = bool(np.all(np.isfinite(cos)) and (threshold is None or cos.min() >= threshold))
    report = {
        "model": str(model), "reference": str(reference or model), "dtype": dtype, "reference_dtype": "float32",
        "quantize": quantize,
        "prompt_name": prompt_name, "min_cosine_threshold": threshold, "passed": passed,
        "summary": {"texts": len(rows), "min_cosine": float(cos.min()), "median_cosine": float(statistics.median(cos)),
                    "max_abs_diff": float(maxabs.max()), "worst": worst},
        "cases": rows,
        "seconds": {"load": round(t_load, 2), "torch": round(t_torch, 2), "jax": round(t_jax, 2)},
    }
    if layer_report is not None:
        j = layer_report.first_jump
        report["layers"] = {"relative_error": layer_report.rel_err, "max_abs_diff": layer_report.max_abs,
                            "tolerance": layer_report.tolerance,
                            "first_jump": None if j is None else {"index": j, "layer": j - 1,
                                                                   "name": LayerReport.label(j)}}
    _print_report(report, layer_report, log)
    return report


def _print_report(report: dict, layer_report: LayerReport | None, log) -> None:
    threshold = report["min_cosine_threshold"]
    log(f"parity: JAX {report['model']} ({report['dtype']}"
        + (f", quantized {report['quantize']}" if report.get("quantize") else "")
        + f") vs sentence-transformers {report['reference']} (float32)" + (f", prompt {report['prompt_name']!r}" if report["prompt_name"] else ""))
    log(f"{'#':>3}  {'case':<34} {'tokens':>6}  {'cosine':>12}  {'max|diff|':>9}")
    for i, r in enumerate(report["cases"]):
        flag = "" if threshold is None or r["cosine"] >= threshold else "  <-- below threshold"
        log(f"{i:>3}  {r['name'][:34]:<34} {r['tokens']:>6}  {r['cosine']:>12.9f}  {r['max_abs_diff']:>9.2e}{flag}")
    s = report["summary"]
    log(f"summary: {s['texts']} texts, min cosine {s['min_cosine']:.9f}, median {s['median_cosine']:.9f}, "
        f"max abs diff {s['max_abs_diff']:.2e}; "
        + ("no threshold for this mode (measured only)" if threshold is None
           else f"threshold {threshold}: " + ("PASS" if report["passed"] else "FAIL")))
    log("worst: " + "; ".join(f"{w['name']} ({w['tokens']} tokens) {w['cosine']:.9f}" for w in s["worst"]))
    if layer_report is not None:
        log(f"hidden states (relative error ||jax - torch|| / ||torch||, max over texts; tolerance "
            f"{layer_report.tolerance:g}):")
        for i, (e, m) in enumerate(zip(layer_report.rel_err, layer_report.max_abs)):
            log(f"  {LayerReport.label(i):<28} {e:>10.3e}  max|diff| {m:>9.2e}")
        j = layer_report.first_jump
        if j is None:
            log("layers: no layer's error exceeds the tolerance"
                + ("" if report["passed"] else "; the difference arises after the last layer "
                   "(final norm, pooling or the Dense head)"))
        else:
            prev = layer_report.rel_err[j - 1] if j > 0 else 0.0
            log(f"first layer whose error jumps: {LayerReport.label(j)}: relative error "
                f"{layer_report.rel_err[j]:.3e} (before it: {prev:.3e})")


# ----------------------------------------------------------------------------- CLI
def cmd_parity(args) -> int:
    from embeddinggemma_jax.io_utils import atomic_write_json

    cases = read_texts(args.texts) if args.texts else None
    report = run_parity(args.model, cases, reference=args.reference, dtype=args.dtype, prompt_name=args.prompt_name,
                        min_cosine=args.min_cosine, layers=args.layers, quantize=args.quantize)
    if args.report:
        atomic_write_json(args.report, report)
        print(f"report written to {args.report}")
    if not report["passed"]:
        print(f"embeddinggemma-jax parity: FAIL: min cosine {report['summary']['min_cosine']:.9f} is under "
              f"{report['min_cosine_threshold']}", file=sys.stderr)
        return 1
    return 0


PARITY_DESCRIPTION = ("Run sentence-transformers (PyTorch, fp32) and this package on the same texts; print per-text "
                      "token count, cosine and max abs difference, then min/median cosine and the worst cases. Exit "
                      "status 1 when any cosine is under the threshold.")


def add_parity_arguments(p) -> None:
    from embeddinggemma_jax.hub import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"folder, hub id, Orbax checkpoint or exported folder (default: {DEFAULT_MODEL})")
    p.add_argument("--reference", default=None,
                   help="model PyTorch runs (default: --model itself; an Orbax checkpoint is exported to a "
                        "temporary folder first). E.g. the original model, to check a converted one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--texts", metavar="FILE", help="texts to compare: .json list, .jsonl, or one text per line")
    g.add_argument("--builtin", action="store_true",
                   help="the built-in case set (the default): ~258, 513, 2048 and >2048 tokens, several scripts, "
                        "code, empty and whitespace inputs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="JAX compute dtype (PyTorch always runs fp32, the reference)")
    p.add_argument("--prompt-name", default=None, help="prompt applied on both sides (query, document, STS, ...)")
    from embeddinggemma_jax.quant import MODE_NAMES

    p.add_argument("--quantize", default=None, choices=MODE_NAMES,
                   help="quantize the JAX model (the reference stays fp32); default threshold per mode: "
                        + ", ".join(f"{k} {v}" for k, v in QUANT_MIN_COSINE.items() if v) + ", others measured only")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="fail when any cosine is below this (default: 0.99999 fp32, 0.9995 bf16)")
    p.add_argument("--layers", action="store_true",
                   help="also compare hidden states after every layer and name the first layer whose error jumps")
    p.add_argument("--report", metavar="OUT.json", help="write the full report as JSON")
