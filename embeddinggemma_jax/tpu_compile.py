"""``embeddinggemma-jax tpu-compile``: the job's step (or the train step) through the real TPU compiler,
on any host with libtpu (no TPU needed), for every bucket of a v5e slice: the command line and the
markdown table.

Where the work is done: ``tpu_aot`` (the AOT drivers ``compile_job`` / ``compile_train``: devices of a
slice from libtpu's topology description, the step lowered with abstract arguments and compiled as
MaxText's ``train_compile.py`` does, ``memory_analysis()`` per bucket against v5e's 16 GiB) and
``roofline`` (``hlo_roofline``: a PROJECTED time from the optimised HLO, since the compiler's cost model
gives none for this program and counts a loop body once). The names below are re-exported so that
``tpu_compile.X`` keeps working for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path

from embeddinggemma_jax import topologies
from embeddinggemma_jax.errors import InputError
from embeddinggemma_jax.roofline import (  # noqa: F401 - re-exported
    V5E_HBM_BANDWIDTH,
    V5E_PEAK_FLOPS,
    V5E_PEAK_INT8_OPS,
    _parse,
    _slice_start_bytes,
    hlo_roofline,
)
from embeddinggemma_jax.tpu_aot import (  # noqa: F401 - re-exported
    CHIPS_KEY,
    HBM_MARGIN,
    PROJECTION_METHOD,
    TRAIN_OVERRIDES,
    compile_job,
    compile_train,
    finish,
    format_row,
    layer_branch_shares,
    memory,
    model_configs,
    out_of_hbm,
    slice_devices,
    train_config_chips,
)


def markdown(out: dict) -> str:
    lines = ["| bucket L | rows/chip | attention | HBM/chip (GiB) | of 16 GiB | FLOPs/chip | projected ms/step "
             "| projected tokens/s/chip | projected MFU |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for b in out["buckets"]:
        if b.get("out_of_hbm"):
            lines.append(f"| {b['length']} | {b['rows_per_chip']} | {b['attention']} | {b['hbm_bytes'] / 2**30:.2f} | "
                         f"{100 * b['hbm_fraction']:.0f}% | does not compile (out of HBM) | | | |")
            continue
        mfu = b.get("projected_mfu")
        lines.append(f"| {b['length']} | {b['rows_per_chip']} | {b['attention']} | {b['hbm_bytes'] / 2**30:.2f} | "
                     f"{100 * b['hbm_fraction']:.0f}% | {b['flops_per_chip']:.3g} | {b['projected_seconds'] * 1e3:.2f} | "
                     f"{b['projected_tokens_per_second_per_chip']:,.0f} | "
                     + (f"{100 * mfu:.0f}%" if mfu is not None else "") + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
TPU_COMPILE_DESCRIPTION = (
    "Compile exactly the program the batch job runs (or, with --train, the training step) for a TPU v5e "
    "slice through libtpu's compiler on this host (no TPU needed), for every bucket, and print per bucket "
    "the per-chip HBM from memory_analysis() and a roofline PROJECTION of time from the optimised HLO. "
    f"Exits 1 when a bucket needs more than {HBM_MARGIN:.0%} of 16 GiB.")


def _ints(text: str) -> tuple[int, ...]:
    import argparse

    from embeddinggemma_jax.options import ints

    out = ints(text)
    if not out or min(out) < 1:  # '' would otherwise mean "no filter": the full sweep
        raise argparse.ArgumentTypeError(f"expected positive comma-separated lengths (e.g. 128,512), got {text!r}")
    return out


def add_tpu_compile_arguments(p) -> None:
    from embeddinggemma_jax.quant import MODE_NAMES  # imports jax: not before the topology environment is set

    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--topology", choices=list(topologies.TOPOLOGIES), help="a tpu/configs slice: the job's step")
    g.add_argument("--train", metavar="CONFIG", help="a tpu/train/*.json config: the training step")
    p.add_argument("--buckets", type=_ints, help="only these buckets, comma-separated (default: all)")
    p.add_argument("--slices", type=int, default=1, help="slices of the topology, data parallel over the "
                                                         "data-centre network (default: 1)")
    p.add_argument("--model", default=None, help="a model folder or hub id whose configs to use (no weights are "
                                                 "read; default: the built-in EmbeddingGemma-300m config)")
    p.add_argument("--quantize", choices=MODE_NAMES, help="compile the job's step with the parameters of "
                   "this quantization mode (--topology only); int8 x int8 matmuls timed at 394 TOPS")
    p.add_argument("--tokens-per-chip", type=int, default=None,
                   help="rows per bucket from this token budget per chip instead of the topology's rows (a what-if)")
    from embeddinggemma_jax import options
    from embeddinggemma_jax.train.run import RunConfig

    g = p.add_argument_group("with --train: override the config's settings (the train command's flags)")
    options.add_arguments(g, RunConfig, only=TRAIN_OVERRIDES)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (after every bucket)")
    p.add_argument("--resume", action="store_true", help="keep the buckets of an earlier --json FILE of the same "
                                                         "topology, slices, rows and quantization; compile only the others")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("--hlo", metavar="DIR", help="write each bucket's optimised HLO into DIR (L<length>.hlo.txt)")


def check_json_target(path) -> None:
    """Refuse, before compiling, a --json FILE that exists and is not an earlier tpu-compile result."""
    p = Path(path)
    if not p.exists():
        return
    try:
        old = json.loads(p.read_text(encoding="utf-8"))
        ours = isinstance(old, dict) and {"topology", "buckets", "hbm_limit_bytes"} <= set(old)
    except (OSError, UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        raise InputError(f"--json {path} exists and is not a tpu-compile result; refusing to replace it: "
                         "pass a new file name")


def train_overrides(args) -> dict:
    """The ``TRAIN_OVERRIDES`` flags given on the command line (argparse leaves out the others)."""
    return {k: getattr(args, k) for k in TRAIN_OVERRIDES if hasattr(args, k)}


def check_hlo_target(folder) -> None:
    """Refuse, before compiling, a --hlo DIR holding an ``L<length>.hlo.txt`` that is not an HLO module
    (the files --hlo writes): the user's own file of that name is never replaced."""
    for p in sorted(Path(folder).glob("L*.hlo.txt")) if Path(folder).is_dir() else []:
        with open(p, "rb") as f:
            if not f.read(9) == b"HloModule":
                raise InputError(f"--hlo {folder}: {p.name} exists and is not an HLO module written by tpu-compile; "
                                 "refusing to replace it: pass another folder")


