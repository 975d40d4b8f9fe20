"""The benchmarks' corpora, from the running Python's standard library (no download): docstrings of
50-700 tokens, 2048-token documents, and every top-level module's docstring (a long-tailed length mix)."""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

def iter_docstrings(paths):
    """Every module, class and function docstring of the Python files ``paths``, in order (files that
    do not parse are skipped)."""
    for path in paths:
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def top_level_stdlib_docstrings() -> list[str]:
    """Every docstring of the standard library's top-level modules (``<stdlib>/*.py``), repeats kept:
    a realistic, long-tailed length distribution (median ~30 tokens) for planning measurements."""
    return list(iter_docstrings(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))))


def stdlib_docstrings(tokenizer, n: int = 256, min_tokens: int = 50, max_tokens: int = 700,
                      seed: int = 0) -> list[str]:
    """``n`` distinct docstrings of the running Python's standard library with 50-700 tokens
    (``<bos>``/``<eos>`` included), chosen deterministically from every docstring that fits."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in sorted(root.rglob("*.py"))
             if not any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in p.parts)]
    seen, found = set(), []
    for doc in iter_docstrings(paths):
        if len(doc) >= 150 and doc not in seen:
            seen.add(doc)
            found.append(doc)
    random.Random(seed).shuffle(found)
    out = []
    for start in range(0, len(found), 512):  # tokenise in chunks until enough fit
        chunk = found[start:start + 512]
        for doc, m in zip(chunk, tokenizer.count(chunk)):
            if min_tokens <= m <= max_tokens:
                out.append(doc)
                if len(out) == n:
                    return out
    raise RuntimeError(f"only {len(out)} standard-library docstrings have {min_tokens}-{max_tokens} tokens; "
                       f"ask for fewer")


def long_documents(tokenizer, n: int = 4, tokens: int = 2048, seed: int = 1) -> list[str]:
    """``n`` texts of at least ``tokens`` tokens (truncated to the model's limit when encoded),
    each a different run of standard-library docstrings."""
    docs = stdlib_docstrings(tokenizer, n=200, min_tokens=20, max_tokens=2000, seed=seed)
    out, i = [], 0
    for _ in range(n):
        parts, count = [], 0
        while count < tokens + 16:
            parts.append(docs[i % len(docs)])
            count += tokenizer.count([parts[-1]])[0]
            i += 1
        out.append("\n\n".join(parts))
    return out


__all__ = ["iter_docstrings", "top_level_stdlib_docstrings", "stdlib_docstrings", "long_documents"]
