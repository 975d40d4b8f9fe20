"""Training pairs from JSONL (or parquet): streamed, shuffled with a seed, resumable at any position.

One record per line: ``{"query": ..., "positive": ..., "negative": ...}`` (the negative is optional,
field names configurable). The query and document prompts are applied exactly as at inference
(``prompts["query"]`` before the query, ``prompts["document"]`` before positives and negatives),
so the model is trained on the strings it will see when it is used.

Streaming: the file is indexed once by byte offset (8 bytes per record) and records are read on
demand, so a pair file larger than memory works. The order of epoch ``e`` is a permutation drawn
from ``(seed, e)``; the position ``(epoch, index)`` is all a checkpoint needs to resume the stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from embeddinggemma_jax.batching import BatchPlanner, buckets_for
from embeddinggemma_jax.io_utils import parse_json
from embeddinggemma_jax.options import option
from embeddinggemma_jax.prompts import prompt_text, with_prompt


@dataclass(frozen=True)
class Fields:
    query: str = option("query", "JSONL field with the query", flag="--query-field")
    positive: str = option("positive", "JSONL field with the positive document", flag="--positive-field")
    negative: str | None = option("negative", "JSONL field with a hard negative; '' ignores negatives",
                                  flag="--negative-field")
    score: str | None = option(None, "JSONL field with the pair's gold score, a number (--loss cosent)",
                               flag="--score-field")

    def __post_init__(self):
        if self.negative == "":  # '' on the command line or in a config: ignore negatives even when present
            object.__setattr__(self, "negative", None)
        if self.score == "":
            object.__setattr__(self, "score", None)


@dataclass
class Position:
    """Where the stream is: the next record is number ``index`` of epoch ``epoch``'s permutation."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        return cls(int(d["epoch"]), int(d["index"]))


@dataclass
class TextBatch:
    queries: list[str]
    positives: list[str]
    negatives: list[str] | None  # one per query, or None
    scores: list[float] | None = None  # one gold score per pair (--score-field), or None


@dataclass
class TokenBatch:
    """Fixed-shape token arrays; leading axis = gradient-accumulation micro-batches."""

    query_ids: np.ndarray  # [A, B, Lq] int32
    query_mask: np.ndarray
    doc_ids: np.ndarray  # [A, B * (1 + n_neg), Ld]: the B positives, then the B negatives
    doc_mask: np.ndarray
    scores: np.ndarray | None = None  # [A, B] float32 gold scores (--loss cosent), or None

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.query_ids, self.query_mask, self.doc_ids, self.doc_mask


