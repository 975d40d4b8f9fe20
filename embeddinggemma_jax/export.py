"""Write a complete sentence-transformers folder from a parameter state (atomically).

The folder holds model.safetensors, 2_Dense/, 3_Dense/, 1_Pooling/, the configs, the tokenizer
files and the prompts, and ``SentenceTransformer(folder)`` loads it. ``config.json`` carries the
configured sliding window (512), never transformers' in-memory rewrite of it. The writer signs
``config_sentence_transformers.json`` (``__version__["embeddinggemma_jax"]``, next to the versions
sentence-transformers itself records there), so a later export may replace a folder it provably
wrote, and refuses any other non-empty folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

from flax import nnx

from embeddinggemma_jax.config import EncoderConfig, HeadConfig, check_dtype
from embeddinggemma_jax.io_utils import atomic_dir, check_replaceable, read_json
from embeddinggemma_jax.safetensors_io import save_file
from embeddinggemma_jax.tokenize import TOKENIZER_FILES
from embeddinggemma_jax.version import __version__
from embeddinggemma_jax.weights import to_hf_tensors

WRITER = "embeddinggemma_jax"
MARKER_FILE = "config_sentence_transformers.json"  # names the writer (WRITER): is_exported_folder

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
    {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def _dense_config(in_f: int, out_f: int) -> dict:
    return {"in_features": in_f, "out_features": out_f, "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity"}


def sentence_transformers_files(enc: EncoderConfig, head: HeadConfig,
                                hf_config: Mapping | None = None) -> dict[str, dict]:
    """The JSON files of the folder. ``hf_config``: the original config.json, kept verbatim when given."""
    config = dict(hf_config) if hf_config else enc.to_hf_config()
    config["sliding_window"] = enc.sliding_window  # the configured value, never the halved one
    return {
        "config.json": config,
        "modules.json": MODULES if head.normalize else MODULES[:-1],
        "1_Pooling/config.json": {
            "word_embedding_dimension": enc.hidden_size, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False, "include_prompt": True},
        "2_Dense/config.json": _dense_config(head.in_features, head.hidden_features),
        "3_Dense/config.json": _dense_config(head.hidden_features, head.out_features),
        "sentence_bert_config.json": {"max_seq_length": head.max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer", "prompts": dict(head.prompts),
            "default_prompt_name": head.default_prompt_name, "similarity_fn_name": "cosine",
            "__version__": {WRITER: __version__}},
    }


def is_exported_folder(folder: str | Path) -> bool:
    """A sentence-transformers folder written by this package (``save_folder``)."""
    p = Path(folder) / MARKER_FILE
    try:
        return WRITER in (read_json(p).get("__version__") or {})
    except (OSError, ValueError, AttributeError):
        return False


def save_folder(out_dir: str | Path, state: nnx.State, enc: EncoderConfig, head: HeadConfig,
                tokenizer_dir: str | Path, dtype: str = "float32", hf_config: Mapping | None = None) -> Path:
    """Write the folder atomically: an interrupted export leaves no folder that looks complete. An
    existing non-empty ``out_dir`` is replaced only when this package wrote it."""
    dtype = check_dtype(dtype)
    check_replaceable(out_dir, is_exported_folder, "a model folder written by embeddinggemma-jax")
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json to copy into the exported folder")
    tensors = to_hf_tensors(state, enc, dtype)
    with atomic_dir(out_dir) as tmp:
        for rel, obj in sentence_transformers_files(enc, head, hf_config).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(obj, indent=2) + "\n")
        if dtype == "bfloat16":
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for rel, group in tensors.items():
            save_file(group, tmp / rel, metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
    return Path(out_dir)
