"""Stream records from jsonl, text or parquet files, cut into fixed work units.

A work unit is ``unit_size`` consecutive lines (jsonl, text) or rows (parquet) of one input file;
unit ``k`` of file ``f`` is named ``{f:05d}-{k:07d}`` and becomes exactly one output shard. Units
are a pure function of the input files and ``unit_size``: not of the host count, not of earlier
runs, so a resumed or re-sharded job finds the same units again.

Hosts share the input by units (``select``): a host parses and tokenises only its own units and
skips the lines of the others without decoding them. Paths go through ``etils.epath``, so
``gs://`` works wherever the GCS backend is installed. Memory: one unit at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from embeddinggemma_jax.errors import BadRecordError, InputError

FORMATS = ("jsonl", "text", "parquet")


@dataclass(frozen=True)
class InputSpec:
    paths: tuple[str, ...]
    format: str
    text_field: str = "text"
    id_field: str | None = None
    title_field: str | None = None
    unit_size: int = 16384

    def options(self) -> dict:
        return {"inputs": list(self.paths), "format": self.format, "text_field": self.text_field,
                "id_field": self.id_field, "title_field": self.title_field, "unit_size": self.unit_size}


@dataclass
class Record:
    id: str | int
    text: str
    title: str | None
    line: int  # 1-based line (jsonl, text) or row (parquet) in its file


@dataclass
class BadRecord:
    line: int
    error: str

    def to_json(self, path: str) -> dict:
        return {"file": path, "line": self.line, "error": self.error}


@dataclass
class Unit:
    file_index: int
    unit_index: int
    path: str
    first_line: int
    last_line: int
    selected: bool
    records: list[Record] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    blank: int = 0  # blank lines (not records)
    bytes_done: int = 0  # input bytes up to the end of this unit, over all files (progress)
    sha256: str | None = None  # fingerprint of the unit's input (``fingerprint``); selected units only

    @property
    def name(self) -> str:
        return unit_name(self.file_index, self.unit_index)


def unit_name(file_index: int, unit_index: int) -> str:
    return f"{file_index:05d}-{unit_index:07d}"


def infer_format(paths: Sequence[str]) -> str:
    def one(p: str) -> str:
        p = p.lower().removesuffix(".gz")
        if p.endswith((".jsonl", ".json", ".ndjson")):
            return "jsonl"
        if p.endswith((".parquet", ".pq")):
            return "parquet"
        return "text"

    kinds = {one(p) for p in paths}
    if len(kinds) > 1:
        raise InputError(f"inputs mix formats ({', '.join(sorted(kinds))}); pass --format or split the job")
    return kinds.pop()


def _epath(p: str):
    from embeddinggemma_jax.storage import epath

    return epath(p)


def is_gzip(path: str) -> bool:
    return str(path).lower().endswith(".gz")


def fingerprint():
    """The hash a unit's input is fingerprinted with: sha256 over its raw lines (jsonl, text: the bytes
    as stored, after gzip decompression) or over its rows' field values (parquet: ``_row_bytes``). A
    shard records its unit's fingerprint; a rerun redoes a shard whose input changed, ``verify`` reports it."""
    return hashlib.sha256()


