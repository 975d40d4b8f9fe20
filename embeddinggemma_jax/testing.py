"""Tiny random EmbeddingGemma folders for fast tests and benchmarks (no PyTorch needed).

``make_tiny_folder`` writes a complete sentence-transformers folder: random weights for
``EncoderConfig.tiny()`` (norm offsets random too, so the ``1 +`` matters), and a byte-level
tokenizer (4 special tokens + 256 bytes) whose post-processor adds <bos> ... <eos> like Gemma's.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from embeddinggemma_jax.config import EncoderConfig, HeadConfig
from embeddinggemma_jax.export import save_folder
from embeddinggemma_jax.head import EmbeddingGemmaModule
from embeddinggemma_jax.weights import iter_params

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def write_byte_tokenizer(folder: Path, max_length: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> <bos> $B <eos>",
        special_tokens=[("<bos>", 2), ("<eos>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": max_length, "padding_side": "right",
        "add_bos_token": True, "add_eos_token": True}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))


def random_state(enc: EncoderConfig, head: HeadConfig, seed: int = 0) -> nnx.State:
    module = EmbeddingGemmaModule(enc, head, rngs=nnx.Rngs(seed))
    state = nnx.state(module, nnx.Param)
    rng = np.random.default_rng(seed)
    for path, var in iter_params(state):
        if path[-1] == "scale":  # norm offsets: random so that a missing "1 +" would show
            var.set_value(jnp.asarray(rng.normal(0.0, 0.3, var.get_value().shape), jnp.float32))
        elif path[-1] in ("dense1", "dense2"):
            var.set_value(jnp.asarray(rng.normal(0.0, 0.1, var.get_value().shape), jnp.float32))
    return state


def make_tiny_folder(folder: str | Path, seed: int = 0, enc: EncoderConfig | None = None,
                     head: HeadConfig | None = None) -> Path:
    folder = Path(folder)
    enc = enc or EncoderConfig.tiny()
    head = head or HeadConfig.tiny(enc)
    tok_dir = folder.parent / f".{folder.name}-tokenizer"
    write_byte_tokenizer(tok_dir, head.max_seq_length)
    save_folder(folder, random_state(enc, head, seed), enc, head, tok_dir)
    return folder


__all__ = ["make_tiny_folder", "random_state", "write_byte_tokenizer"]

