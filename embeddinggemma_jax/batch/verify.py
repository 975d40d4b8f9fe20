"""``embeddinggemma-jax verify``: re-read a job's inputs and check that its output folder holds every
record exactly once (shards, checksums, ids in input order, bad records, duplicate ids, nothing extra)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from embeddinggemma_jax.batch import shards
from embeddinggemma_jax.batch.manifest import ERRORS, MANIFEST, find_duplicates, read_manifest
from embeddinggemma_jax.batch.readers import InputSpec, expand_inputs, iter_units
from embeddinggemma_jax.errors import VerifyError


def verify(out_dir: str, inputs: Sequence[str] | None = None, check_values: bool = True) -> dict:
    """Check that DIR holds every input record exactly once: the shard for every unit, checksums,
    ids equal to the input's in order, bad records accounted for, no extra files."""
    out = shards.epath(out_dir)
    mp = out / MANIFEST
    if not mp.exists():
        raise VerifyError(f"{out_dir}/{MANIFEST} is missing: the job has not finished; rerun the embed command "
                          f"to resume it")
    manifest, opt = read_manifest(mp, out_dir)
    paths = expand_inputs(inputs) if inputs else opt["inputs"]
    if list(paths) != list(opt["inputs"]):
        raise VerifyError(f"--input {' '.join(paths)} differs from the job's inputs {' '.join(opt['inputs'])}; "
                          f"pass the same paths, in the same order")
    spec = InputSpec(tuple(paths), opt["format"], opt["text_field"], opt["id_field"], opt["title_field"],
                     opt["unit_size"])
    problems: list[str] = []
    expected_files = set()
    n_records = n_bad = 0
    listed = {s["name"]: s for s in manifest["shards"]}
    id_lines = []
    for u in iter_units(spec):
        name = u.name
        expected_files |= {f"{name}.npy", f"{name}.ids.jsonl", f"{name}.json"}
        meta = shards.read_meta(out, name)
        problem = shards.check_shard(out, name, meta)
        if problem:
            problems.append(f"shard {name} ({u.path} lines {u.first_line}-{u.last_line}): {problem}")
            continue
        if name not in listed or listed[name]["sha256"] != meta["sha256"]:
            problems.append(f"shard {name} is not in the manifest as written")
        fingerprinted = "input_sha256" in meta or manifest.get("format_version", 1) >= 2  # format 1 had none
        if fingerprinted and meta.get("input_sha256") != u.sha256:
            problems.append(f"shard {name}: {u.path} lines {u.first_line}-{u.last_line} changed since the shard was "
                            f"written (input fingerprint differs); rerun the embed command to redo it")
            continue
        emb, ids = shards.load_shard(out, name)
        want = [r.id for r in u.records]
        if ids != want:
            missing = len(set(map(json.dumps, want)) - set(map(json.dumps, ids)))
            problems.append(f"shard {name}: ids differ from the input ({len(ids)} stored, {len(want)} expected, "
                            f"{missing} missing)")
        if emb.shape != (len(want), opt["dimensions"]) or emb.dtype != np.float32:
            problems.append(f"shard {name}: embeddings {emb.shape} {emb.dtype}, expected "
                            f"({len(want)}, {opt['dimensions']}) float32")
        elif check_values and len(want):
            if not np.isfinite(emb).all():
                problems.append(f"shard {name}: non-finite embeddings")
            elif not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3):
                problems.append(f"shard {name}: embeddings are not unit length")
        if [b["line"] for b in meta["bad"]] != [b.line for b in u.bad]:
            problems.append(f"shard {name}: bad records {[b['line'] for b in meta['bad']]} recorded, input has "
                            f"{[b.line for b in u.bad]}")
        n_records += len(want)
        n_bad += len(u.bad)
        id_lines += [(r.id, u.path, r.line) for r in u.records]
    extra = sorted(set(shards.list_shard_files(out)) - expected_files)
    if extra:
        problems.append(f"{len(extra)} files in shards/ belong to no input unit (e.g. {extra[0]})")
    if len(manifest["shards"]) != len(expected_files) // 3:
        problems.append(f"the manifest lists {len(manifest['shards'])} shards, the input has {len(expected_files) // 3} units")
    errs = (out / ERRORS).read_text().splitlines() if (out / ERRORS).exists() else None
    if errs is None or len(errs) != n_bad:
        problems.append(f"{ERRORS} has {None if errs is None else len(errs)} entries, the input has {n_bad} bad records")
    dups = find_duplicates(id_lines)
    if dups != manifest.get("duplicate_ids", []):
        problems.append(f"the input has {len(dups)} records with a repeated id, the manifest lists "
                        f"{len(manifest.get('duplicate_ids', []))}")
    c = manifest["counts"]
    if c["records"] != n_records or c["bad_records"] != n_bad:
        problems.append(f"manifest counts {c['records']} records/{c['bad_records']} bad, the input has "
                        f"{n_records}/{n_bad}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VerifyError(problems[0] + more)
    return {"records": n_records, "bad_records": n_bad, "shards": len(expected_files) // 3, "duplicate_ids": dups}


__all__ = ["verify"]
