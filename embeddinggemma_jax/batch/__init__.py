"""The batch embedding job: stream a corpus, embed it on every device of every host, resumably.

``readers`` (jsonl/text/parquet units) -> ``batching.BatchPlanner`` (fixed-shape batches) -> ``step``
(sharded, jitted encode) -> ``shards`` (atomic shard files); ``context`` (options, setup), ``pipeline`` (the
loop, resume), ``manifest``, ``summary`` and ``verify``, all named in ``job``.
"""

from embeddinggemma_jax.batch.job import EmbedOptions, run_embed, verify
from embeddinggemma_jax.errors import JobError, VerifyError

__all__ = ["EmbedOptions", "JobError", "VerifyError", "run_embed", "verify"]
