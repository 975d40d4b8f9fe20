"""Fixed-shape batches from one work unit: sort by length, cut greedily, pad to the head's bucket.

Within a unit, records are sorted by token length (longest first, ties in input order) and cut
into consecutive batches. A batch's padded length is the bucket of its longest row; its row count
is the bucket's fixed row count (the topology's token budget), or, when fewer records of that
bucket are left (a sparse bucket in the long tail, the unit's end), the smallest allowed fraction
of it that holds them (``allowed_rows``: a bounded set of shapes, so a bounded number of
compilations). Spare rows take the next, shorter records, padded a little more.

Everything here is a pure function of the unit's token lengths: a rerun (resume, another host)
builds the same batches, so the same record meets the same batch shape and gets the same bits.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from embeddinggemma_jax.tokenize import bucket_length


@dataclass(frozen=True)
class PlannedBatch:
    length: int  # padded length L (a bucket)
    rows: int  # padded rows B (global batch size)
    index: np.ndarray  # [n <= rows] positions in the unit of the real rows, in row order

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.length)


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], rows_for: Callable[[int], int],
                 shrink: bool = True, row_multiple: int = 1) -> list[PlannedBatch]:
    """Cut a unit into batches. ``rows_for(L)``: global rows of a bucket-L batch (a multiple of
    ``row_multiple``, the number of devices the batch is split over). With ``shrink``, a batch
    whose bucket has fewer records left than ``rows_for(L)`` halves its rows while they still hold
    those records and stay a multiple of ``row_multiple`` (its spare rows take the next, shorter
    records): a few extra compilations of smaller shapes instead of padding a sparse bucket's batch
    with much shorter rows."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bucket = [bucket_length(lengths[i], buckets) for i in order]
    out = []
    i = 0
    while i < len(order):
        L = bucket[i]
        R = rows_for(L)
        if R < 1 or R % row_multiple:
            raise ValueError(f"bucket {L}: {R} rows is not a positive multiple of the {row_multiple} data shards")
        rows = R
        if shrink:
            # records of this bucket still to place (they are contiguous in the sorted order)
            m = bisect.bisect_right(bucket, -L, lo=i, key=lambda b: -b) - i
            rows = min((r for r in allowed_rows(R, row_multiple) if r >= m), default=R)
        chunk = order[i:i + rows]  # spare rows take the next (shorter) records
        out.append(PlannedBatch(L, rows, np.asarray(chunk, np.int64)))
        i += len(chunk)
    return out


def allowed_rows(R: int, row_multiple: int = 1) -> list[int]:
    """Row counts a bucket with ``R`` full rows may use: R/2^j and 3R/2^(j+2) (steps of 1.5x or
    less), kept only when they are whole multiples of ``row_multiple``; ascending."""
    out = {R}
    for j in range(1, 64):
        if R >> j == 0:
            break
        for r in (R / 2 ** j, 3 * R / 2 ** (j + 1)):
            if r == int(r) and int(r) % row_multiple == 0 and r >= 1:
                out.add(int(r))
    return sorted(out)


def pad_batch(token_ids: Sequence[Sequence[int]], batch: PlannedBatch, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids, mask [rows, L] int32, right-padded; rows past the real ones are all padding."""
    ids = np.full(batch.shape, pad_id, np.int32)
    mask = np.zeros(batch.shape, np.int32)
    for r, i in enumerate(batch.index):
        t = token_ids[i]
        ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
    return ids, mask


def padding_efficiency(lengths: Sequence[int], batches: Sequence[PlannedBatch]) -> float:
    """Real tokens / padded tokens over the batches."""
    padded = sum(b.rows * b.length for b in batches)
    return float(sum(lengths)) / padded if padded else 1.0


def unit_slices(n: int, unit_size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + unit_size)) for s in range(0, n, unit_size)]


__all__ = ["PlannedBatch", "plan_batches", "pad_batch", "padding_efficiency", "unit_slices"]
