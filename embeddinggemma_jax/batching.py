"""The one batching engine: token ids -> planned, padded, fixed-shape batches.

Every caller plans through ``BatchPlanner``: ``EmbeddingGemma.encode`` (and the server, through
``EmbeddingGemma.batches``), the batch job (per work unit, with the topology's rows per bucket)
and the trainer (``pad_group``: one batch, order kept, padded to the bucket of its longest text).

A plan is a pure function of the token lengths, so a rerun (resume, another host) builds the same
batches and the same record meets the same batch shape:

- records are sorted longest first (ties keep input order) and cut into consecutive batches;
- a batch's padded length is the bucket of its longest row (``buckets``: the padded lengths, data);
- its row count is the bucket's full count (``rows``, capped at ``max_tokens`` tokens per batch
  where set), or, when fewer records of that bucket are left, the smallest allowed count that holds
  them (``shrink``: "pow2" allows the powers of two below the full count, "fine" also 3/4 steps,
  "none" only the full count); allowed counts are multiples of ``row_multiple``. A bounded set of
  shapes, so a bounded number of compilations;
- rows a bucket's records leave empty take the next, shorter records, padded to the batch's length:
  a row computes a real text where it would otherwise compute padding.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

# Padded lengths for `encode`, about 1.25x apart (1.33x at the ends): batches of many lengths touch a
# dozen or so of them (one compilation each), with little padding (docs/benchmarks.md).
DEFAULT_LENGTH_BUCKETS = (16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
                          640, 768, 896, 1024, 1280, 1536, 1792, 2048)
# Training pads each batch to the bucket of its longest text, and every new shape costs a compilation of
# the whole train step (forward, backward, optimiser): coarser buckets, 1.5x apart.
TRAIN_LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# The batch job: steps of 4-8 tokens below 128, then ~1.1-1.2x apart, so a batch whose rows straddle two
# buckets wastes little; each bucket costs one compilation per job.
JOB_LENGTH_BUCKETS = (12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80, 88, 96, 112, 128, 144, 160, 176, 192,
                      224, 256, 288, 320, 352, 384, 448, 512, 576, 640, 768, 896, 1024, 1152, 1280, 1536, 1792,
                      2048)

# Tokens per batch on CPU: a layer's activations for ~2k tokens stay in cache, which makes each token
# cheaper than in much larger batches (docs/benchmarks.md). Accelerators want large batches: there
# the row count alone decides.
CPU_MAX_BATCH_TOKENS = 2048
SHRINK_MODES = ("pow2", "fine", "none")


def buckets_for(max_length: int, buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS) -> tuple[int, ...]:
    """The bucket table clipped to the model's limit, which is always a bucket itself."""
    return tuple(sorted({min(x, max_length) for x in buckets} | {max_length}))


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"a sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def resolve_max_batch_tokens(value="auto", cpu: int = CPU_MAX_BATCH_TOKENS) -> int | None:
    """'auto' -> the default backend's cap (``cpu`` on CPU, None elsewhere); None (no cap) and positive
    integers pass through; anything else is a ValueError."""
    if isinstance(value, str) and value == "auto":
        import jax

        return cpu if jax.default_backend() == "cpu" else None
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"max_batch_tokens must be a positive integer, None (no cap) or 'auto', got {value!r}")


def parse_max_batch_tokens(text: str) -> int | None | str:
    """'auto' (the package's default for the backend), 'none' (no cap) or a positive integer."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--max-batch-tokens must be 'auto', 'none' or a positive integer, got {text!r}")
    return int(text)


def round_rows(n: int) -> int:
    """A row count TPUs like: a multiple of 8 (sublanes) when possible, else a power of two; at least 1."""
    if n >= 8:
        return n // 8 * 8
    return 1 << max(0, n.bit_length() - 1) if n >= 1 else 1


@dataclass(frozen=True)
class PlannedBatch:
    length: int  # padded length L (a bucket)
    rows: int  # padded rows B
    index: np.ndarray  # [n <= rows] positions in the caller's sequence of the real rows, in row order

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.length)


@dataclass
class Batch:
    ids: np.ndarray  # [B, L] int32, right-padded with the pad id
    mask: np.ndarray  # [B, L] int32
    index: np.ndarray  # [n] positions in the caller's input of the first n rows

    @property
    def real_tokens(self) -> int:
        return int(self.mask.sum())


def pad_rows(token_ids: Sequence[Sequence[int]], index: Sequence[int], shape: tuple[int, int],
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids, mask [rows, L] int32: row r holds ``token_ids[index[r]]``, right-padded; later rows are padding."""
    ids = np.full(shape, pad_id, np.int32)
    mask = np.zeros(shape, np.int32)
    for r, i in enumerate(index):
        t = token_ids[i]
        ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
    return ids, mask


def padding_efficiency(real_tokens: int, padded_tokens: int) -> float:
    """Real tokens / padded tokens (1.0 for nothing at all)."""
    return float(real_tokens) / padded_tokens if padded_tokens else 1.0


def plan_efficiency(lengths: Sequence[int], plan: Sequence[PlannedBatch]) -> float:
    return padding_efficiency(sum(lengths[i] for b in plan for i in b.index), sum(b.rows * b.length for b in plan))


