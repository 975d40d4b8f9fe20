"""Every generated table in docs/: one registry, one block writer, one ``--check`` (run by .ci/run).

A generated table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` in a page; its body comes from
checked-in result files through the ``blocks()`` function of the script that produces those files.

    python benchmarks/doc_tables.py [--check]     # rewrite every block (or: exit 1 naming the stale ones)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# the scripts whose results feed tables; each has blocks() -> {page name: {block name: markdown}}
GENERATORS = ("tpu_tables", "quant_tables", "quant_sts", "serve_limits_probe", "gcs_commit", "train_throughput",
              "eval_tables")


def replace_block(text: str, tag: str, body: str) -> str:
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    if start not in text or end not in text:
        raise ValueError(f"the page has no {start} ... {end} block; add the two markers where the table goes")
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + body.strip("\n") + "\n" + text[j:]


def sync(pages: dict[str, dict[str, str]], check: bool) -> list[str]:
    """Rewrite (or, with ``check``, only compare) the blocks; the pages that were (or would be) changed."""
    from embeddinggemma_jax.io_utils import atomic_write_bytes

    stale = []
    for page, blocks in pages.items():
        path = DOCS / page
        text = path.read_text(encoding="utf-8")
        new = text
        for tag, body in blocks.items():
            try:
                new = replace_block(new, tag, body)
            except ValueError as e:
                raise SystemExit(f"{path.relative_to(ROOT)}: {e}") from None
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                atomic_write_bytes(path, new.encode("utf-8"))
    return stale


def all_blocks() -> dict[str, dict[str, str]]:
    import importlib

    pages: dict[str, dict[str, str]] = {}
    for name in GENERATORS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a generator not in this checkout
                continue
            raise
        for page, blocks in module.blocks().items():
            pages.setdefault(page, {}).update(blocks)
    return pages


def main(argv=None, blocks=all_blocks, description: str = __doc__.splitlines()[0]) -> int:
    """``[--check]`` over ``blocks()``: every generator's command line (a generator passes its own)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true", help="exit 1 if a page is not what the result files give")
    a = ap.parse_args(argv)
    stale = sync(blocks(), a.check)
    print(("stale (run python benchmarks/doc_tables.py): " if a.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
