"""Evaluation: the one home of every quality metric this package reports.

- ``sts``: STS Benchmark files (``stsb-LANG-SPLIT.csv``), Spearman x 100 of cosine vs gold score;
- ``retrieval``: recall@1/@10, MRR@10, nDCG@10 of queries against the corpus of their positives.

Used by ``embeddinggemma-jax evaluate``, by ``train`` (``--eval-file``, ``--eval-sts``) and by
``benchmarks/quant_quality.py``.
"""