def cmd_tpu_compile(args) -> int:
    from embeddinggemma_jax.io_utils import atomic_write_json

    if args.json:
        check_json_target(args.json)
    if args.hlo:
        check_hlo_target(args.hlo)
    if args.slices < 1:
        raise ValueError(f"--slices must be >= 1, got {args.slices}")
    if args.train:
        if args.buckets or args.tokens_per_chip or args.resume:
            raise ValueError("--buckets, --tokens-per-chip and --resume are for --topology; a --train config has "
                             "one length (max_length)")
        if args.quantize:
            raise ValueError("--quantize is for --topology (the inference job); training runs in float")
        out = compile_train(args.train, args.model, args.slices, overrides=train_overrides(args), hlo_dir=args.hlo)
    else:
        if train_overrides(args):
            raise ValueError(f"--{next(iter(train_overrides(args))).replace('_', '-')} is for --train "
                             "(a train config's setting); --topology compiles the batch job")
        if args.tokens_per_chip is not None and args.tokens_per_chip < 1:
            raise ValueError(f"--tokens-per-chip must be >= 1, got {args.tokens_per_chip}")
        earlier = json.loads(Path(args.json).read_text(encoding="utf-8")) if args.resume and args.json and \
            Path(args.json).exists() else None
        save = (lambda o: atomic_write_json(args.json, o)) if args.json else None
        out = compile_job(args.topology, args.buckets, args.model, args.slices, quantize=args.quantize,
                          tokens_per_chip=args.tokens_per_chip, earlier=earlier, on_bucket=save, hlo_dir=args.hlo)
    print(f"{out['topology']} x{out['num_slices']} ({out['chips']} chips, {out['hosts']} hosts, mesh {out['mesh']}): "
          + ("every bucket fits" if out["fits"] else f"buckets {out['too_big']} need more than "
             f"{HBM_MARGIN:.0%} of 16 GiB") + "; times are projections (" + PROJECTION_METHOD + ")")
    if args.markdown:
        print(markdown(out))
    if args.json:
        atomic_write_json(args.json, out)
    return 0 if out["fits"] else 1


__all__ = ["compile_job", "compile_train", "hlo_roofline", "slice_devices", "memory", "cmd_tpu_compile",
           "add_tpu_compile_arguments"]
