"""``embeddinggemma-jax evaluate sts | retrieval | sts-to-jsonl``.

``sts``: Spearman x 100 per language and dimension on STS Benchmark files (``eval.sts``);
``retrieval``: recall@1/@10, MRR@10, nDCG@10 on held-out (query, positive) JSONL pairs
(``eval.retrieval``); ``sts-to-jsonl``: STS files -> JSONL pairs with a score, the training input of
``train --loss cosent``. Results print as lines on stderr and, with ``--json FILE``, as one JSON
document written atomically (docs/evaluation.md gives its layout).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EVALUATE_HELP = "evaluate a model: STS Benchmark Spearman (sts) or retrieval metrics (retrieval)"
EVALUATE_DESCRIPTION = ("evaluate sts: Spearman x 100 between cosine and gold score per language of "
                        "DIR/stsb-LANG-SPLIT.csv files, at each Matryoshka dimension, and the mean. evaluate "
                        "retrieval: recall@1/@10, MRR@10, nDCG@10 of held-out JSONL pairs. evaluate sts-to-jsonl: "
                        "write STS files as JSONL training pairs with a score (train --loss cosent).")


def _dims(s: str) -> tuple[int, ...]:
    from embeddinggemma_jax.options import ints

    return tuple(ints(s))


def _common(p, prompt_default: str | None, add_model_args) -> None:
    add_model_args(p)
    p.add_argument("--dimensions", type=_dims, default=(768, 512, 256, 128),
                   help="comma-separated Matryoshka dimensions (default: 768,512,256,128)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch (default: 32)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (atomically)")
    if prompt_default is not None:
        p.add_argument("--prompt-name", default=prompt_default,
                       help=f"the model's prompt for every sentence ('' for none; default: {prompt_default})")


def add_evaluate_arguments(p, add_model_args) -> None:
    """``add_model_args``: ``cli.add_model_args`` (--model, --dtype, --quantize), passed in by ``cli``."""
    sub = p.add_subparsers(dest="task", metavar="TASK")
    sub.required = True
    s = sub.add_parser("sts", help="Spearman x 100 on STS Benchmark files (stsb-LANG-SPLIT.csv)",
                       description="Spearman x 100 of cosine vs gold score, per language and dimension.")
    s.add_argument("--data", required=True, help="folder of stsb-LANG-SPLIT.csv files (sentence1, sentence2, score)")
    s.add_argument("--split", default="dev", help="the SPLIT part of the file names (default: dev)")
    s.add_argument("--languages", default="all", help="comma-separated languages or 'all' (default: all)")
    s.add_argument("--max-pairs", type=int, default=None, help="use each file's first N pairs (default: all)")
    _common(s, "STS", add_model_args)
    s.set_defaults(func=cmd_evaluate_sts)
    r = sub.add_parser("retrieval", help="recall@1/@10, MRR@10, nDCG@10 on held-out JSONL pairs",
                       description="Each query against the corpus of all distinct positives (eval.retrieval).")
    r.add_argument("--data", required=True, help="JSONL pairs, one {\"query\": ..., \"positive\": ...} per line "
                                                 "(a file or a glob)")
    r.add_argument("--query-field", default="query")
    r.add_argument("--positive-field", default="positive")
    r.add_argument("--query-prompt", default="query", help="prompt name for queries ('' for none)")
    r.add_argument("--document-prompt", default="document", help="prompt name for documents ('' for none)")
    r.add_argument("--max-pairs", type=int, default=None, help="use the first N pairs (default: all)")
    _common(r, None, add_model_args)
    r.set_defaults(func=cmd_evaluate_retrieval)
    c = sub.add_parser("sts-to-jsonl", help="write STS files as JSONL pairs with a score (train --loss cosent)",
                       description='One {"query": sentence1, "positive": sentence2, "score": score} per pair, '
                                   "the languages' files in the order given.")
    c.add_argument("--data", required=True, help="folder of stsb-LANG-SPLIT.csv files")
    c.add_argument("--split", default="train")
    c.add_argument("--languages", default="all")
    c.add_argument("--out", required=True, help="JSONL file to write (atomically)")
    c.set_defaults(func=cmd_sts_to_jsonl)


def cmd_evaluate(args) -> int:
    return args.func(args)


def _load(args):
    from embeddinggemma_jax import EmbeddingGemma

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)


def _write(args, result: dict) -> None:
    if args.json:
        from embeddinggemma_jax.io_utils import atomic_write_json

        atomic_write_json(Path(args.json), result)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


def cmd_evaluate_sts(args) -> int:
    from embeddinggemma_jax.eval import sts
    from embeddinggemma_jax.head import check_dimensions
    from embeddinggemma_jax.prompts import prompt_text

    # the data is read and checked before the model loads
    files = sts.sts_files(args.data, args.split, args.languages)
    for lang, p in files.items():
        sts.read_sts_file(p, lang)
    model = _load(args)
    for d in args.dimensions:
        if check_dimensions(d, model.dimensions) > model.dimensions:
            raise ValueError(f"--dimensions {d} is above the model's {model.dimensions}; use Matryoshka sizes "
                             f"up to {model.dimensions}")
    prompt_text(model.prompts, args.prompt_name or None, what="--prompt-name")  # an unknown name: one line, here
    embed = sts.model_embedder(model, args.prompt_name, args.batch_size)
    result = sts.run_sts(embed, args.data, args.split, list(files), args.dimensions, args.max_pairs,
                         say=lambda s: print(s, file=sys.stderr, flush=True))
    out = {"task": "sts", "split": args.split, "model": str(args.model), "data": str(args.data),
           "dtype": args.dtype, "quantize": args.quantize, "prompt_name": args.prompt_name or None,
           "dimensions": list(args.dimensions), "max_pairs": args.max_pairs, **result}
    print(f"mean spearman x100 = {out['mean']:.2f} over {len(out['results'])} languages", file=sys.stderr)
    _write(args, out)
    return 0


def cmd_evaluate_retrieval(args) -> int:
    from embeddinggemma_jax.eval.retrieval import format_metrics, run_retrieval
    from embeddinggemma_jax.prompts import prompt_text
    from embeddinggemma_jax.train.data import Fields, PairFile

    records = PairFile(args.data, Fields(args.query_field, args.positive_field, None)).all_records()
    records = records[:args.max_pairs] if args.max_pairs else records
    model = _load(args)
    for flag, name in (("--query-prompt", args.query_prompt), ("--document-prompt", args.document_prompt)):
        prompt_text(model.prompts, name or None, what=flag)  # an unknown name: one line, before any work

    def embed(texts, prompt_name):
        return model.encode(texts, prompt_name=prompt_name or None, normalize=False, batch_size=args.batch_size)

    result = run_retrieval(embed, records, args.dimensions, args.query_prompt, args.document_prompt)
    print(format_metrics(result["by_dimension"]), file=sys.stderr)
    _write(args, {"task": "retrieval", "model": str(args.model), "data": str(args.data), "dtype": args.dtype,
                  "quantize": args.quantize, "query_prompt": args.query_prompt or None,
                  "document_prompt": args.document_prompt or None, "dimensions": list(args.dimensions), **result})
    return 0


def cmd_sts_to_jsonl(args) -> int:
    from embeddinggemma_jax.eval import sts
    from embeddinggemma_jax.io_utils import atomic_write_bytes

    files = sts.sts_files(args.data, args.split, args.languages)
    lines = []
    for lang, p in files.items():
        pairs = sts.read_sts_file(p, lang)
        lines += [json.dumps({"query": a, "positive": b, "score": float(s), "language": lang}, ensure_ascii=False)
                  for a, b, s in zip(pairs.sentences1, pairs.sentences2, pairs.scores)]
    atomic_write_bytes(Path(args.out), ("\n".join(lines) + "\n").encode("utf-8"))
    print(f"{args.out}: {len(lines)} pairs from {', '.join(files)}", file=sys.stderr)
    return 0
