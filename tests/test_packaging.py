"""The shape of the package: no import cycles, and a wheel that works outside the checkout."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("embeddinggemma_jax", "conversion")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (root / pkg).rglob("*.py"):
            rel = p.relative_to(root).with_suffix("")
            out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in the file (inside functions too).
    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``."""
    mods = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "embeddinggemma_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from embeddinggemma_jax import b\n")
    (pkg / "b.py").write_text("def f():\n    from embeddinggemma_jax.a import x\n")
    (tmp_path / "conversion").mkdir()
    assert cycles(import_graph(tmp_path)) == [["embeddinggemma_jax.a", "embeddinggemma_jax.b"]]


def test_no_import_cycles_among_the_package_modules():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    assert cycles(graph) == []


def test_torch_is_imported_only_by_the_pytorch_side():
    importers = {m for m, p in module_files().items()
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(
                     (getattr(n, "module", None) or a.name).split(".")[0] in ("torch", "sentence_transformers")
                     for a in n.names) for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))}
    assert importers <= {"conversion.parity", "conversion.st_worker"}, importers


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs_every_subcommand_help(tmp_path):
    """Build the wheel, install it (without dependencies: they come from this environment) into a
    folder of its own, and from a folder outside the checkout run ``--help`` of every subcommand."""
    from embeddinggemma_jax.cli import COMMANDS

    wheels, target, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = wheels.glob("embeddinggemma_jax-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    script = target / "bin" / "embeddinggemma-jax"
    where = subprocess.run([sys.executable, "-c", "import embeddinggemma_jax, conversion; "
                            "print(embeddinggemma_jax.__file__); print(conversion.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout + where.stderr
    names = [c.name for c in COMMANDS]
    assert {"bench", "embed", "train", "convert", "parity"} <= set(names)
    # One interpreter for all of them (a fresh one per command would spend minutes importing jax).
    code = ("from embeddinggemma_jax.cli import build_parser\n"
            "p = build_parser()\n"
            f"for name in {names!r}:\n"
            "    try:\n"
            "        p.parse_args([name, '--help'])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, name\n"
            "print('ALL-HELP-OK')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ALL-HELP-OK" in r.stdout, r.stderr[-2000:]
    for name in names:
        assert f"usage: embeddinggemma-jax {name}" in r.stdout, name
    r = subprocess.run([sys.executable, str(script), "bench", "--help"], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--engines" in r.stdout, r.stderr[-2000:]
