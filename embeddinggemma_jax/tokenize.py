"""Tokenisation with the checkpoint's own fast tokenizer.

We use the ``tokenizers`` library on the folder's ``tokenizer.json`` (its post-processor adds
``<bos>`` ... ``<eos>``), not ``transformers.AutoTokenizer``, which imports PyTorch when it is
installed. Truncation keeps ``<eos>`` last, exactly as the reference does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from embeddinggemma_jax.errors import WeightsError
from embeddinggemma_jax.io_utils import release_free_heap

# The tokenizer's files in a model folder: copied into checkpoints and exported folders.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


class TextTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_length: int, pad_id: int = 0, eos_id: int = 1):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise WeightsError(f"{path} is missing; the model folder needs its tokenizer.json")
        self.path = path
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(f"{path} is not a readable tokenizer ({msg}); re-download or re-export the model "
                               "folder") from None
        release_free_heap()  # the JSON parse leaves much freed heap behind
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_length = max_length
        self.pad_id = pad_id
        self.eos_id = eos_id

    def encode(self, texts: Sequence[str], truncate: bool = True, max_length: int | None = None) -> list[list[int]]:
        """Token ids with <bos>/<eos>; longer than ``max_length`` (default and at most: the model's limit)
        is truncated with <eos> kept last, as the reference does, or refused when ``truncate`` is False."""
        limit = min(max_length or self.max_length, self.max_length)
        encs = self._tok.encode_batch_fast(list(texts))  # the same ids, without computing character offsets
        out = []
        for i, e in enumerate(encs):
            ids = e.ids
            if len(ids) > limit:
                if not truncate:
                    raise ValueError(f"text {i} has {len(ids)} tokens, more than the limit of "
                                     f"{limit}; shorten it or pass truncate=True")
                ids = ids[:limit - 1] + [self.eos_id]
            out.append(ids)
        return out

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts as ``encode(texts, truncate=True)`` would give (truncation keeps exactly the model's
        limit), without building the id lists."""
        return [min(len(e), self.max_length) for e in self._tok.encode_batch_fast(list(texts))]


def check_texts(texts: Iterable, where=lambda i: f"text at index {i}") -> list[str]:
    """The texts as a list, each a str that UTF-8 can encode (a lone surrogate, e.g. from undecodable
    bytes, is refused naming ``where(i)``: the tokenizer would fail on it without saying where)."""
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{where(i)} is {type(t).__name__}, not str; pass a list of strings")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where(i)} is not valid UTF-8 (an undecodable byte at character {e.start}); "
                             "pass UTF-8 text") from None
        out.append(t)
    return out