class PairFile:
    """Random access to the records of JSONL pair files through a byte-offset index.

    ``path``: a file, or a glob (``data/*.jsonl``, ``gs://bucket/pairs-*.jsonl``), expanded and sorted as
    ``embed --input`` does (``batch.readers.expand_inputs``; gs:// through etils.epath): the records of
    all the files, in that order, are one pair set. Indexing reads every file once and validates every
    record (valid JSON, the query and positive fields present as strings, a negative on every record or
    on none), so a bad line stops the run before its first step, naming the file and line, not hours
    into it.
    """

    def __init__(self, path: str | Path, fields: Fields = Fields()):
        import hashlib

        from embeddinggemma_jax.batch.readers import expand_inputs
        from embeddinggemma_jax.storage import epath

        self.fields = fields
        self.path = str(path)
        try:
            self.paths = expand_inputs([self.path])
        except ValueError as e:
            raise FileNotFoundError(f"pair files {self.path} match nothing; pass JSONL files with one "
                                    f'{{"{fields.query}": ..., "{fields.positive}": ...}} object per line') from e
        offsets, lines, files, with_negative = [], [], [], []
        self._columns: dict[int, dict[str, list]] = {}  # parquet files: their pair columns, read whole
        digest = hashlib.sha256()
        for k, p in enumerate(self.paths):
            if epath(p).is_dir():
                raise IsADirectoryError(f"pair file {p} is a folder; pass the JSONL (or parquet) files inside it "
                                        "(a glob works: 'FOLDER/*.jsonl')")
            if not epath(p).is_file():
                raise FileNotFoundError(f"pair file {p} does not exist; pass a JSONL file with one "
                                        f'{{"{fields.query}": ..., "{fields.positive}": ...}} object per line')
            h = hashlib.sha256()
            if is_parquet(p):
                self._columns[k] = cols = self._read_parquet(p, h)
                for row in range(len(next(iter(cols.values())))):
                    with_negative.append(self.check({c: v[row] for c, v in cols.items()}, f"{p} row {row + 1}", True)[2]
                                         is not None)
                    offsets.append(row)
                    lines.append(row + 1)
                    files.append(k)
            else:
                with epath(p).open("rb") as f:
                    pos = 0
                    for number, line in enumerate(f, 1):
                        h.update(line)
                        if line.strip():
                            with_negative.append(self.parse(line, number, p)[2] is not None)
                            offsets.append(pos)
                            lines.append(number)
                            files.append(k)
                        pos += len(line)
            digest.update(h.digest())
        if not offsets:
            raise ValueError(f"pair file {self.path} has no records")
        if any(with_negative) and not all(with_negative):
            have, lack = (with_negative.index(v) for v in (True, False))
            fa, fb = (self.paths[files[i]] for i in (have, lack))
            where = (f"{fa}: line {lines[have]}", f"line {lines[lack]}") if fa == fb else \
                (f"{fa} line {lines[have]}", f"{fb} line {lines[lack]}")
            raise ValueError(f"{where[0]} has a {fields.negative!r} field and {where[1]} does not; give "
                             "every record a negative, or none (or pass --negative-field '' to ignore them)")
        self.offsets = np.asarray(offsets, np.int64)
        self.lines = np.asarray(lines, np.int64)
        self.files = np.asarray(files, np.int32)
        self.sha256 = digest.hexdigest()  # the pair files' bytes, in order: a resumed run checks it
        self._f: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.offsets)

    def _read_parquet(self, p: str, h) -> dict[str, list]:
        """The query/positive/negative columns of a parquet pair file (``h`` is fed the file's bytes)."""
        import io

        import pyarrow.parquet as pq

        from embeddinggemma_jax.storage import epath

        data = epath(p).read_bytes()
        h.update(data)
        pf = pq.ParquetFile(io.BytesIO(data))
        names = set(pf.schema_arrow.names)
        f = self.fields
        missing = [c for c in (f.query, f.positive) if c not in names]
        if missing:
            raise ValueError(f"{p} has no column {missing[0]!r} (columns: {', '.join(sorted(names))}); name the "
                             f"fields with --query-field/--positive-field/--negative-field")
        wanted = [c for c in (f.query, f.positive, f.negative, f.score) if c and c in names]
        table = pf.read(columns=wanted)
        return {c: table.column(c).to_pylist() for c in wanted}

    def parse(self, line: bytes, number: int, path: str) -> tuple[str, str, str | None, float | None]:
        """(query, positive, negative or None, score or None)."""
        where = f"{path} line {number}"
        return self.check(parse_json(line, where, expect=dict, hint="write one JSON object per line"), where)

    def check(self, obj: dict, where: str,
              null_is_missing: bool = False) -> tuple[str, str, str | None, float | None]:
        """(query, positive, negative or None, score or None) of one record, each text field checked to be a
        string of Unicode text (a JSON escape such as "\\ud800" is a lone surrogate, which the tokenizer
        cannot take)."""
        from embeddinggemma_jax.batch.readers import check_unicode

        f = self.fields
        out = []
        for name, required in ((f.query, True), (f.positive, True), (f.negative, False)):
            if name is None or (not required and (name not in obj or (null_is_missing and obj[name] is None))):
                out.append(None)
                continue
            if name not in obj:
                raise ValueError(f"{where} has no field {name!r} (fields: {', '.join(sorted(obj))}); "
                                 f"name the fields with --query-field/--positive-field/--negative-field")
            if not isinstance(obj[name], str):
                raise ValueError(f"{where}: field {name!r} is {type(obj[name]).__name__}, not a string")
            try:
                check_unicode(obj[name], f"field {name!r}")
            except ValueError as e:
                raise ValueError(f"{where}: {e}; fix the record") from None
            out.append(obj[name])
        score = None
        if f.score is not None:
            import math

            if f.score not in obj:
                raise ValueError(f"{where} has no field {f.score!r} (fields: {', '.join(sorted(obj))}); give every "
                                 "pair a score or name its field with --score-field")
            score = obj[f.score]
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise ValueError(f"{where}: field {f.score!r} is {score!r}, not a finite number")
            score = float(score)
        return out[0], out[1], out[2], score

    def record(self, i: int) -> tuple[str, str, str | None, float | None]:
        from embeddinggemma_jax.storage import epath

        k = int(self.files[i])
        if k in self._columns:
            cols, row = self._columns[k], int(self.offsets[i])
            return self.check({c: v[row] for c, v in cols.items()}, f"{self.paths[k]} row {row + 1}", True)
        if k not in self._f:  # opened on first use: a host opens only the files its rows are in
            self._f[k] = epath(self.paths[k]).open("rb")
        f = self._f[k]
        f.seek(int(self.offsets[i]))
        return self.parse(f.readline(), int(self.lines[i]), self.paths[k])

    def all_records(self) -> list[tuple[str, str, str | None, float | None]]:
        return [self.record(i) for i in range(len(self))]


