"""Command-line entry points for conversion (``convert``, ``export``) and parity checks (``parity``).

The conversion logic itself lives in ``embeddinggemma_jax.checkpoint`` (Orbax) and
``embeddinggemma_jax.weights`` (the safetensors table); ``parity`` is the only code in this project
that imports PyTorch, and only when that command runs.
"""
