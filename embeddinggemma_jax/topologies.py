"""TPU v5e topologies for the batch embedding job: mesh, rules, dtype and batch sizes per bucket.

One table (``TOPOLOGIES``) is the home of these numbers; ``tpu/configs/*.json`` are written from it
(``embeddinggemma-jax tpu-configs --write tpu/configs``) and a test keeps them in sync.

Rows per chip come from the TPU compiler, not from a hand model: ``v5e_compiled_memory.json`` holds, per
bucket, the job step's per-chip HBM (``memory_analysis()``) compiled at two row counts and the line
through them; the rows are the token budget's unless that line puts them over ``HBM_MARGIN`` of HBM
(``docs/tpu.md`` shows the table and why the budget is 65,536 tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from embeddinggemma_jax.batching import JOB_LENGTH_BUCKETS, round_rows
from embeddinggemma_jax.sharding import DATA_PARALLEL_RULES, FSDP_RULES

GIB = 1 << 30
V5E_HBM_BYTES = 16 * GIB
HBM_MARGIN = 0.90  # a bucket fits when its compiled program needs at most this share of HBM

RULES = {"data_parallel": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES}

# Rows per chip: the token budget, unless the compiled memory caps it (docs/tpu.md: why this budget).
TOKENS_PER_CHIP = 65536
# Per bucket, the job step compiled for v5e at two row counts: per-chip HBM = fixed + rows x per_row.
# Written by `embeddinggemma-jax tpu-configs --fit A.json B.json` from two tpu-compile results.
COMPILED_MEMORY_FILE = Path(__file__).with_name("v5e_compiled_memory.json")


def fit_memory(a: dict, b: dict) -> dict:
    """Per-bucket fits of compiled per-chip HBM against rows from two ``tpu-compile --json`` results of
    the same topology at different rows (e.g. the topology's rows and ``--tokens-per-chip`` twice the
    budget): {"topology", "buckets": {L: {"rows", "hbm_bytes", "projected_tokens_per_second_per_chip",
    "fixed_bytes", "bytes_per_row"}}}. Buckets compiled in only one of them are left out."""
    if a.get("kind") != "job" or b.get("kind") != "job" or a["topology"] != b["topology"] \
            or a.get("num_slices", 1) != b.get("num_slices", 1):
        raise ValueError("--fit needs two tpu-compile results of the job step on the same topology")
    other = {x["length"]: x for x in b["buckets"]}
    out = {}
    for x in a["buckets"]:
        y = other.get(x["length"])
        if y is None:
            continue
        (r1, h1, t1), (r2, h2, t2) = sorted(
            (p["rows_per_chip"], p["hbm_bytes"], p["projected_tokens_per_second_per_chip"]) for p in (x, y))
        if r1 == r2:
            raise ValueError(f"bucket {x['length']} has the same rows ({r1}) in both results; compile one "
                             "at another --tokens-per-chip")
        per_row = (h2 - h1) / (r2 - r1)
        out[str(x["length"])] = {"rows": [r1, r2], "hbm_bytes": [h1, h2],
                                 "projected_tokens_per_second_per_chip": [t1, t2],
                                 "fixed_bytes": round(h1 - r1 * per_row), "bytes_per_row": round(per_row)}
    return {"topology": a["topology"], "hbm_limit_bytes": V5E_HBM_BYTES, "buckets": out}


def compiled_memory(path: str | Path = COMPILED_MEMORY_FILE) -> dict[int, dict]:
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {int(k): v for k, v in data["buckets"].items()}


def rows_per_chip(L: int, memory: dict[int, dict] | None = None, hbm: int = V5E_HBM_BYTES,
                  tokens_per_chip: int = TOKENS_PER_CHIP) -> dict:
    """One bucket: rows by the token budget, rows the compiled-memory fit allows under
    ``HBM_MARGIN`` x ``hbm``, and the choice (the smaller, TPU-rounded)."""
    fit = memory_fit(L, memory if memory is not None else _MEMORY)
    by_hbm = int((HBM_MARGIN * hbm - fit["fixed_bytes"]) // fit["bytes_per_row"])
    by_tokens = tokens_per_chip // L
    rows = round_rows(min(by_hbm, by_tokens))
    if rows > by_hbm:
        raise ValueError(f"bucket {L} does not fit in {HBM_MARGIN:.0%} of {hbm / GIB:.0f} GiB even with one row")
    return {"length": L, "fixed_bytes": fit["fixed_bytes"], "bytes_per_row": fit["bytes_per_row"],
            "rows_by_hbm": by_hbm, "rows_by_tokens": by_tokens, "rows": rows, "tokens": rows * L,
            "projected_hbm_bytes": fit["fixed_bytes"] + rows * fit["bytes_per_row"], "fit": fit["fit"]}


def memory_fit(L: int, memory: dict[int, dict]) -> dict:
    """The compiled fit of bucket L; a bucket compiled at one row count only (not in ``memory``) gets the
    fit interpolated linearly in L between the nearest compiled buckets (bytes per token and fixed bytes),
    labelled so."""
    if L in memory:
        return dict(memory[L], fit="compiled")
    lo = max((x for x in memory if x < L), default=None)
    hi = min((x for x in memory if x > L), default=None)
    if lo is None or hi is None:
        raise ValueError(f"bucket {L} has no compiled memory fit in {COMPILED_MEMORY_FILE.name} and none on both "
                         "sides to interpolate from; compile it: tpu-compile --json A.json, again with "
                         "--tokens-per-chip, then tpu-configs --fit A.json B.json")
    w = (L - lo) / (hi - lo)
    per_token = (1 - w) * memory[lo]["bytes_per_row"] / lo + w * memory[hi]["bytes_per_row"] / hi
    fixed = (1 - w) * memory[lo]["fixed_bytes"] + w * memory[hi]["fixed_bytes"]
    return {"fixed_bytes": round(fixed), "bytes_per_row": round(per_token * L), "fit": f"interpolated ({lo}, {hi})"}


_MEMORY = compiled_memory()


@dataclass(frozen=True)
class Topology:
    name: str
    chips: int
    hosts: int
    mesh_shape: tuple[int, int]  # (data, fsdp)
    rules: str = "data_parallel"
    dtype: str = "bfloat16"
    accelerator_type: str = ""
    runtime_version: str = "v2-alpha-tpuv5-lite"
    hbm_bytes: int = V5E_HBM_BYTES
    tokens_per_chip: int = TOKENS_PER_CHIP
    buckets: tuple[int, ...] = JOB_LENGTH_BUCKETS
    rows_per_chip: dict[int, int] = field(default_factory=dict)

    @property
    def rules_table(self):
        return RULES[self.rules]

    def to_json(self) -> dict:
        d = asdict(self)
        d["mesh_shape"] = list(self.mesh_shape)
        d["buckets"] = list(self.buckets)
        d["rows_per_chip"] = {str(k): v for k, v in self.rows_per_chip.items()}
        d["rules_table"] = [[name, list(t) if isinstance(t, tuple) else t] for name, t in self.rules_table]
        return d


def v5e(chips: int) -> Topology:
    # v5e: single-host slices have 1, 4 or 8 chips; multi-host slices use 4-chip hosts (ct5lp-hightpu-4t).
    # The job itself never relies on the host count: it reads jax.process_count() at run time.
    hosts = 1 if chips <= 8 else chips // 4
    rows = {L: rows_per_chip(L)["rows"] for L in JOB_LENGTH_BUCKETS}
    return Topology(name=f"v5litepod-{chips}", chips=chips, hosts=hosts, mesh_shape=(chips, 1),
                    accelerator_type=f"v5litepod-{chips}", rows_per_chip=rows)


TOPOLOGIES: dict[str, Topology] = {t.name: t for t in (v5e(n) for n in (1, 4, 8, 16, 32, 64, 128, 256))}


def reload() -> None:
    """Re-read the compiled memory fits (after ``tpu-configs --fit``) and rebuild ``TOPOLOGIES``."""
    global _MEMORY
    _MEMORY = compiled_memory()
    TOPOLOGIES.clear()
    TOPOLOGIES.update({t.name: t for t in (v5e(n) for n in (1, 4, 8, 16, 32, 64, 128, 256))})


def get(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; valid: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def rows_table(topo: Topology | None, buckets, tokens_per_device: int | None) -> dict[int, int]:
    """Rows per device for each bucket, as the batch job, its planner and ``tpu-compile`` use them: the
    topology's table, else the token budget (``tokens_per_device``, the topology's, else 16384) / length
    (TPU-rounded)."""
    table = dict(topo.rows_per_chip) if topo is not None and tokens_per_device is None else {}
    budget = tokens_per_device or (topo.tokens_per_chip if topo is not None else 16384)
    return {L: int(table.get(L) or round_rows(max(1, budget // L))) for L in buckets}


def arithmetic_table(memory: dict[int, dict] | None = None) -> str:
    """The markdown table in docs/tpu.md: per bucket, the two compiled points, the fit, the rows it
    allows under the HBM margin, the token budget's rows and the choice."""
    memory = memory if memory is not None else _MEMORY
    lines = ["| bucket L | compiled rows | compiled HBM/chip (GiB) | projected tok/s/chip | fit | fixed (GiB) "
             f"| MB/row | rows by HBM ({HBM_MARGIN:.0%}) | rows by tokens | rows/chip | HBM/chip at rows (GiB) |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for L in JOB_LENGTH_BUCKETS:
        r = rows_per_chip(L, memory)
        if L in memory:
            f = memory[L]
            t1, t2 = f["projected_tokens_per_second_per_chip"]
            points = (f"{f['rows'][0]} / {f['rows'][1]} | {f['hbm_bytes'][0] / GIB:.2f} / {f['hbm_bytes'][1] / GIB:.2f}"
                      f" | {t1:,.0f} / {t2:,.0f} ({100 * (t2 / t1 - 1):+.0f}%)")
        else:
            points = "- | - | -"
        lines.append(f"| {L} | {points} | {r['fit']} | {r['fixed_bytes'] / GIB:.2f} | {r['bytes_per_row'] / 1e6:.2f} | "
                     f"{r['rows_by_hbm']} | {r['rows_by_tokens']} | {r['rows']} | {r['projected_hbm_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def write_configs(folder: str | Path) -> list[Path]:
    from embeddinggemma_jax.io_utils import atomic_write_json

    out = []
    for t in TOPOLOGIES.values():
        p = Path(folder) / f"{t.name}.json"
        atomic_write_json(p, t.to_json())
        out.append(p)
    return out