def is_parquet(path: str) -> bool:
    return str(path).lower().endswith((".parquet", ".pq"))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class PairStream:
    """Endless stream of shuffled text batches; ``position`` says where it is and restores it."""

    def __init__(self, pairs: PairFile, batch_size: int, seed: int = 0, position: Position | None = None):
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got {batch_size}")
        if batch_size > len(pairs):
            raise ValueError(f"batch_size {batch_size} is larger than the pair file ({len(pairs)} records)")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.position = position or Position()
        self._order = None

    def _perm(self, epoch):
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.pairs), self.seed, epoch))
        return self._order[1]

    def next_batch(self, rows: tuple[int, int] | None = None) -> TextBatch:
        """The next ``batch_size`` records; an epoch's leftover (< batch_size) is dropped. ``rows``
        (start, stop): read only those rows of the batch (this host's part); the position advances by
        the whole batch, the same on every host."""
        p = self.position
        if p.index + self.batch_size > len(self.pairs):
            p = self.position = Position(p.epoch + 1, 0)
        idx = self._perm(p.epoch)[p.index:p.index + self.batch_size]
        if rows is not None:
            idx = idx[rows[0]:rows[1]]
        self.position = Position(p.epoch, p.index + self.batch_size)
        recs = [self.pairs.record(int(i)) for i in idx]
        negs = [r[2] for r in recs]  # all or none: PairFile checked
        return TextBatch([r[0] for r in recs], [r[1] for r in recs], None if negs[0] is None else negs,
                         None if self.pairs.fields.score is None else [r[3] for r in recs])

    def __iter__(self) -> Iterator[TextBatch]:
        while True:
            yield self.next_batch()


class BatchEncoder:
    """Texts -> prompted token ids (truncated to ``max_length``) -> one padded batch per group, through
    the batching engine (``BatchPlanner.pad_group``: order kept, length rounded up to a bucket)."""

    def __init__(self, tokenizer, prompts: dict[str, str], max_length: int, buckets: Sequence[int],
                 query_prompt: str = "query", document_prompt: str = "document"):
        self.tokenizer = tokenizer
        self.query_prefix = prompt_text(prompts, query_prompt or None, what="--query-prompt") or ""
        self.doc_prefix = prompt_text(prompts, document_prompt or None, what="--document-prompt") or ""
        self.max_length = min(max_length, tokenizer.max_length)
        for what, name, prefix in (("query", query_prompt, self.query_prefix),
                                   ("document", document_prompt, self.doc_prefix)):
            n = len(tokenizer.encode([prefix], truncate=False)[0])  # <bos>, the prompt, <eos>
            if self.max_length <= n:
                raise ValueError(f"--max-length {max_length} leaves no token for the text: the {what} prompt "
                                 f"{name!r} ({prefix!r}) is {n} tokens with <bos> and <eos>, so every {what} would "
                                 f"be cut inside it; pass --max-length above {n} (e.g. 256)")
        self.buckets = buckets_for(self.max_length, buckets)

    def ids(self, texts: list[str], prefix: str) -> list[list[int]]:
        return self.tokenizer.encode(with_prompt(texts, prefix), truncate=True, max_length=self.max_length)

    def planner(self, rows: int) -> BatchPlanner:
        return BatchPlanner(self.buckets, rows, self.tokenizer.pad_id)

    def pad(self, seqs: list[list[list[int]]], longest: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[A][rows][tokens] -> ids, mask [A, rows, L]: every group padded to the bucket of the longest
        sequence of all groups (one shape per step), or of ``longest`` (the longest over all hosts)."""
        longest = longest or max(len(s) for group in seqs for s in group)
        planner = self.planner(len(seqs[0]))
        batches = [planner.pad_group(group, longest) for group in seqs]
        return np.stack([b.ids for b in batches]), np.stack([b.mask for b in batches])

    def encode(self, micro: list[TextBatch], agree: Callable[[list[int]], list[int]] | None = None) -> TokenBatch:
        """``agree``: [longest query, longest document] of this host -> the maxima over all hosts, so that
        every host pads its rows of the global batch to the same shape."""
        if len({b.negatives is None for b in micro}) > 1:
            raise ValueError("micro-batches of one step mix records with and without negatives")
        q = [self.ids(b.queries, self.query_prefix) for b in micro]
        d = [self.ids(b.positives + (b.negatives or []), self.doc_prefix) for b in micro]
        longest = [max(len(s) for g in x for s in g) for x in (q, d)]
        if agree is not None:
            longest = agree(longest)
        qi, qm = self.pad(q, longest[0])
        di, dm = self.pad(d, longest[1])
        scores = None if micro[0].scores is None else np.asarray([b.scores for b in micro], np.float32)
        return TokenBatch(qi, qm, di, dm, scores)
