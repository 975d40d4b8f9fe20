"""TPU v5e topologies for the batch embedding job: mesh, rules, dtype and batch sizes per bucket.

One table (``TOPOLOGIES``) is the home of these numbers; ``tpu/configs/*.json`` are written from it
(``embeddinggemma-jax tpu-configs --write tpu/configs``) and a test keeps them in sync.

Batch sizes come from an explicit HBM model (``hbm_bytes_per_row``), shown in ``tpu/README.md``:
inference keeps the bf16 parameters replicated on every chip, and the encoder is a ``lax.scan``
over layers, so the activations alive at once are those of ONE layer for every row of the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from embeddinggemma_jax.batching import JOB_LENGTH_BUCKETS, round_rows
from embeddinggemma_jax.config import EncoderConfig
from embeddinggemma_jax.costs import param_count
from embeddinggemma_jax.sharding import DATA_PARALLEL_RULES, FSDP_RULES

GIB = 1 << 30
V5E_HBM_BYTES = 16 * GIB

RULES = {"data_parallel": DATA_PARALLEL_RULES, "fsdp": FSDP_RULES}

# Memory model constants (see tpu/README.md for the derivation).
USABLE_FRACTION = 0.85  # XLA keeps part of HBM for its own buffers; never plan to the last byte
RUNTIME_RESERVE = 1 * GIB  # compiled program, input double-buffers, collectives scratch
SAFETY_FACTOR = 2.0  # fusion temporaries the per-token count below does not name
TOKENS_PER_CHIP = 65536  # beyond this the MXU is saturated; bigger batches only add padding waste


def hbm_bytes_per_token(L: int, cfg: EncoderConfig | None = None, act_bytes: int = 2) -> int:
    """Peak live activation bytes per token inside one scanned layer (bf16 activations).

    - residual stream in and out: 2 * D * act_bytes
    - fp32 RMSNorm temporaries (input and output): 2 * D * 4
    - q, k, v and the attention output: 2 * (N*H + K*H) * act_bytes
    - MLP gate, up and gelu(gate)*up: 3 * F * act_bytes
    - attention scores fp32, masked scores fp32, probabilities: (4 + 4 + act_bytes) * N * keys, with
      keys = L on the full-attention layers (the widest: they see every token)
    """
    c = cfg or EncoderConfig()
    D, F, N, K, H = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    return (2 * D * act_bytes + 2 * D * 4 + 2 * (N * H + K * H) * act_bytes + 3 * F * act_bytes
            + (8 + act_bytes) * N * L)


def hbm_bytes_per_row(L: int, cfg: EncoderConfig | None = None) -> int:
    return L * hbm_bytes_per_token(L, cfg)


def usable_activation_bytes(hbm: int = V5E_HBM_BYTES, cfg: EncoderConfig | None = None) -> int:
    return int(USABLE_FRACTION * hbm) - RUNTIME_RESERVE - 2 * param_count(cfg)  # bf16 params


def rows_per_chip(L: int, hbm: int = V5E_HBM_BYTES, tokens_per_chip: int = TOKENS_PER_CHIP) -> dict:
    """The arithmetic for one bucket: rows allowed by HBM, by the token budget, and the choice."""
    per_row = hbm_bytes_per_row(L)
    by_hbm = int(usable_activation_bytes(hbm) // (SAFETY_FACTOR * per_row))
    by_tokens = tokens_per_chip // L
    rows = round_rows(min(by_hbm, by_tokens))
    if rows > by_hbm:
        raise ValueError(f"bucket {L} does not fit in {hbm / GIB:.0f} GiB of HBM even with one row")
    return {"length": L, "bytes_per_row": per_row, "rows_by_hbm": by_hbm, "rows_by_tokens": by_tokens,
            "rows": rows, "tokens": rows * L}


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


def get(name: str) -> Topology:
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; valid: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def arithmetic_table() -> str:
    """The markdown table in tpu/README.md, after a line on the parameter and activation budget."""
    lines = [f"params: {param_count():,} -> {2 * param_count() / GIB:.2f} GiB in bf16; usable for activations: "
             f"{usable_activation_bytes() / GIB:.2f} GiB", "",
             "| bucket L | bytes/token | MB/row | rows by HBM | rows by tokens | rows/chip | tokens/chip |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for L in JOB_LENGTH_BUCKETS:
        r = rows_per_chip(L)
        lines.append(f"| {L} | {hbm_bytes_per_token(L)} | {r['bytes_per_row'] / 1e6:.2f} | {r['rows_by_hbm']} | "
                     f"{r['rows_by_tokens']} | {r['rows']} | {r['tokens']} |")
    return "\n".join(lines)


def write_configs(folder: str | Path) -> list[Path]:
    from embeddinggemma_jax.io_utils import atomic_write_json

    out = []
    for t in TOPOLOGIES.values():
        p = Path(folder) / f"{t.name}.json"
        atomic_write_json(p, t.to_json())
        out.append(p)
    return out
