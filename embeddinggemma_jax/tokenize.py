"""Tokenisation with the checkpoint's own fast tokenizer, prompts, and length buckets.

We use the ``tokenizers`` library on the folder's ``tokenizer.json`` (its post-processor adds
``<bos>`` ... ``<eos>``), not ``transformers.AutoTokenizer``, which imports PyTorch when it is
installed. Truncation keeps ``<eos>`` last, exactly as the reference does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from embeddinggemma_jax.errors import WeightsError
from embeddinggemma_jax.io_utils import release_free_heap

# Padded lengths, about 1.5x apart: few compilations, and padding stays near 80-90% efficient.
DEFAULT_LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class TextTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_length: int, pad_id: int = 0, eos_id: int = 1):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise WeightsError(f"{path} is missing; the model folder needs its tokenizer.json")
        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        release_free_heap()  # the JSON parse leaves ~200 MB of freed heap behind
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_length = max_length
        self.pad_id = pad_id
        self.eos_id = eos_id

    def encode(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids with <bos>/<eos>; longer than ``max_length`` is truncated (eos kept) or refused."""
        encs = self._tok.encode_batch(list(texts))
        out = []
        for i, e in enumerate(encs):
            ids = e.ids
            if len(ids) > self.max_length:
                if not truncate:
                    raise ValueError(f"text {i} has {len(ids)} tokens, more than the model's limit of "
                                     f"{self.max_length}; shorten it or pass truncate=True")
                ids = ids[:self.max_length - 1] + [self.eos_id]
            out.append(ids)
        return out

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.encode(texts, truncate=True)]


def check_texts(texts: Iterable) -> list[str]:
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text at index {i} is {type(t).__name__}, not str; pass a list of strings")
        out.append(t)
    return out


def buckets_for(max_length: int, buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS) -> tuple[int, ...]:
    b = sorted({min(x, max_length) for x in buckets} | {max_length})
    return tuple(b)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"a sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def batch_rows(n: int, batch_size: int) -> int:
    """Rows of a padded batch holding n sequences: batch_size, or the next power of two below it."""
    if n >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


@dataclass
class Batch:
    ids: np.ndarray  # [B, L] int32, right-padded with pad id
    mask: np.ndarray  # [B, L] int32
    index: np.ndarray  # [n] positions in the caller's input of the first n rows

    @property
    def real_tokens(self) -> int:
        return int(self.mask.sum())


def make_batches(token_ids: Sequence[Sequence[int]], batch_size: int, buckets: Sequence[int],
                 pad_id: int = 0) -> list[Batch]:
    """Sort by length, group into length buckets, cut into fixed-shape padded batches.

    Every batch has shape (rows, bucket) with rows from ``batch_rows``: the jitted encoder compiles
    once per shape, never per batch. ``Batch.index`` maps rows back to input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_length(len(token_ids[i]), buckets), []).append(i)
    batches = []
    for L in sorted(groups, reverse=True):
        idx = groups[L]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            rows = batch_rows(len(chunk), batch_size)
            ids = np.full((rows, L), pad_id, np.int32)
            mask = np.zeros((rows, L), np.int32)
            for r, i in enumerate(chunk):
                t = token_ids[i]
                ids[r, :len(t)] = t
                mask[r, :len(t)] = 1
            batches.append(Batch(ids, mask, np.asarray(chunk, np.int64)))
    return batches
