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

# Padded lengths, about 1.25x apart (1.33x at the ends). Batches of many lengths touch a dozen or so
# of them (one compilation each); padding was 0.71 -> 0.89 efficient on 64 stdlib docstrings against
# the 1.5x-apart set, with the spare rows of each bucket's last batch filled (see make_batches).
DEFAULT_LENGTH_BUCKETS = (16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
                          640, 768, 896, 1024, 1280, 1536, 1792, 2048)
# Training pads each batch to the bucket of its longest text, and every new shape costs a compilation of
# the whole train step (forward, backward, optimiser): coarser buckets, 1.5x apart.
TRAIN_LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


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


# Tokens per batch on CPU: a layer's activations for ~2k tokens stay in cache, and per token a
# batch of 2,048 runs 1.3-1.5x faster than one of 8-16k (benchmarks/profile_long.py, issue 7).
# Accelerators want large batches: there ``batch_size`` alone decides.
CPU_MAX_BATCH_TOKENS = 2048


def resolve_max_batch_tokens(value="auto") -> int | None:
    """'auto' -> the default backend's cap (``CPU_MAX_BATCH_TOKENS`` on CPU, None elsewhere); None (no cap)
    and positive integers pass through; anything else is a ValueError."""
    if isinstance(value, str) and value == "auto":
        import jax

        return CPU_MAX_BATCH_TOKENS if jax.default_backend() == "cpu" else None
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"max_batch_tokens must be a positive integer, None (no cap) or 'auto', got {value!r}")


def rows_per_batch(length: int, batch_size: int, max_tokens: int | None = None) -> int:
    """Rows of a full batch of the ``length`` bucket: batch_size, capped so that rows * length <=
    max_tokens (but at least one row), rounded down to a power of two when the cap binds."""
    if max_tokens is None or batch_size * length <= max_tokens:
        return batch_size
    return 1 << (max(1, max_tokens // length).bit_length() - 1)


def make_batches(token_ids: Sequence[Sequence[int]], batch_size: int, buckets: Sequence[int],
                 pad_id: int = 0, max_tokens: int | None = None) -> list[Batch]:
    """Sort by length (longest first) and cut into fixed-shape padded batches.

    A batch's length is the bucket of its longest text, and it holds ``rows_per_batch`` rows of that
    bucket (at most ``batch_size``, and ``max_tokens`` tokens where set). When a bucket runs out, its
    last batch has ``batch_rows`` rows (a power of two), and rows its own texts leave empty take the
    next, shorter texts, padded to its length: a row computes a real text where it would otherwise
    compute padding. The jitted encoder compiles once per shape, never per batch; ``Batch.index``
    maps rows back to input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_tokens = resolve_max_batch_tokens(max_tokens)
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    bucket = [bucket_length(len(token_ids[i]), buckets) for i in order]  # non-increasing
    batches, s = [], 0
    while s < len(order):
        L = bucket[s]
        size = rows_per_batch(L, batch_size, max_tokens)
        same, end = s, min(s + size, len(order))
        while same < end and bucket[same] == L:  # this bucket's texts among the next `size`
            same += 1
        rows = batch_rows(same - s, size)
        chunk = order[s:s + rows]
        s += len(chunk)
        ids = np.full((rows, L), pad_id, np.int32)
        mask = np.zeros((rows, L), np.int32)
        for r, i in enumerate(chunk):
            t = token_ids[i]
            ids[r, :len(t)] = t
            mask[r, :len(t)] = 1
        batches.append(Batch(ids, mask, np.asarray(chunk, np.int64)))
    return batches