def _row_bytes(cols: dict, j: int) -> bytes:
    return (json.dumps([cols[c][j] for c in sorted(cols)], ensure_ascii=False, default=str) + "\n").encode(
        "utf-8", "surrogatepass")


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Paths with ``*``/``?``/``[`` are globbed (locally or on gs:// through epath), sorted; the rest
    pass through. A pattern matching nothing is an error, never an empty job."""
    out = []
    for p in paths:
        p = str(p)
        if not any(c in p for c in "*?["):
            out.append(p)
            continue
        scheme, sep, rest = p.partition("://")
        prefix, rest = (scheme + sep, rest) if sep else ("", p)
        parts = rest.split("/")
        i = next(j for j, part in enumerate(parts) if any(c in part for c in "*?["))
        base = prefix + ("/".join(parts[:i]) or ("/" if rest.startswith("/") else "."))
        matches = sorted(str(m) for m in _epath(base).glob("/".join(parts[i:])))
        if not matches:
            raise InputError(f"--input {p} matches no file")
        out += matches
    seen: dict[str, str] = {}
    for p in out:
        key = p if "://" in p else os.path.realpath(p)  # ./a.jsonl, a.jsonl and a link to it are one file
        if key in seen:
            same = f" and {seen[key]}" if seen[key] != p else ""
            raise InputError(f"input {p}{same} name the same file; give each file once (its records would be "
                             f"embedded twice)")
        seen[key] = p
    return out


def input_sizes(paths: Sequence[str]) -> list[int]:
    out = []
    for p in paths:
        path = _epath(p)
        if not path.exists():
            raise InputError(f"input {p} does not exist; check the path (local, or gs://bucket/... with gcsfs)")
        if path.is_dir():
            raise InputError(f"input {p} is a folder; pass the files inside it (a shell glob works)")
        out.append(int(path.stat().length))
    return out


def _check_id(v, what: str):
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"{what} must be a string or an integer, got {type(v).__name__}")
    return v


def _check_title(v):
    if v is not None and not isinstance(v, str):
        raise ValueError(f"title must be a string or null, got {type(v).__name__}")
    return v


def check_unicode(v, what: str):
    """A string that UTF-8 can hold: JSON's ``"\\ud800"`` escapes decode to a lone surrogate, which no
    tokenizer or UTF-8 writer takes."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} holds a lone surrogate ({v[e.start]!a} at character {e.start + 1}), "
                             f"which is not Unicode text") from None
    return v


def parse_line(raw: bytes, line: int, path: str, spec: InputSpec) -> Record | None:
    """One line -> a Record, None for a blank line; raises ValueError naming what is wrong."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if line == 1 and s.startswith("\ufeff"):  # a UTF-8 byte order mark is not part of the first record
        s = s[1:]
    s = s.rstrip("\n").rstrip("\r")
    if not s.strip():
        return None
    if spec.format == "text":
        return Record(f"{path}:{line}", s, None, line)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a JSON line must be an object, got {type(obj).__name__}")
    return _from_fields(obj.get, lambda k: k in obj, line, path, spec)


def _from_fields(get, has, line: int, path: str, spec: InputSpec) -> Record:
    if not has(spec.text_field):
        raise ValueError(f"field {spec.text_field!r} is missing (set --text-field)")
    text = get(spec.text_field)
    if not isinstance(text, str):
        raise ValueError(f"field {spec.text_field!r} must be a string, got {type(text).__name__}")
    check_unicode(text, f"field {spec.text_field!r}")
    if spec.id_field is None:
        rid = f"{path}:{line}"
    else:
        if not has(spec.id_field) or get(spec.id_field) is None:
            raise ValueError(f"id field {spec.id_field!r} is missing")
        rid = check_unicode(_check_id(get(spec.id_field), f"id field {spec.id_field!r}"), f"id field {spec.id_field!r}")
    title = _check_title(get(spec.title_field)) if spec.title_field and has(spec.title_field) else None
    check_unicode(title, f"field {spec.title_field!r}")
    return Record(rid, text, title, line)


def iter_units(spec: InputSpec, select: Callable[[int, int], bool] = lambda f, k: True) -> Iterator[Unit]:
    """Every unit of every input in order; units where ``select(file_index, unit_index)`` is false
    come back with ``selected=False`` and no records (their lines are skipped, not parsed)."""
    sizes = input_sizes(spec.paths)
    base = 0
    for f, path in enumerate(spec.paths):
        if spec.format == "parquet":
            yield from _parquet_units(f, path, spec, select, base, sizes[f])
        else:
            yield from _line_units(f, path, spec, select, base)
        base += sizes[f]


def _line_units(f: int, path: str, spec: InputSpec, select, base: int) -> Iterator[Unit]:
    import gzip

    N = spec.unit_size
    with _epath(path).open("rb") as stored:
        fh = gzip.GzipFile(fileobj=stored, mode="rb") if is_gzip(path) else stored
        k, line, pos = 0, 0, 0
        unit = None
        h = None
        try:
            for raw in fh:
                line += 1
                pos = stored.tell() if fh is not stored else pos + len(raw)
                if unit is None:
                    unit = Unit(f, k, path, line, line, select(f, k))
                    h = fingerprint() if unit.selected else None
                unit.last_line = line
                if h is not None:
                    h.update(raw)
                    unit.sha256 = h.hexdigest() if line % N == 0 else None
                if unit.selected:
                    try:
                        rec = parse_line(raw, line, path, spec)
                    except ValueError as e:
                        unit.bad.append(BadRecord(line, str(e)))
                    else:
                        if rec is None:
                            unit.blank += 1
                        else:
                            unit.records.append(rec)
                if line % N == 0:
                    unit.bytes_done = base + pos
                    yield unit
                    unit, k = None, k + 1
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            if fh is stored:
                raise
            raise InputError(f"input {path}: not a readable gzip file ({e}); check the file, or drop the .gz "
                             f"suffix if it is not compressed") from None
        if unit is not None:
            if h is not None:
                unit.sha256 = h.hexdigest()
            unit.bytes_done = base + pos
            yield unit


def _parquet_units(f: int, path: str, spec: InputSpec, select, base: int, size: int) -> Iterator[Unit]:
    import pyarrow.parquet as pq

    with _epath(path).open("rb") as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        wanted = [c for c in (spec.text_field, spec.id_field, spec.title_field) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise InputError(f"{path}: column(s) {', '.join(missing)} not found; columns are "
                             f"{', '.join(sorted(names))} (set --text-field/--id-field/--title-field)")
        total = max(1, pf.metadata.num_rows)
        N = spec.unit_size
        k, row = 0, 0
        for rb in pf.iter_batches(batch_size=N, columns=sorted(set(wanted))):
            # iter_batches may return shorter batches at row-group ends: re-cut to exact units of N rows.
            cols = None
            n = rb.num_rows
            start = 0
            while start < n:
                if row % N == 0:
                    unit = Unit(f, k, path, row + 1, row + 1, select(f, k))
                    h = fingerprint() if unit.selected else None
                take = min(n - start, N - row % N)
                if unit.selected:
                    if cols is None:
                        cols = {c: rb.column(c).to_pylist() for c in set(wanted)}
                    for j in range(start, start + take):
                        line = row + 1 + (j - start)
                        h.update(_row_bytes(cols, j))
                        try:
                            unit.records.append(_from_fields(lambda c: cols[c][j], lambda c: c in cols, line, path, spec))
                        except ValueError as e:
                            unit.bad.append(BadRecord(line, str(e)))
                row += take
                start += take
                unit.last_line = row
                if row % N == 0 or row == pf.metadata.num_rows:
                    unit.sha256 = h.hexdigest() if h is not None else None
                    unit.bytes_done = base + int(size * row / total)
                    yield unit
                    k += 1


__all__ = ["FORMATS", "check_unicode", "fingerprint", "is_gzip",
           "InputSpec", "Record", "BadRecord", "Unit", "InputError", "BadRecordError", "iter_units",
           "infer_format", "input_sizes", "expand_inputs", "unit_name", "parse_line"]
