"""The resumable, multi-host embedding job and its verifier: the names of its modules in one place.

- ``context``: ``EmbedOptions`` (every flag of ``embed``) and ``setup`` -> the ``JobContext``;
- ``pipeline``: the stages (tokenise, plan, step, write) and the run loop ``run_embed(options, stages)``;
- ``manifest``: manifest.json, errors.jsonl and duplicate ids;
- ``summary``: ``finalize`` (totals over hosts, the manifest) and the printed summary;
- ``verify``: the output folder checked against the inputs.
"""

from embeddinggemma_jax.batch.context import EmbedOptions, JobContext, check_output_folder, model_hash, setup
from embeddinggemma_jax.batch.manifest import ERRORS, JOB, MANIFEST, find_duplicates, write_manifest
from embeddinggemma_jax.batch.pipeline import (
    JobStats,
    Round,
    Stages,
    host_share,
    my_units,
    plan_round,
    read_ahead,
    run_embed,
    step,
    tokenize_unit,
    unit_padded_tokens,
    write,
)
from embeddinggemma_jax.batch.summary import finalize, format_summary
from embeddinggemma_jax.batch.verify import verify
from embeddinggemma_jax.errors import JobError, VerifyError

__all__ = ["EmbedOptions", "JobContext", "JobStats", "Round", "Stages", "setup", "tokenize_unit", "plan_round",
           "host_share", "step", "write", "unit_padded_tokens", "read_ahead", "finalize", "my_units", "run_embed",
           "verify", "write_manifest", "find_duplicates", "format_summary", "model_hash", "check_output_folder",
           "JobError", "VerifyError", "MANIFEST", "ERRORS", "JOB"]
