"""Orbax checkpoints of EmbeddingGemma: parameters plus everything needed to run without the source.

Layout of a checkpoint folder (written atomically: a staging folder renamed at the end)::

    embeddinggemma_jax.json   marker: format version, encoder/head configs, parameter shapes, fingerprint
    params/                   Orbax (StandardCheckpointer) checkpoint of the parameter tree
    assets/                   the source config.json (verbatim), tokenizer files

This module writes and restores parameter states and knows nothing of the model class:
``EmbeddingGemma.from_pretrained`` builds the abstract model (``nnx.eval_shape``), attaches target
shardings (``sharding.state_shardings``) and ``restore_state`` lets Orbax read each array straight
into them: no full host copy per device. ``conversion/convert.py`` holds convert and export. The fingerprint ties the marker to the ``params/`` it was written with (it is
stored in both), so a ``params/`` taken from another checkpoint is refused, as are truncated and
foreign folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.errors import ConfigError, WeightsError
from embeddinggemma_jax.io_utils import atomic_dir, atomic_write_json, check_replaceable, read_json
from embeddinggemma_jax.tokenize import TOKENIZER_FILES
from embeddinggemma_jax.weights import iter_params

MARKER = "embeddinggemma_jax.json"
PARAMS_DIR = "params"
ASSETS_DIR = "assets"
FORMAT = "embeddinggemma_jax.orbax"
FORMAT_VERSION = 1


def is_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


# ----------------------------------------------------------------------------- configs <-> JSON
def _encoder_to_json(enc: EncoderConfig) -> dict[str, Any]:
    d = dataclasses.asdict(enc)
    d["layer_types"] = list(enc.layer_types)
    return d


def _encoder_from_json(d: dict[str, Any]) -> EncoderConfig:
    d = dict(d)
    d["layer_types"] = tuple(d["layer_types"])
    return EncoderConfig(**d)


def _head_to_json(head: HeadConfig) -> dict[str, Any]:
    return dataclasses.asdict(head)


def _head_from_json(d: dict[str, Any]) -> HeadConfig:
    return HeadConfig(**d)


def _param_table(state: nnx.State) -> dict[str, list]:
    return {"/".join(path): [list(var.get_value().shape), np.dtype(var.get_value().dtype).name]
            for path, var in iter_params(state)}


def _fingerprint(marker: dict[str, Any]) -> str:
    body = {k: marker[k] for k in ("format", "format_version", "encoder", "head", "params", "checkpoint_id")}
    if marker.get("quantize") is not None:  # absent in float checkpoints (their fingerprints stay as they were)
        body["quantize"] = marker["quantize"]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- save
def save_checkpoint(out_dir: str | os.PathLike, state: nnx.State, enc: EncoderConfig, head: HeadConfig,
                    tokenizer_dir: str | os.PathLike, hf_config: dict | None = None,
                    source: str | None = None, quantize: str | None = None) -> Path:
    """Write ``state`` (an nnx.State of parameters, possibly sharded) as an Orbax checkpoint folder.

    ``tokenizer_dir`` holds tokenizer.json (and friends); ``hf_config`` is the source config.json,
    kept verbatim so an export writes it back unchanged (``sliding_window`` stays 512). ``quantize``:
    the ``quant`` mode of a quantized ``state`` (its integer values and scales are stored as they are).
    """
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise WeightsError(f"{tokenizer_dir} has no tokenizer.json to store in the checkpoint")
    check_replaceable(out_dir, is_checkpoint, "an embeddinggemma-jax checkpoint")
    if hf_config is not None and EncoderConfig.from_hf_config(hf_config) != enc:
        raise ConfigError("the config.json given does not describe the model being saved; pass hf_config=None")
    marker: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": _encoder_to_json(enc),
        "head": _head_to_json(head),
        "params": _param_table(state),
        "checkpoint_id": uuid.uuid4().hex,
    }
    if quantize is not None:  # the quant mode whose QuantizedWeight layout ``params`` holds
        marker["quantize"] = quantize
    marker["fingerprint"] = _fingerprint(marker)
    marker["source"] = source
    with atomic_dir(out_dir) as tmp:
        assets = tmp / ASSETS_DIR
        assets.mkdir()
        atomic_write_json(assets / "config.json", dict(hf_config) if hf_config else enc.to_hf_config())
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, assets / name)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save((tmp / PARAMS_DIR).absolute(), state.to_pure_dict(),
                   custom_metadata={"fingerprint": marker["fingerprint"], "format": FORMAT})
        ckptr.wait_until_finished()
        ckptr.close()
        atomic_write_json(tmp / MARKER, marker)  # last: only a complete folder carries the marker
    return out_dir


# ----------------------------------------------------------------------------- read / verify
def read_marker(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated marker of a checkpoint folder (refuses foreign, edited and truncated folders)."""
    folder = Path(folder)
    path = folder / MARKER
    if not path.is_file():
        if (folder / "config.json").is_file():
            raise WeightsError(f"{folder} is a sentence-transformers folder, not an embeddinggemma-jax checkpoint; "
                               "make one with `embeddinggemma-jax convert`")
        raise WeightsError(f"{folder} is not an embeddinggemma-jax checkpoint (no {MARKER}); "
                           "make one with `embeddinggemma-jax convert`")
    try:
        marker = read_json(path)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); the checkpoint is damaged: convert it again") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise WeightsError(f"{path} does not describe an embeddinggemma-jax checkpoint (format "
                           f"{marker.get('format') if isinstance(marker, dict) else None!r}, expected {FORMAT!r})")
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(f"{folder} has checkpoint format version {version}; this version of embeddinggemma-jax "
                           f"reads version {FORMAT_VERSION}: convert the source model again")
    missing = [k for k in ("encoder", "head", "params", "checkpoint_id", "fingerprint") if k not in marker]
    if missing:
        raise WeightsError(f"{path} lacks {', '.join(missing)}; the checkpoint is damaged: convert it again")
    if _fingerprint(marker) != marker["fingerprint"]:
        raise WeightsError(f"{path} was edited after the checkpoint was written (fingerprint mismatch); "
                           "convert the source model again")
    for rel in (PARAMS_DIR, f"{ASSETS_DIR}/config.json", f"{ASSETS_DIR}/tokenizer.json"):
        if not (folder / rel).exists():
            raise WeightsError(f"{folder} is incomplete: {rel} is missing; convert the source model again")
    return marker


