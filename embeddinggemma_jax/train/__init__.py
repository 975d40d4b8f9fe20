"""Fine-tuning EmbeddingGemma: contrastive (MNRL) + Matryoshka losses, a sharded jitted train step,
Orbax checkpoints with resume, retrieval evaluation and export to sentence-transformers.

- ``data``: JSONL pairs, prompts as at inference, seeded resumable stream, padded token batches
- ``losses``: ``multiple_negatives_ranking_loss``, ``matryoshka_loss``
- ``step``: ``TrainConfig``, optimiser, train state, ``make_train_step``
- ``checkpointing``: ``TrainCheckpoints`` (Orbax CheckpointManager)
- ``eval``: recall@1/10, MRR@10, nDCG@10 per Matryoshka dimension
- ``run``: ``Run`` (fit / resume / export), ``export_checkpoint``; ``cli``: the ``train`` commands
"""
