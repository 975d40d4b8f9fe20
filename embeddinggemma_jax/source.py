"""One loader for what a model source says about itself: configs, tokenizer, stored quantization.

A model source is a sentence-transformers folder, an Orbax checkpoint folder (``convert``) or a hub id
(``hub.resolve`` turns it into a local folder). ``read_source`` is the one place that tells the two
folder kinds apart; everything that needs a model's configs or tokenizer without its weights (the API's
loader, ``embed --plan-only``, the benchmarks, the AOT compiler) reads them here, so a checkpoint works
wherever a folder does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embeddinggemma_jax import checkpoint, hub
from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.io_utils import read_json
from embeddinggemma_jax.tokenize import TextTokenizer
from embeddinggemma_jax.weights import read_folder_configs


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: its local folder and what its files say (no weights read)."""

    folder: Path
    encoder_config: EncoderConfig
    head_config: HeadConfig
    hf_config: dict[str, Any]  # the source config.json, kept verbatim on export
    tokenizer_dir: Path  # the folder holding tokenizer.json
    is_checkpoint: bool  # an Orbax checkpoint (else a sentence-transformers folder)
    quantize: str | None  # the quantization mode a checkpoint was written in (None: float)

    def tokenizer(self, max_length: int | None = None) -> TextTokenizer:
        """The model's tokenizer, truncating at ``max_length`` (default: the model's max_seq_length)."""
        enc = self.encoder_config
        return TextTokenizer(self.tokenizer_dir / "tokenizer.json", max_length or self.head_config.max_seq_length,
                             enc.pad_token_id, enc.eos_token_id)


def read_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Resolve ``name_or_path`` (folder, checkpoint or hub id; see ``hub.resolve``) and read its configs.
    Every problem is a one-line error naming the file."""
    folder = hub.resolve(name_or_path)
    if checkpoint.is_checkpoint(folder):
        enc, head, hf_config = checkpoint.read_checkpoint_configs(folder)
        stored = checkpoint.read_marker(folder).get("quantize")
        return ModelSource(folder, enc, head, hf_config, folder / checkpoint.ASSETS_DIR, True, stored)
    enc, head = read_folder_configs(folder)
    return ModelSource(folder, enc, head, read_json(folder / "config.json"), folder, False, None)


__all__ = ["ModelSource", "read_source"]