def allowed_rows(full: int, shrink: str = "pow2", row_multiple: int = 1) -> list[int]:
    """The row counts a bucket whose full batch has ``full`` rows may use, ascending: ``full`` and,
    with "pow2", the powers of two below it; with "fine", full/2^j and 3*full/2^(j+1) (steps of 1.5x
    or less); with "none", ``full`` only. Counts must be multiples of ``row_multiple``."""
    if shrink not in SHRINK_MODES:
        raise ValueError(f"shrink must be one of {', '.join(SHRINK_MODES)}, got {shrink!r}")
    out = {full}
    if shrink == "pow2":
        out |= {1 << j for j in range(full.bit_length()) if 1 << j < full}
    elif shrink == "fine":
        for j in range(1, full.bit_length()):
            for r in (full / 2 ** j, 3 * full / 2 ** (j + 1)):
                if r >= 1 and r == int(r):
                    out.add(int(r))
    return sorted(r for r in out if r % row_multiple == 0)


@dataclass(frozen=True)
class BatchPlanner:
    """Plans and pads batches; see the module docstring for the rules.

    ``rows``: the full row count of every bucket (an int) or per bucket (a mapping); with
    ``max_tokens`` a bucket's full count is capped so that rows * length <= max_tokens (at least one
    row, rounded down to a power of two when the cap binds).
    """

    buckets: tuple[int, ...]
    rows: int | Mapping[int, int]
    pad_id: int = 0
    max_tokens: int | None = None
    shrink: str = "pow2"
    row_multiple: int = 1
    _allowed: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive lengths, got {self.buckets!r}")
        if isinstance(self.rows, int) and (isinstance(self.rows, bool) or self.rows < 1):
            raise ValueError(f"rows per batch must be a positive integer, got {self.rows!r}")
        if self.max_tokens is not None:
            resolve_max_batch_tokens(self.max_tokens)  # a positive integer, or the same error as everywhere
        allowed_rows(1, self.shrink)  # validates the mode

    def full_rows(self, length: int) -> int:
        """Rows of a full batch of the ``length`` bucket."""
        rows = self.rows if isinstance(self.rows, int) else self.rows[length]
        if self.max_tokens is not None and rows * length > self.max_tokens:
            rows = 1 << (max(1, self.max_tokens // length).bit_length() - 1)
        if rows < 1 or rows % self.row_multiple:
            raise ValueError(f"bucket {length}: {rows} rows is not a positive multiple of {self.row_multiple} "
                             "(the devices a batch is split over)")
        return rows

    def allowed(self, length: int) -> list[int]:
        if length not in self._allowed:
            self._allowed[length] = allowed_rows(self.full_rows(length), self.shrink, self.row_multiple)
        return self._allowed[length]

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) shape a plan can use: what a server warms up, what a job may compile."""
        return [(r, L) for L in self.buckets for r in self.allowed(L)]

    def plan(self, lengths: Sequence[int]) -> list[PlannedBatch]:
        """Cut records of these token lengths into batches (longest first)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
        bucket = [bucket_length(lengths[i], self.buckets) for i in order]  # non-increasing
        out, i = [], 0
        while i < len(order):
            L = bucket[i]
            left = bisect.bisect_right(bucket, -L, lo=i, key=lambda b: -b) - i  # this bucket's records left
            allowed = self.allowed(L)
            rows = next((r for r in allowed if r >= left), allowed[-1])
            chunk = order[i:i + rows]  # spare rows take the next (shorter) records
            out.append(PlannedBatch(L, rows, np.asarray(chunk, np.int64)))
            i += len(chunk)
        return out

    def pad(self, token_ids: Sequence[Sequence[int]], planned: PlannedBatch) -> Batch:
        ids, mask = pad_rows(token_ids, planned.index, planned.shape, self.pad_id)
        return Batch(ids, mask, planned.index)

    def batches(self, token_ids: Sequence[Sequence[int]]) -> list[Batch]:
        """``plan`` then ``pad``: the padded batches; ``Batch.index`` maps rows back to input order."""
        return [self.pad(token_ids, b) for b in self.plan([len(t) for t in token_ids])]

    def pad_group(self, token_ids: Sequence[Sequence[int]], longest: int = 0) -> Batch:
        """One batch of these records in their order (a contrastive batch must keep its pairs):
        ``len(token_ids)`` rows, padded to the bucket of the longest of them (or of ``longest``, when
        several groups must share one shape)."""
        L = bucket_length(max(longest, *(len(t) for t in token_ids)), self.buckets)
        index = np.arange(len(token_ids))
        ids, mask = pad_rows(token_ids, index, (len(token_ids), L), self.pad_id)
        return Batch(ids, mask, index)


__all__ = ["BatchPlanner", "Batch", "PlannedBatch", "DEFAULT_LENGTH_BUCKETS", "TRAIN_LENGTH_BUCKETS",
           "JOB_LENGTH_BUCKETS", "CPU_MAX_BATCH_TOKENS", "buckets_for", "bucket_length", "allowed_rows",
           "pad_rows", "padding_efficiency", "parse_max_batch_tokens", "plan_efficiency", "resolve_max_batch_tokens",
           "round_rows"]
