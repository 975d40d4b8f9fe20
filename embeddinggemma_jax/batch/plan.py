"""``embed --plan-only``: what a job will cost before a pod starts.

Reads and tokenises the input exactly as ``embed`` does (no weights are read, nothing is compiled),
plans every round of every host with the job's own planner (``simulate``: the round rule of
``batch.job`` run for N hosts in one process) and reports records, tokens, batches, compiled shapes and
padding efficiency per bucket and overall.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from embeddinggemma_jax.batching import JOB_LENGTH_BUCKETS, BatchPlanner, buckets_for, padding_efficiency


def simulate(unit_lengths: Iterable[tuple[int, Sequence[int]]], hosts: int, planner: BatchPlanner) -> dict:
    """Plan as ``hosts`` hosts would. ``unit_lengths``: (owner key, token lengths) per unit in input
    order, the owner key being ``file_index + unit_index`` (unit (f, k) belongs to host (f + k) % hosts);
    ``planner``: the global planner (rows of all hosts). Round r holds every host's r-th unit, planned
    together as ``batch.job.plan_round`` does. Memory: one round at a time is planned, but the hosts'
    queues of pending units are kept (as the hosts would read them)."""
    queues: list[list[Sequence[int]]] = [[] for _ in range(hosts)]
    for key, lens in unit_lengths:
        queues[key % hosts].append(lens)
    rounds = max((len(q) for q in queues), default=0)
    per_bucket = defaultdict(lambda: {"batches": 0, "real_tokens": 0, "padded_tokens": 0, "records": 0})
    shapes = set()
    for r in range(rounds):
        lengths = [n for q in queues if r < len(q) for n in q[r]]
        for b in planner.plan(lengths):
            s = per_bucket[b.length]
            s["batches"] += 1
            s["records"] += len(b.index)
            s["real_tokens"] += int(sum(lengths[i] for i in b.index))
            s["padded_tokens"] += b.rows * b.length
            shapes.add((b.rows // hosts, b.length))
    real = sum(s["real_tokens"] for s in per_bucket.values())
    padded = sum(s["padded_tokens"] for s in per_bucket.values())
    return {
        "hosts": hosts, "rounds": rounds,
        "records": sum(s["records"] for s in per_bucket.values()), "tokens": real, "padded_tokens": padded,
        "batches": sum(s["batches"] for s in per_bucket.values()), "compiled_shapes": len(shapes),
        "padding_efficiency": round(padding_efficiency(real, padded), 4),
        "buckets": [dict(length=L, **s, padding_efficiency=round(padding_efficiency(s["real_tokens"],
                                                                                     s["padded_tokens"]), 4))
                    for L, s in sorted(per_bucket.items())],
    }


def job_planner(topology: str | None, buckets: Sequence[int] | None, tokens_per_device: int | None, shrink: bool,
                max_length: int, pad_id: int, hosts: int, devices: int | None = None) -> BatchPlanner:
    """The global planner ``embed`` builds for this layout: rows per device (the topology's or from the
    token budget) times the devices the batch is split over (the slice's chips; ``devices`` without one)."""
    from embeddinggemma_jax import topologies

    topo = topologies.get(topology) if topology else None
    bks = buckets_for(max_length, buckets or (topo.buckets if topo else JOB_LENGTH_BUCKETS))
    per_dev = topologies.rows_table(topo, bks, tokens_per_device)
    split = topo.chips if topo else (devices or hosts)
    if split % hosts:
        raise ValueError(f"{split} devices cannot be split evenly over {hosts} hosts")
    return BatchPlanner(bks, {L: r * split for L, r in per_dev.items()}, pad_id, shrink="fine" if shrink else "none",
                        row_multiple=split)


def plan_only(o, hosts: int | None = None) -> dict:
    """Tokenise the job's input (no weights) and simulate its plan; the report as a dict."""
    import time

    from embeddinggemma_jax import topologies
    from embeddinggemma_jax.batch.job import JobError
    from embeddinggemma_jax.batch.readers import InputSpec, expand_inputs, infer_format, iter_units
    from embeddinggemma_jax.prompts import document_prefix, prompt_text
    from embeddinggemma_jax.source import read_source

    t0 = time.perf_counter()
    topo = topologies.get(o.topology) if o.topology else None
    hosts = hosts or (topo.hosts if topo else 1)
    src = read_source(o.model)
    head = src.head_config
    tok = src.tokenizer()
    prompt = prompt_text(head.prompts, o.prompt_name or None, what="--prompt-name", error=JobError) or ""
    inputs = expand_inputs(o.inputs)
    spec = InputSpec(tuple(inputs), o.format or infer_format(inputs), o.text_field, o.id_field, o.title_field,
                     o.unit_size)
    planner = job_planner(o.topology, o.buckets, o.tokens_per_device, o.shrink, head.max_seq_length, tok.pad_id,
                          hosts)

    def units():
        for u in iter_units(spec):
            texts = [(document_prefix(r.title or None) if o.title_field else prompt) + r.text
                     for r in u.records]
            yield u.file_index + u.unit_index, tok.count(texts) if texts else []

    report = simulate(units(), hosts, planner)
    report.update(topology=o.topology, rows_per_global_batch={str(L): planner.full_rows(L) for L in planner.buckets},
                  plan_seconds=round(time.perf_counter() - t0, 2))
    return report


def format_plan(r: dict) -> str:
    lines = [f"plan for {r['topology'] or 'this machine'} as {r['hosts']} host(s): {r['records']:,} records, "
             f"{r['tokens']:,} tokens in {r['batches']:,} global batches ({r['rounds']} rounds), "
             f"{r['compiled_shapes']} compiled shapes",
             f"padding efficiency {r['padding_efficiency']:.3f} (real tokens / padded tokens)",
             "bucket  batches  records  padding efficiency"]
    lines += [f"{b['length']:>6}  {b['batches']:>7,}  {b['records']:>7,}  {b['padding_efficiency']:.3f}"
              for b in r["buckets"]]
    return "\n".join(lines)


__all__ = ["simulate", "job_planner", "plan_only", "format_plan"]
