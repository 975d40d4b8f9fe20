"""The PyTorch-facing side of the project: conversion (``convert``, ``export``), the parity check
(``parity``) and the sentence-transformers benchmark worker (``st_worker``).

The safetensors table lives in ``embeddinggemma_jax.weights`` and Orbax in
``embeddinggemma_jax.checkpoint``; ``parity`` and ``st_worker`` are the only code in this project that
imports PyTorch, and only when they run.
"""
