"""Every generated table and chart in docs/: one registry, one writer, one ``--check`` (run by .ci/run).

A generated table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` in a page; its body comes from
checked-in result files through the ``blocks()`` function of the script that produces those files. A chart
is a whole file under docs/ (SVG), from a generator's ``files()`` (``doc_charts.py``).

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
              "eval_tables", "plan_hosts", "train_mfu_breakdown", "doc_charts")


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
        path = (DOCS / page).resolve()  # "../README.md": the README
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


def sync_files(files: dict[str, str], check: bool) -> list[str]:
    """Rewrite (or, with ``check``, only compare) whole generated files under docs/."""
    from embeddinggemma_jax.io_utils import atomic_write_bytes

    stale = []
    for rel, text in files.items():
        path = (DOCS / rel).resolve()
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, text.encode("utf-8"))
    return stale


def _generators():
    import importlib

    for name in GENERATORS:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a generator not in this checkout is skipped; a missing import of one is not
                raise


def all_blocks() -> dict[str, dict[str, str]]:
    pages: dict[str, dict[str, str]] = {}
    for module in _generators():
        for page, blocks in getattr(module, "blocks", dict)().items():
            pages.setdefault(page, {}).update(blocks)
    return pages


def all_files() -> dict[str, str]:
    out: dict[str, str] = {}
    for module in _generators():
        out.update(getattr(module, "files", dict)())
    return out


def main(argv=None, blocks=all_blocks, description: str = __doc__.splitlines()[0], files=None) -> int:
    """``[--check]`` over ``blocks()`` and ``files()``: every generator's command line (a generator passes
    its own; this script's own run covers them all)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true", help="exit 1 if a page is not what the result files give")
    a = ap.parse_args(argv)
    if files is None:
        files = all_files if blocks is all_blocks else dict
    stale = sync(blocks(), a.check) + sync_files(files(), a.check)
    print(("stale (run python benchmarks/doc_tables.py): " if a.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