def read_checkpoint_configs(folder: str | os.PathLike) -> tuple[EncoderConfig, HeadConfig, dict[str, Any]]:
    """(encoder config, head config, source config.json) of a checkpoint, checked against each other."""
    folder = Path(folder)
    marker = read_marker(folder)
    try:
        enc = _encoder_from_json(marker["encoder"])
        head = _head_from_json(marker["head"])
    except (TypeError, KeyError, ValueError) as e:
        raise WeightsError(f"{folder / MARKER} holds an invalid config ({e}); convert the source model again") from None
    hf_config = read_json(folder / ASSETS_DIR / "config.json")
    if EncoderConfig.from_hf_config(hf_config) != enc:
        raise WeightsError(f"{folder}: {ASSETS_DIR}/config.json describes a different model than {MARKER} "
                           "(files from two checkpoints mixed up); convert the source model again")
    return enc, head, hf_config


def _check_params(folder: Path, marker: dict[str, Any], abstract_state: nnx.State) -> None:
    import orbax.checkpoint as ocp

    params = folder / PARAMS_DIR
    expected = {k: tuple(v[0]) for k, v in _param_table(abstract_state).items()}
    declared = {k: tuple(v[0]) for k, v in marker["params"].items()}
    if declared != expected:
        raise WeightsError(f"{folder / MARKER} lists parameters that do not fit its own config; "
                           "the checkpoint is damaged: convert the source model again")
    try:
        meta = ocp.StandardCheckpointer().metadata(params.absolute())
    except Exception as e:  # noqa: BLE001 - any failure to read Orbax metadata means a damaged folder
        raise WeightsError(f"{params} is not a readable Orbax checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''}); the checkpoint is truncated "
                           "or damaged: convert the source model again") from None
    custom = meta.custom_metadata or {}
    if custom.get("fingerprint") != marker["fingerprint"]:
        raise WeightsError(f"{params} was written for a different checkpoint than {folder / MARKER} "
                           "(fingerprint mismatch: files from two checkpoints mixed up); convert the source model again")
    tree = meta.item_metadata.tree if hasattr(meta.item_metadata, "tree") else meta.item_metadata
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if flat != expected:
        diff = sorted(set(flat.items()) ^ set(expected.items()))[:4]
        raise WeightsError(f"{params} holds parameters that do not match the config in {MARKER} "
                           f"(e.g. {diff}); convert the source model again")


def restore_state(folder: str | os.PathLike, abstract_state: nnx.State, shardings=None) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.eval_shape``; its dtypes are the restore dtypes) from a
    checkpoint. ``shardings``: a pytree like ``sharding.state_shardings(...)`` (or None: the default
    device); Orbax reads each array straight into its target devices."""
    import orbax.checkpoint as ocp

    folder = Path(folder)
    marker = read_marker(folder)
    _check_params(folder, marker, abstract_state)
    pure = abstract_state.to_pure_dict()
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sh_pure = jax.tree.map(lambda _: default, pure)
    else:
        sh_pure = shardings.to_pure_dict() if isinstance(shardings, nnx.State) else shardings
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, sh_pure)
    try:
        ckptr = ocp.StandardCheckpointer()
        restored = ckptr.restore((folder / PARAMS_DIR).absolute(), target)
        ckptr.close()
    except Exception as e:  # noqa: BLE001 - a truncated data file surfaces as a tensorstore error
        raise WeightsError(f"could not read the parameters in {folder / PARAMS_DIR} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''}); the checkpoint is truncated or "
                           "damaged: convert the source model again") from None
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state
