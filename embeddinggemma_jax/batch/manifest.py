"""The output folder's record of a finished job: ``manifest.json`` (every shard, counts, duplicate ids)
and ``errors.jsonl`` (the bad records), written by process 0 from the shards' metadata; duplicate ids
(``find_duplicates``: both records are kept, both places listed). ``read_manifest`` reads it back for
``verify``."""

from __future__ import annotations

import json

from embeddinggemma_jax.batch import shards
from embeddinggemma_jax.batch.readers import InputSpec, iter_units, unit_name
from embeddinggemma_jax.batching import padding_efficiency
from embeddinggemma_jax.errors import JobError, VerifyError

MANIFEST = "manifest.json"
JOB = "job.json"
ERRORS = "errors.jsonl"
FORMAT_VERSION = 2  # 2: every shard records its input's fingerprint (input_sha256)


def _id_key(x) -> str:
    """Ids compare as text: ``"1"`` and ``1`` name the same record for whoever joins on them."""
    return str(x) if isinstance(x, (str, int)) else json.dumps(x, sort_keys=True)


def find_duplicates(records) -> list[dict]:
    """``records``: (id, file, line) in input order. Every record whose id an earlier record already
    has, as ``{"id", "first": {"file", "line"}, "again": {"file", "line"}}``: both are kept (docs/batch-job.md)."""
    first: dict[str, tuple[str, int]] = {}
    out = []
    for rid, path, line in records:
        k = _id_key(rid)
        if k in first:
            f, ln = first[k]
            out.append({"id": rid, "first": {"file": f, "line": ln}, "again": {"file": path, "line": line}})
        else:
            first[k] = (path, line)
    return out


def _shard_duplicates(out, unit_names: list[str], options: dict) -> list[dict]:
    """Duplicate ids over the finished shards; the line numbers of the (few) units involved are read back
    from the input (ids files hold no lines)."""
    owner: dict[str, tuple[str, int]] = {}
    hits = []  # (id, (unit, position) first, (unit, position) again)
    for name in unit_names:
        _, ids = shards.load_shard(out, name)
        for i, rid in enumerate(ids):
            k = _id_key(rid)
            if k in owner:
                hits.append((rid, owner[k], (name, i)))
            else:
                owner[k] = (name, i)
    if not hits:
        return []
    involved = {n for _, a, b in hits for n in (a[0], b[0])}
    spec = InputSpec(tuple(options["inputs"]), options["format"], options["text_field"], options["id_field"],
                     options["title_field"], options["unit_size"])
    where = {}
    for u in iter_units(spec, lambda f, k: unit_name(f, k) in involved):
        if u.selected:
            where[u.name] = [(u.path, r.line) for r in u.records]

    def at(ref):
        path, line = where[ref[0]][ref[1]]
        return {"file": path, "line": line}

    return [{"id": rid, "first": at(a), "again": at(b)} for rid, a, b in hits]


def write_manifest(out, unit_names: list[str], job: dict) -> dict:
    """Collect every shard's metadata (all hosts'), write errors.jsonl and manifest.json."""
    metas, errors = [], []
    for name in unit_names:
        meta = shards.read_meta(out, name)
        problem = shards.check_shard(out, name, meta)
        if problem:
            raise JobError(f"shard {name}: {problem}; a host may have failed: rerun the same command to finish")
        metas.append(meta)
        errors += meta["bad"]
    shards.write_atomic(out / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode())
    tokens = sum(m["tokens"] for m in metas)
    padded = sum(m["padded_tokens"] for m in metas)
    dups = _shard_duplicates(out, unit_names, job["options"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "options": job["options"],
        "model": job["model"],
        "counts": {"records": sum(m["records"] for m in metas), "bad_records": len(errors),
                   "blank_lines": sum(m["blank"] for m in metas), "shards": len(metas),
                   "tokens": tokens, "padded_tokens": padded,
                   "padding_efficiency": round(padding_efficiency(tokens, padded), 6),
                   "duplicate_ids": len(dups)},
        "duplicate_ids": dups,
        "shards": [{k: m[k] for k in ("name", "file", "first_line", "last_line", "records", "input_sha256", "sha256")}
                   for m in metas],
    }
    shards.write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def read_manifest(mp, out_dir: str) -> tuple[dict, dict]:
    """manifest.json and its options, or a one-line VerifyError for a truncated or malformed file."""
    from embeddinggemma_jax.errors import FileFormatError
    from embeddinggemma_jax.io_utils import parse_json

    hint = "it was damaged or edited; rerun the embed command (it rewrites the manifest from the shards)"
    try:
        manifest = parse_json(mp.read_bytes(), f"{out_dir}/{MANIFEST}", expect=dict, hint=hint)
    except FileFormatError as e:
        raise VerifyError(str(e)) from None
    need = {"options": dict, "shards": list, "counts": dict}
    bad = [k for k, t in need.items() if not isinstance(manifest.get(k), t)]
    opt = manifest.get("options") or {}
    if not bad:
        bad = [k for k in ("inputs", "format", "text_field", "id_field", "title_field", "unit_size", "dimensions")
               if k not in opt]
        bad += [k for k in ("records", "bad_records") if not isinstance(manifest["counts"].get(k), int)]
        if not all(isinstance(s, dict) and {"name", "sha256"} <= set(s) for s in manifest["shards"]):
            bad.append("shards")
    if bad:
        raise VerifyError(f"{out_dir}/{MANIFEST} lacks or mangles {', '.join(bad)}; {hint}")
    return manifest, opt


__all__ = ["MANIFEST", "JOB", "ERRORS", "FORMAT_VERSION", "find_duplicates", "write_manifest", "read_manifest"]
